"""``dedupshm demo``: worker processes put overlapping data into one store.

Each worker stores the same "model" array (same seed), a few arrays that
differ from it in a handful of pages, its own unique array, a mostly-zero
buffer, and some small records.  The demo prints what the store holds,
what dedup saved according to its own counters, and what the kernel says
(/proc/meminfo Shmem) compared with storing every value separately.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import IO, Any, Optional

import numpy as np

from .store import Store


def shmem_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(name: str, wid: int, mib: int, q: Any) -> None:
    store = Store(name)
    n = (mib << 20) // 8
    model = np.random.default_rng(1234).standard_normal(n)        # same in every worker
    store.put(model, key=f"w{wid}/model")
    tweaked = model.copy()
    tweaked[:: n // 4] += wid + 1                                  # 4 pages differ
    store.put(tweaked, key=f"w{wid}/finetuned")
    own = np.random.default_rng(wid).standard_normal(n // 8)       # unique to this worker
    store.put(own, key=f"w{wid}/own")
    sparse = np.zeros(n // 4)
    sparse[::4096] = wid                                           # mostly zero pages
    store.put(sparse, key=f"w{wid}/sparse")
    for i in range(200):                                           # small records, half shared
        store.put({"id": i % 100, "label": f"item-{i % 100}"}, key=f"w{wid}/rec{i}")
    logical = model.nbytes + tweaked.nbytes + own.nbytes + sparse.nbytes
    q.put((wid, logical))
    store.close()


def run_demo(workers: int = 4, mib: int = 64, out: Optional[IO[str]] = None, keep: bool = False,
             record: Optional[str] = None) -> int:
    import sys
    out = out or sys.stdout
    name = f"demo-{os.getpid()}"
    before = shmem_bytes()
    store = Store(name, create=True, capacity="4GiB", warm_bytes=0)
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        t0 = time.perf_counter()
        procs = [ctx.Process(target=_worker, args=(name, w, mib, q)) for w in range(workers)]
        recorder = None
        if record:
            from .record import Recorder
            recorder = Recorder(store, record, interval=0.1).start()
        for p in procs:
            p.start()
        try:
            results = [q.get(timeout=300) for _ in procs]
            for p in procs:
                p.join(60)
        finally:
            if recorder is not None:
                recorder.stop()
        elapsed = time.perf_counter() - t0
        s = store.stats()
        after = shmem_bytes()
        naive = sum(r[1] for r in results)
        mib_ = 1 << 20
        out.write(f"dedupshm demo: {workers} worker processes put overlapping data into store {name!r} "
                  f"in {elapsed:.1f} s\n\n")
        rows = [
            ("objects stored", f"{s['objects']:,}"),
            ("logical bytes (what was put)", f"{s['logical_bytes'] / mib_:,.1f} MiB"),
            ("physical bytes (what is stored)", f"{s['physical_bytes'] / mib_:,.1f} MiB"),
            ("dedup ratio (stats)", f"{s['dedup_ratio']:.2f}x"),
            ("pages shared / sharing", f"{s['pages_shared']:,} / {s['pages_sharing']:,}"),
            ("all-zero pages (cost nothing)", f"{s['pages_zero']:,}"),
            ("metadata", f"{s['metadata_bytes'] / mib_:,.2f} MiB"),
            ("kernel Shmem increase", f"{(after - before) / mib_:,.1f} MiB"),
            ("without dedup it would be about", f"{naive / mib_:,.1f} MiB"),
        ]
        w = max(len(r[0]) for r in rows)
        for label, value in rows:
            out.write(f"  {label:<{w}}  {value:>14}\n")
        saved = naive - (after - before)
        out.write(f"\nsaved {saved / mib_:,.1f} MiB of shared memory "
                  f"({100.0 * saved / naive if naive else 0:.0f}% of the arrays' size), "
                  "measured by the kernel.\n")
        if recorder is not None:
            out.write(f"recorded {recorder.count} samples to {record}: "
                      f"`dedupshm plot {record} --out demo.png` draws them\n")
        if keep:
            out.write(f"store kept: try `dedupshm stats {name}` and `dedupshm rm {name}`\n")
        return 0 if all(p.exitcode == 0 for p in procs) else 1
    finally:
        store.close()
        if not keep:
            store.unlink()
