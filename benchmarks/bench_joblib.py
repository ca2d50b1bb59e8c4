"""scikit-learn GridSearchCV(n_jobs=2) under the "dedupshm" joblib backend
vs joblib's default loky backend (memmapping arrays >= 1 MB).

X: 512 MiB of float64 (65536 x 1024; --quick 32 MiB), y: 2 classes.  The
search: NearestCentroid over 5 values of shrink_threshold x 2 folds = 10
fits (memory-bound: each fit reads its training rows), run 3 times in the
same process (a notebook refitting, a nested CV: the same X again).  For
each run: wall time, peak host memory above the idle process (Pss_Anon +
Pss_File of the caller and its workers, plus the blocks of the /dev/shm
files in play: our store less its freed pages kept warm, joblib's
memmapping folders) and the bytes newly written to /dev/shm (joblib: the
peak size of its memmapping folders; ours: the growth of the store's
physical_bytes, the pages it newly used).  The two backends
run in separate fresh processes, one after the other.

    python benchmarks/bench_joblib.py [--quick]
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from _common import Result, fmt_bytes, print_table, run_standalone  # noqa: E402
from _engines import PeakSampler  # noqa: E402

MiB = 1 << 20
RUNS = 3
PEERS = ("dedupshm", "loky")


def _data(mib):
    rows = mib * MiB // (1024 * 8)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, 1024))
    y = (X[:, 0] + 0.1 * rng.standard_normal(rows) > 0).astype(int)
    return X, y


def _child(backend, mib):
    """One backend, in this (fresh) process: prints its figures as JSON."""
    import joblib
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import NearestCentroid
    X, y = _data(mib)
    if backend == "dedupshm":
        import dedupshm.joblib as dj
        dj.register()
        with joblib.parallel_config(backend="dedupshm"):
            dj.caller_store()
    store = None
    if backend == "dedupshm":
        c = dj.caller_store()
        store = c.store
        patterns = [os.path.join(store.directory, f"dedupshm.{c.name}.*")]
    else:
        patterns = [f"/dev/shm/joblib_memmapping_folder_{os.getpid()}_*",
                    f"/tmp/joblib_memmapping_folder_{os.getpid()}_*"]
    grid = {"shrink_threshold": [None, 0.1, 0.2, 0.5, 1.0]}
    out = []
    with joblib.parallel_config(backend=backend, n_jobs=2):
        # start the workers outside the timed runs
        joblib.Parallel()(joblib.delayed(abs)(i) for i in range(4))
        for _ in range(RUNS):
            idle = PeakSampler(patterns, store=store).sample()
            before = store.stats()["physical_bytes"] if store is not None else 0
            s = PeakSampler(patterns, store=store)
            s.start()
            t0 = time.perf_counter()
            gs = GridSearchCV(NearestCentroid(), grid, cv=2, n_jobs=2).fit(X, y)
            dt = time.perf_counter() - t0
            s.stop()
            # new pages in /dev/shm: for us, pages the store newly used (a
            # dedup hit uses none); for loky, its memmapping folders' peak
            written = s.peak_physical - before if store is not None else s.peak_shm
            out.append({"time": dt, "peak": max(s.peak - idle, 0), "written": written,
                        "score": float(gs.best_score_)})
    print(json.dumps(out))


def _measure(backend, mib):
    p = subprocess.run([sys.executable, __file__, "--child", backend, str(mib)],
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{backend} run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(quick=False, use_ray=True):
    res = Result("joblib", quick)
    try:
        import joblib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        res.finding("joblib / scikit-learn not installed (pip install 'dedupshm[joblib]'): skipped")
        return res
    mib = 32 if quick else 512
    figs = {b: _measure(b, mib) for b in PEERS}
    assert [f["score"] for f in figs["dedupshm"]] == [f["score"] for f in figs["loky"]]
    rows = []
    for i in range(RUNS):
        o, p = figs["dedupshm"][i], figs["loky"][i]
        rows.append([i + 1, f"{o['time']:.2f} s", f"{p['time']:.2f} s",
                     f"{p['time'] / o['time']:.2f}x", fmt_bytes(o["peak"]), fmt_bytes(p["peak"]),
                     f"{p['peak'] / max(o['peak'], 1):.2f}x", fmt_bytes(o["written"]),
                     fmt_bytes(p["written"])])
    print_table(f"GridSearchCV(NearestCentroid, 10 fits, n_jobs=2) on {mib} MiB of X, "
                f"{RUNS} runs in one process (ratios: loky / ours, > 1: ours better)",
                ["run", "time, dedupshm", "time, loky", "time ratio", "peak mem, dedupshm",
                 "peak mem, loky", "memory ratio", "new /dev/shm, dedupshm",
                 "new /dev/shm, loky"], rows)
    print("   peak memory above the idle caller: Pss_Anon + Pss_File of the caller and its"
          " workers plus the /dev/shm files in play (our store; joblib's memmapping folders)")
    for i in range(RUNS):
        o, p = figs["dedupshm"][i], figs["loky"][i]
        what = "first run" if i == 0 else f"run {i + 1}"
        res.row(f"{what}: time", o["time"], p["time"], "loky", "s")
        res.row(f"{what}: peak memory", o["peak"], p["peak"], "loky", "B")
        res.row(f"{what}: new /dev/shm bytes", o["written"], p["written"], "loky", "B")
    o, p = figs["dedupshm"][-1], figs["loky"][-1]
    res.target(f"run {RUNS}: new /dev/shm bytes", o["written"], p["written"], "loky", "B", "lower",
               "X not written again", o["written"] < MiB)
    res.target(f"run {RUNS}: time", o["time"], p["time"], "loky", "s", "lower",
               "not slower than loky", o["time"] <= p["time"] * 1.1)
    res.info["figures"] = figs
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
    else:
        run_standalone(run)
