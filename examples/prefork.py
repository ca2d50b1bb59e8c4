"""Pre-fork server: gunicorn workers that hold the same weights, once.

Starts gunicorn on 127.0.0.1 (a free port) with 4 workers that each need
the same 64 MiB of "model weights" (a .npy file), sends 100 requests, and
prints the workers' total Pss (proportional set size: shared pages are
split between the processes that map them) -- once with every worker
loading its own copy, once with ``dedupshm.server.shared_load``.

    python examples/prefork.py [--mib 64] [--workers 4] [--requests 100]

(needs gunicorn: pip install '.[server]')

This file is also the WSGI app gunicorn runs (``prefork:app``), configured
by environment variables: PREFORK_MODE (none, plain, store, mergeable),
PREFORK_WEIGHTS (the .npy file), PREFORK_STORE (the store's name) and
PREFORK_READY (a directory where each worker leaves a file once loaded).
benchmarks/bench_prefork.py uses :func:`run` for its figures.
"""
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20

# ------------------------------------------------------------------ the app

MODE = os.environ.get("PREFORK_MODE")
WEIGHTS = None


def _load_weights():
    import dedupshm
    from dedupshm.server import load_mergeable, shared_load
    path = os.environ["PREFORK_WEIGHTS"]
    if MODE in ("plain", "preload"):
        return np.load(path)                              # a private copy per process
    store = dedupshm.Store(os.environ["PREFORK_STORE"])
    if MODE == "store":
        return shared_load(store, "weights", lambda: np.load(path))   # one copy for all
    if MODE == "mergeable":
        return load_mergeable(store, lambda: np.load(path))           # merged in the background
    raise ValueError(f"PREFORK_MODE {MODE!r}")


if MODE == "none":              # the baseline: same imports and attachment, no weights
    import dedupshm
    _STORE = dedupshm.Store(os.environ["PREFORK_STORE"])
elif MODE:
    WEIGHTS = _load_weights()
if os.environ.get("PREFORK_READY"):
    open(os.path.join(os.environ["PREFORK_READY"], str(os.getpid())), "w").close()


def app(environ, start_response):
    """GET /?i=N -> {"pid", "sum"}: sums 1024 weights from index N."""
    i = int((environ.get("QUERY_STRING") or "i=0").partition("=")[2] or 0)
    s = 0.0
    if WEIGHTS is not None:
        i %= max(len(WEIGHTS) - 1024, 1)
        s = float(WEIGHTS[i:i + 1024].sum())
    body = json.dumps({"pid": os.getpid(), "sum": s}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


# ------------------------------------------------------------------ the runner

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid):
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def pss(pid):
    """Pss of a process in bytes (smaps_rollup)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        m = re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024


def run(mode, mib=64, workers=4, requests=100, merge_timeout=60.0, verbose=False):
    """Serve with gunicorn in ``mode`` (none, plain, preload, store,
    store-preload, mergeable); return a dict of measurements."""
    import dedupshm
    tmp = tempfile.mkdtemp(prefix="dedupshm-prefork-")
    weights_path = os.path.join(tmp, "weights.npy")
    ready = os.path.join(tmp, "ready")
    os.mkdir(ready)
    rng = np.random.default_rng(0)
    np.save(weights_path, rng.standard_normal(mib * MiB // 8))
    name = f"prefork{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    store = dedupshm.Store(name, create=True, capacity=f"{4 * mib + 64}MiB")
    port = free_port()
    app_mode = {"store-preload": "store", "none-preload": "none"}.get(mode, mode)
    env = dict(os.environ, PREFORK_MODE=app_mode, PREFORK_WEIGHTS=weights_path,
               PREFORK_STORE=name, PREFORK_READY=ready, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}",
           "--chdir", HERE, "--timeout", "120", "--graceful-timeout", "5",
           "--log-level", "warning"]
    preload = mode in ("preload", "store-preload", "none-preload")
    if preload:
        cmd.append("--preload")
    cmd.append("prefork:app")
    shm0 = _meminfo_shmem()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=None if verbose else subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        want = 1 if preload else workers          # with --preload the master imports the app
        while len(os.listdir(ready)) < want or len(_children(proc.pid)) < workers:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("gunicorn workers did not load in time")
            time.sleep(0.05)
        loaded_s = time.monotonic() - t0
        url = f"http://127.0.0.1:{port}/"
        pids, t1 = set(), time.monotonic()
        for k in range(requests):
            for attempt in range(50):
                try:
                    with urllib.request.urlopen(f"{url}?i={k * 4099}", timeout=5) as r:
                        pids.add(json.loads(r.read())["pid"])
                    break
                except OSError:
                    if attempt == 49 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        req_s = time.monotonic() - t1
        merged_s = None
        if mode == "mergeable":
            target = 0.9 * workers * (mib * MiB // 4096)
            t2 = time.monotonic()
            while store.stats()["pages_merged"] < target and time.monotonic() - t2 < merge_timeout:
                time.sleep(0.1)
            merged_s = time.monotonic() - t2
        wpids = _children(proc.pid)
        workers_pss = sum(pss(p) for p in wpids)
        master_pss = pss(proc.pid)
        st = store.stats()
        return {"mode": mode, "workers": len(wpids), "workers_pss": workers_pss,
                "master_pss": master_pss, "shmem_delta": _meminfo_shmem() - shm0,
                "store_physical": st["physical_bytes"], "pages_merged": st["pages_merged"],
                "load_s": loaded_s, "requests": requests, "requests_s": req_s,
                "pids_answering": len(pids), "merge_s": merged_s, "one_copy": mib * MiB}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        store.unlink()
        store.close()
        for f in os.listdir(ready):
            os.unlink(os.path.join(ready, f))
        os.rmdir(ready)
        os.unlink(weights_path)
        os.rmdir(tmp)


def _meminfo_shmem():
    with open("/proc/meminfo") as f:
        return int(re.search(r"^Shmem:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=100)
    a = ap.parse_args()
    if importlib.util.find_spec("gunicorn") is None:
        sys.exit("examples/prefork.py needs gunicorn, which is not installed: "
                 "pip install '.[server]' (from the checkout; or pip install gunicorn)")
    base = run("none", a.mib, a.workers, a.requests)
    rows = [run(m, a.mib, a.workers, a.requests) for m in ("plain", "store")]
    print(f"{a.workers} gunicorn workers, {a.mib} MiB of weights each, {a.requests} requests")
    print(f"  workers' Pss without weights: {base['workers_pss'] / MiB:7.1f} MiB")
    for r in rows:
        extra = (r["workers_pss"] - base["workers_pss"]) / r["one_copy"]
        print(f"  {r['mode']:>6}: workers' Pss {r['workers_pss'] / MiB:7.1f} MiB "
              f"= baseline + {extra:.2f} copies of the weights")


if __name__ == "__main__":
    main()
