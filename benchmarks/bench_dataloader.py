"""DataLoader workers over a dataset of Python objects, and a shared sample cache.

1. A real torch.utils.data.DataLoader, 4 workers (fork), shuffled, over a
   dataset of N small Python dicts (1M; --quick 100k) held as a plain list
   (the peer) vs a dedupshm.SharedSequence.  A sampler thread reads
   /proc/PID/smaps_rollup of the main process and the workers every 0.1 s:
   total Pss (shared pages split between their users) and each worker's Uss
   (its private pages).  Readers of a plain list write the objects'
   reference counts, so every page a worker reads becomes its private copy
   (pytorch #13246); a SharedSequence's pages are only read.  "Idle worker"
   is a worker of the same loader over a 1,000-item dataset.
   Target: worker Uss within 20 MB of an idle worker's while iterating.
2. A sample cache where 50% of samples repeat: 2 epochs over M decoded
   "images" (3x64x64 float32, 48 KiB; sample i equals sample i ^ 1), 4
   workers: a per-worker dict cache (the usual peer) vs
   dedupshm.torch.CachedDataset.  Total Pss of main + workers after each
   epoch, the store's physical bytes, and epoch times.

    python benchmarks/bench_dataloader.py [--quick]
"""
import argparse
import gc
import os
import re
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import fmt_bytes, print_table, store_name, temp_store  # noqa: E402

MB = 1e6


def rollup(pid):
    """(Pss, Uss) of a process in bytes, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    get = lambda k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) * 1024  # noqa: E731
    return get("Pss"), get("Private_Clean") + get("Private_Dirty")


class Sampler(threading.Thread):
    """Samples Pss/Uss of this process and its loader's workers."""

    def __init__(self, worker_pids, interval=0.1):
        super().__init__(daemon=True)
        self.worker_pids = worker_pids      # a callable returning the current pids
        self.interval = interval
        self.stop_ev = threading.Event()
        self.samples = []                   # (t, total_pss, [worker uss])

    def run(self):
        t0 = time.monotonic()
        while not self.stop_ev.is_set():
            me = rollup(os.getpid())
            ws = [r for r in (rollup(p) for p in self.worker_pids()) if r]
            if me:
                self.samples.append((time.monotonic() - t0, me[0] + sum(w[0] for w in ws),
                                     [w[1] for w in ws]))
            self.stop_ev.wait(self.interval)

    def stop(self):
        self.stop_ev.set()
        self.join()

    def peak_total_pss(self):
        return max((s[1] for s in self.samples), default=0)

    def peak_worker_uss(self):
        return max((max(s[2]) for s in self.samples if s[2]), default=0)


def count_batch(batch):
    """collate_fn: keep the transport tiny, the work is reading the items."""
    return sum(x["id"] for x in batch)


def make_items(n):
    return [{"id": i, "name": f"sample-{i:07d}", "label": i % 1000, "score": i * 0.25,
             "tags": ["a", "b", "c"][: i % 4]} for i in range(n)]


def iterate(torch, dataset, workers, batch_size=256, seed=0):
    """One shuffled epoch; returns (seconds, checksum, sampler)."""
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=g, num_workers=workers,
                                         collate_fn=count_batch,
                                         multiprocessing_context="fork")
    it = iter(loader)
    pids = lambda: [w.pid for w in getattr(it, "_workers", [])]  # noqa: E731
    sampler = Sampler(pids)
    sampler.start()
    t0 = time.perf_counter()
    total = 0
    try:
        for s in it:
            total += s
    finally:
        elapsed = time.perf_counter() - t0
        sampler.stop()
    return elapsed, total, sampler


def bench_sequence(torch, store, n, workers):
    rows = {}
    # idle worker: same loader, 1,000 items
    _, _, idle = iterate(torch, make_items(1000), workers)
    rows["idle"] = idle
    gc.collect()
    # the peer: a plain list
    data = make_items(n)
    gc.collect()
    t_list, total, s_list = iterate(torch, data, workers)
    assert total == n * (n - 1) // 2
    rows["list"] = (t_list, s_list)
    # ours: put once, drop the list
    t0 = time.perf_counter()
    ref = store.put_sequence(data) if hasattr(store, "put_sequence") else None
    if ref is None:
        from dedupshm.sequence import put_sequence
        ref = put_sequence(store, data)
    t_put = time.perf_counter() - t0
    del data
    gc.collect()
    seq = store.get(ref)
    t_seq, total, s_seq = iterate(torch, seq, workers)
    assert total == n * (n - 1) // 2
    rows["seq"] = (t_seq, s_seq)
    rows["put_s"] = t_put
    rows["seq_bytes"] = seq.nbytes
    del seq, ref
    gc.collect()
    return rows


# ---------------------------------------------------------------- sample cache

class Decoded:
    """Map-style dataset whose samples cost a decode: 3x64x64 float32 from
    a seed; samples i and i ^ 1 are equal (50% repeat)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch
        rng = np.random.default_rng(i // 2)
        img = rng.standard_normal((3, 64, 64), dtype=np.float32)
        return {"image": torch.from_numpy(img), "label": (i // 2) % 10}


class PerWorkerCache:
    """The usual cache: a dict in each worker process."""

    def __init__(self, ds):
        self.ds = ds
        self.cache = {}

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        v = self.cache.get(i)
        if v is None:
            v = self.cache[i] = self.ds[i]
        return v


def bench_cache(torch, store, m, workers):
    from dedupshm.torch import CachedDataset
    out = {}
    for label, ds in (("per-worker dict", PerWorkerCache(Decoded(m))),
                      ("dedupshm CachedDataset", CachedDataset(Decoded(m), store))):
        g = torch.Generator().manual_seed(1)
        loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, generator=g,
                                             num_workers=workers, persistent_workers=True,
                                             multiprocessing_context="fork")
        it = None
        epochs = []
        try:
            for epoch in range(2):
                it = iter(loader)
                t0 = time.perf_counter()
                n = 0
                for b in it:
                    n += len(b["label"])
                dt = time.perf_counter() - t0
                pids = [w.pid for w in it._workers]
                total = sum(r[0] for r in (rollup(p) for p in pids + [os.getpid()]) if r)
                epochs.append((dt, total))
                assert n == m
        finally:
            del it, loader
            gc.collect()
        out[label] = epochs
    st = store.stats()
    out["store"] = (st["logical_bytes"], st["physical_bytes"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("torch not installed (pip install torch==2.13.0): skipped")
        return
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    n = 100_000 if a.quick else 1_000_000
    m = 2_000 if a.quick else 10_000
    w = a.workers
    with temp_store("dataloader", capacity="4GiB") as store:
        r = bench_sequence(torch, store, n, w)
    idle = r["idle"].peak_worker_uss()
    t_list, s_list = r["list"]
    t_seq, s_seq = r["seq"]
    rows = [
        ["epoch time", f"{t_list:.2f} s", f"{t_seq:.2f} s", f"{t_list / t_seq:.2f}x"],
        ["peak total Pss (main + workers)", fmt_bytes(s_list.peak_total_pss()),
         fmt_bytes(s_seq.peak_total_pss()), f"{s_list.peak_total_pss() / s_seq.peak_total_pss():.2f}x"],
        ["peak Uss of one worker", fmt_bytes(s_list.peak_worker_uss()),
         fmt_bytes(s_seq.peak_worker_uss()), f"{s_list.peak_worker_uss() / s_seq.peak_worker_uss():.2f}x"],
        ["  minus an idle worker's Uss", fmt_bytes(s_list.peak_worker_uss() - idle),
         fmt_bytes(s_seq.peak_worker_uss() - idle), "-"],
    ]
    print_table(f"DataLoader, {w} workers, {n:,} dicts, one shuffled epoch "
                f"(idle worker Uss {fmt_bytes(idle)}; put_sequence {r['put_s']:.2f} s, "
                f"{fmt_bytes(r['seq_bytes'])} serialized)",
                ["measurement", "plain list (peer)", "SharedSequence", "ratio (>1: ours better)"], rows)
    print("   total Pss over time (s: MiB), list: " + ", ".join(
        f"{t:.1f}: {p / 2**20:.0f}" for t, p, _ in s_list.samples[:: max(1, len(s_list.samples) // 8)]))
    print("   total Pss over time (s: MiB), seq:  " + ", ".join(
        f"{t:.1f}: {p / 2**20:.0f}" for t, p, _ in s_seq.samples[:: max(1, len(s_seq.samples) // 8)]))
    extra = (s_seq.peak_worker_uss() - idle) / MB
    print(f"   TARGET worker Uss within 20 MB of an idle worker's: {extra:.1f} MB -> "
          f"{'met' if extra <= 20 else 'NOT met'}")

    with temp_store("dlcache", capacity="4GiB") as store:
        c = bench_cache(torch, store, m, w)
    rows = []
    for e in range(2):
        a_t, a_p = c["per-worker dict"][e]
        b_t, b_p = c["dedupshm CachedDataset"][e]
        rows.append([f"epoch {e + 1}: time", f"{a_t:.2f} s", f"{b_t:.2f} s", f"{a_t / b_t:.2f}x"])
        rows.append([f"epoch {e + 1}: total Pss main + workers", fmt_bytes(a_p), fmt_bytes(b_p),
                     f"{a_p / b_p:.2f}x"])
    logical, physical = c["store"]
    rows.append(["store: logical / physical", "-", f"{fmt_bytes(logical)} / {fmt_bytes(physical)}", "-"])
    print_table(f"Sample cache, {m:,} samples of 48 KiB, 50% repeated, {w} workers, 2 epochs",
                ["measurement", "per-worker dict (peer)", "CachedDataset", "ratio (>1: ours better)"],
                rows)


if __name__ == "__main__":
    _ = store_name
    main()
