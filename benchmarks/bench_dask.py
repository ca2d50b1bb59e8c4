"""Dask distributed with and without dedupshm.dask.StorePlugin.

One host, a LocalCluster of 2 worker processes x 1 thread (memory limit
6 GiB each, so neither pauses nor spills), started fresh for each peer:

  broadcast  client.scatter(x, broadcast=True) of a 256 MiB array
             (--quick 32 MiB): it ends on both workers;
  graph      a task makes a 256 MiB array on worker 0; 4 tasks (2 on each
             worker) read all of it;
  transfer   a 256 MiB result held by worker 0 is the input of a task
             pinned to worker 1 (the dependency transfer alone is timed).

For each: wall time and the peak host memory above the idle cluster --
the Pss_Anon + Pss_File of the client, scheduler, nannies and workers plus
the blocks of the host store's files less its freed pages kept warm for
reuse, sampled every 20 ms (no machine-wide counter).  Medians of 3 repeats (--quick: 1).  Peer: the same cluster
without the plugin (Dask's own serialization, bytes over loopback TCP).

    python benchmarks/bench_dask.py [--quick]
"""
import gc
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from _common import Result, fmt_bytes, median, print_table, run_standalone  # noqa: E402
from _engines import PeakSampler  # noqa: E402

MiB = 1 << 20
PEERS = ("dedupshm", "dask")


def make(nbytes, seed):
    n = nbytes // 8
    return np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)


def read_all(x, i):
    return int(np.bitwise_xor.reduce(x)) ^ i


def _held(dask_worker):
    return len(dask_worker.data)


def _settle(c, timeout=60):
    """Wait until the workers hold nothing (released keys go asynchronously)."""
    deadline = time.monotonic() + timeout
    while any(c.run(_held).values()):
        if time.monotonic() > deadline:
            raise RuntimeError("the workers still hold data")
        time.sleep(0.05)
    c.run(gc.collect)
    gc.collect()


def _measure(c, patterns, job, store):
    """(wall time, peak memory above idle, memory held after above idle)."""
    gc.collect()
    idle = PeakSampler(patterns, store=store).sample()
    s = PeakSampler(patterns, store=store)
    s.start()
    t0 = time.perf_counter()
    keep = job()
    dt = time.perf_counter() - t0
    s.stop()
    after = s.sample()
    del keep
    return dt, max(s.peak - idle, 0), max(after - idle, 0)


def _scenarios(c, nbytes, seed):
    from distributed import wait
    w0, w1 = sorted(c.scheduler_info()["workers"])
    x = make(nbytes, seed)
    expect = read_all(x, 0)

    def broadcast():
        f = c.scatter(x, broadcast=True, hash=False)
        assert len(c.who_has(f)[f.key]) == 2
        return f

    def graph():
        a = c.submit(make, nbytes, seed + 1, workers=[w0], pure=False)
        fs = [c.submit(read_all, a, i, workers=[w], pure=False)
              for i, w in enumerate([w0, w1, w0, w1])]
        out = c.gather(fs)
        assert out[0] == read_all(make(nbytes, seed + 1), 0)
        return a, fs

    def transfer_setup():
        a = c.submit(make, nbytes, seed, workers=[w0], pure=False)
        wait(a)
        return a

    return {"broadcast": (None, broadcast), "graph": (None, graph),
            "transfer": (transfer_setup, lambda a: (a, c.submit(read_all, a, 0, workers=[w1],
                                                                pure=False).result() == expect))}


def _run_peer(peer, nbytes, reps):
    from distributed import Client, LocalCluster
    from dedupshm.dask import StorePlugin, host_identity, store_name
    out = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="6GiB",
                      dashboard_address=None) as cl, Client(cl) as c:
        store = None
        name = store_name(host_identity(), c.scheduler.address)
        if peer == "dedupshm":
            c.register_plugin(StorePlugin())
            from dedupshm import Store
            store = Store(name)             # for its counters (warm pages are not in use)
        patterns = [f"/dev/shm/dedupshm.{name}.*"]
        c.run(abs, 1)
        for rep in range(reps):
            for what, (setup, job) in _scenarios(c, nbytes, 100 * rep).items():
                _settle(c)
                if setup is None:
                    fig = _measure(c, patterns, job, store)
                else:
                    a = setup()
                    fig = _measure(c, patterns, lambda: job(a), store)
                    del a
                out.setdefault(what, []).append(fig)
        if store is not None:
            store.close()                   # or the last worker would not remove it
            del store
            gc.collect()
    return out


def _mem_ratio(m):
    if m["dedupshm"] < MiB:                 # nothing measurable: do not divide by noise
        return f"> {m['dask'] / MiB:.0f}x"
    return f"{m['dask'] / m['dedupshm']:.2f}x"


def run(quick=False, use_ray=True):
    try:
        import distributed  # noqa: F401
    except ImportError:
        res = Result("dask", quick)
        res.finding("dask[distributed] not installed (pip install 'dedupshm[dask]'): skipped")
        return res
    mib = 32 if quick else 256
    reps = 1 if quick else 3
    nbytes = mib * MiB
    res = Result("dask", quick)
    figs = {p: _run_peer(p, nbytes, reps) for p in PEERS}
    rows = []
    for what in ("broadcast", "graph", "transfer"):
        t = {p: median([f[0] for f in figs[p][what]]) for p in PEERS}
        m = {p: median([f[1] for f in figs[p][what]]) for p in PEERS}
        h = {p: median([f[2] for f in figs[p][what]]) for p in PEERS}
        rows.append([what, f"{t['dedupshm']:.3f} s", f"{t['dask']:.3f} s",
                     f"{t['dask'] / t['dedupshm']:.2f}x", fmt_bytes(m["dedupshm"]),
                     fmt_bytes(m["dask"]), _mem_ratio(m), fmt_bytes(h["dedupshm"]),
                     fmt_bytes(h["dask"])])
        res.row(f"{what} {mib} MiB: time", t["dedupshm"], t["dask"], "dask, no plugin", "s")
        res.row(f"{what} {mib} MiB: peak host memory", m["dedupshm"], m["dask"],
                "dask, no plugin", "B")
        r = res.target(f"{what} {mib} MiB peak memory", m["dedupshm"], m["dask"],
                       "dask, no plugin", "B", "lower", "less than without", m["dedupshm"] < m["dask"])
        r["time_ours"], r["time_peer"] = t["dedupshm"], t["dask"]
    print_table(f"Dask, 2 workers x 1 thread, one host, {mib} MiB, median of {reps} "
                "(ratios: without / with the plugin, > 1: the plugin is better)",
                ["scenario", "time, plugin", "time, no plugin", "time ratio",
                 "peak mem, plugin", "peak mem, no plugin", "peak ratio",
                 "held after, plugin", "held after, no plugin"], rows)
    print("   host memory above the idle cluster: Pss_Anon + Pss_File of every process of the"
          " cluster and the client, plus the host store's file blocks; 'held after': when the"
          " scenario's values are in place")
    res.info["figures"] = {p: {k: v for k, v in figs[p].items()} for p in PEERS}
    return res


if __name__ == "__main__":
    run_standalone(run)
