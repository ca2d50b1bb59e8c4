"""dedupshm.pool.Pool vs multiprocessing.Pool vs joblib (memmapping).

Two jobs, each with 2 and 4 workers (fork; pools started and warmed before
timing):
  A. "same argument": 8 tasks that each receive the same 256 MiB array
     (--quick 64 MiB) and read all of it (arr.sum()).
  B. "large results": 8 tasks that each return a distinct 64 MiB array
     (--quick 16 MiB); the parent sums each result.

For each: wall time of the map; bytes pickled through the pipes (task
arguments and results pickled the way each pool sends them: plain pickle
for multiprocessing, our packed messages for dedupshm); bytes written by
write(2) in the parent and workers (/proc/PID/io wchar: pipes, and joblib's
memmap files); and the job's peak memory: sampled every 20 ms, the sum over
the parent and its descendants of Pss_Anon + Pss_File (private and file
pages, shared ones split) plus the increase of /proc/meminfo Shmem (all
shared memory: our store, joblib's /dev/shm files), and the peak of each
part.  Peers: multiprocessing.Pool, and joblib.Parallel(n_jobs,
max_nbytes='1M') (loky backend, memmaps array arguments >= 1 MB).

    python benchmarks/bench_pool.py [--quick]
"""
import argparse
import gc
import multiprocessing as mp
import os
import pickle
import re
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import fmt_bytes, print_table, temp_store  # noqa: E402

MiB = 1 << 20
TASKS = 8


# ---------------------------------------------------------------- measuring

def _descendants(root):
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
            ppid = int(s[s.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _rollup(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            t = f.read()
    except OSError:
        return 0
    v = 0
    for k in ("Pss_Anon", "Pss_File"):
        m = re.search(rf"^{k}:\s+(\d+) kB", t, re.M)
        v += int(m.group(1)) * 1024 if m else 0
    return v


def _wchar(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            return int(re.search(r"^wchar:\s+(\d+)", f.read(), re.M).group(1))
    except (OSError, AttributeError):
        return None


def _shmem():
    with open("/proc/meminfo") as f:
        return int(re.search(r"^Shmem:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


class Sampler(threading.Thread):
    def __init__(self, interval=0.02):
        super().__init__(daemon=True)
        self.interval = interval
        self.ev = threading.Event()
        self.shm0 = _shmem()
        self.peak = self.peak_pss = self.peak_shm = 0
        self.wchar0 = {}
        self.wchar = {}
        for p in _descendants(os.getpid()):
            w = _wchar(p)
            if w is not None:
                self.wchar0[p] = w

    def sample(self):
        pids = _descendants(os.getpid())
        pss = sum(_rollup(p) for p in pids)
        shm = _shmem() - self.shm0
        for p in pids:
            w = _wchar(p)
            if w is not None:
                self.wchar[p] = w
        self.peak = max(self.peak, pss + shm)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_shm = max(self.peak_shm, shm)

    def run(self):
        while not self.ev.is_set():
            self.sample()
            self.ev.wait(self.interval)

    def stop(self):
        self.ev.set()
        self.join()
        self.sample()

    def written(self):
        return sum(w - self.wchar0.get(p, 0) for p, w in self.wchar.items())


# ---------------------------------------------------------------- the jobs

def read_all(args):
    arr, i = args
    return float(arr.sum()) + i


def read_all2(arr, i):
    return float(arr.sum()) + i


def make_result(args):
    n, i = args
    return np.arange(n, dtype=np.float64) + i


def make_result2(n, i):
    return np.arange(n, dtype=np.float64) + i


def run_one(kind, peer, workers, arr, res_n, pools, capacity):
    """Returns dict(time, pickled, written, peak, peak_pss, peak_shm, check).
    dedupshm gets a fresh store and pool per run, so that the Shmem increase
    counts every page it uses."""
    if peer == "dedupshm":
        from dedupshm.pool import Pool
        with temp_store("pool", capacity=capacity) as store:
            pool = Pool(workers, store=store, context=mp.get_context("fork"))
            try:
                pool.map(abs, range(workers * 2))
                return _run_one(kind, peer, arr, res_n, pool, store)
            finally:
                pool.terminate()
                pool.join()
    return _run_one(kind, peer, arr, res_n, pools[(peer, workers)], None)


def _run_one(kind, peer, arr, res_n, pool, store):
    gc.collect()
    if kind == "A":
        tasks = [(arr, i) for i in range(TASKS)]
    else:
        tasks = [(res_n, i) for i in range(TASKS)]
    s = Sampler()
    s.start()
    t0 = time.perf_counter()
    if peer == "joblib":
        from joblib import delayed
        fn = read_all2 if kind == "A" else make_result2
        out = pool(delayed(fn)(*t) for t in tasks)
    else:
        out = pool.map(read_all if kind == "A" else make_result, tasks)
    if kind == "B":
        check = sum(float(o[::4096].sum()) for o in out)
    else:
        check = sum(out)
    dt = time.perf_counter() - t0
    s.stop()
    # bytes through the pipes, pickled the way this pool pickles them
    if peer == "dedupshm":
        from dedupshm.pool import pack
        pickled = sum(len(pickle.dumps(pack(t, store))) for t in tasks)
        if kind == "B":
            pickled += sum(len(pickle.dumps(pack(o, store))) for o in out)
        else:
            pickled += sum(len(pickle.dumps(pack(o, store))) for o in out)
    elif peer == "mp":
        pickled = sum(len(pickle.dumps(t)) for t in tasks) + sum(len(pickle.dumps(o)) for o in out)
    else:
        pickled = None
    del out, tasks
    gc.collect()
    return {"time": dt, "pickled": pickled, "written": s.written(), "peak": s.peak,
            "peak_pss": s.peak_pss, "peak_shm": s.peak_shm, "check": check}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    arg_mib, res_mib = (64, 16) if a.quick else (256, 64)
    try:
        import joblib
        have_joblib = True
    except ImportError:
        have_joblib = False
        print("joblib not installed (pip install joblib): its column is skipped")
    arr = np.random.default_rng(0).random(arg_mib * MiB // 8)
    res_n = res_mib * MiB // 8
    peers = ["dedupshm", "mp"] + (["joblib"] if have_joblib else [])
    results = {}
    fork = mp.get_context("fork")
    capacity = f"{max(4 * arg_mib, 16 * res_mib) + 256}MiB"
    gc.collect()
    gc.freeze()     # forked workers: keep the collector from unsharing the parent's heap (all peers)
    base = _rollup(os.getpid())          # the parent alone, with the argument array
    for workers in (2, 4):
        for peer in peers:
            pools = {}
            try:
                if peer == "mp":
                    pools[("mp", workers)] = p = fork.Pool(workers)
                    p.map(abs, range(workers * 2))            # start the workers
                elif peer == "joblib":
                    pools[("joblib", workers)] = p = joblib.Parallel(n_jobs=workers, max_nbytes="1M")
                    p(joblib.delayed(abs)(i) for i in range(workers * 2))
                for kind in ("A", "B"):
                    r = run_one(kind, peer, workers, arr, res_n, pools, capacity)
                    r["peak"] -= base
                    results[(kind, workers, peer)] = r
            finally:
                if peer == "mp":
                    pools[("mp", workers)].terminate()
                    pools[("mp", workers)].join()
                elif peer == "joblib":
                    from joblib.externals.loky import get_reusable_executor
                    get_reusable_executor().shutdown(wait=True)
    titles = {"A": f"A: {TASKS} tasks, each gets the same {arg_mib} MiB array",
              "B": f"B: {TASKS} tasks, each returns a {res_mib} MiB array"}
    for kind in ("A", "B"):
        rows = []
        for workers in (2, 4):
            ours = results[(kind, workers, "dedupshm")]
            for peer in peers:
                r = results[(kind, workers, peer)]
                assert abs(r["check"] - ours["check"]) <= 1e-6 * abs(ours["check"]) + 1e-6, (kind, peer)
                label = {"dedupshm": "dedupshm.pool.Pool", "mp": "multiprocessing.Pool",
                         "joblib": "joblib memmap 1M"}[peer]
                ratio = lambda k: (f"{r[k] / ours[k]:.1f}x" if peer != "dedupshm" and r[k] and ours[k]  # noqa: E731
                                   else "-")
                rows.append([workers, label, f"{r['time']:.3f} s", ratio("time"),
                             fmt_bytes(r["pickled"]) if r["pickled"] is not None else "n/a",
                             fmt_bytes(r["written"]), fmt_bytes(r["peak"]), ratio("peak"),
                             fmt_bytes(r["peak_pss"]), fmt_bytes(r["peak_shm"])])
        print_table(titles[kind] + " (ratios: peer / ours, > 1: ours better)",
                    ["workers", "pool", "wall", "time ratio", "pickled via pipes",
                     "write(2) bytes", "peak job memory*", "memory ratio",
                     "peak Pss anon+file", "peak Shmem delta"], rows)
        print("   * sum of Pss_Anon + Pss_File of the parent and all its descendants plus the"
              " Shmem increase, less the parent's own memory before the pool started")


if __name__ == "__main__":
    main()
