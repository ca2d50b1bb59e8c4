"""Concurrency stress and a leak soak.

* N processes x T threads do mixed put/get/delete/create/ref work on shared
  keys for a bounded time; every value read is checked against the checksum
  embedded in it: zero mismatches, and check() clean afterwards.
* Soak: put/get/delete cycles of mixed sizes with the merger running; Rss,
  the store's files and open file descriptors end where they started (after warm-up).
  `python tests/test_stress.py --cycles 100000` runs the full soak and prints
  the curve.
"""
import gc
import multiprocessing as mp
import os
import random
import sys
import threading
import time
import zlib

import numpy as np
import pytest

import dedupshm
from helpers import MiB, store_bytes

SIZES = [16, 700, 2500, 3 * 4096 + 5, 40_000, 300_000, 2 * MiB]


def make_value(seed, size):
    """Bytes whose last 4 bytes are the crc32 of the rest."""
    body = np.random.default_rng(seed).integers(0, 256, max(size - 4, 0), dtype=np.uint8).tobytes()
    return body + zlib.crc32(body).to_bytes(4, "little")


def valid(buf):
    b = bytes(buf)
    return len(b) >= 4 and zlib.crc32(b[:-4]) == int.from_bytes(b[-4:], "little")


def _stress_proc(name, seconds, threads, seed, q):
    s = dedupshm.Store(name)
    stop = time.monotonic() + seconds
    counts = {"ops": 0, "bad": 0, "errors": []}
    lock = threading.Lock()

    def run(tid):
        rng = random.Random(seed * 100 + tid)
        refs = []
        ops = bad = 0
        while time.monotonic() < stop:
            key = f"k{rng.randrange(40)}"
            op = rng.random()
            try:
                if op < 0.35:
                    s.put(make_value(rng.randrange(1 << 30), rng.choice(SIZES)), key=key)
                elif op < 0.45:
                    v = make_value(rng.randrange(1 << 30), rng.choice(SIZES[3:]))
                    with s.create(key, len(v)) as buf:
                        buf[:] = v
                elif op < 0.75:
                    try:
                        bad += not valid(s[key])
                    except KeyError:
                        pass
                elif op < 0.85:
                    try:
                        del s[key]
                    except KeyError:
                        pass
                else:
                    if refs and rng.random() < 0.5:
                        bad += not valid(s.get(refs.pop()))
                    else:
                        refs.append(s.put(make_value(rng.randrange(1 << 30), rng.choice(SIZES[:5]))))
                ops += 1
            except Exception as e:  # noqa: BLE001
                with lock:
                    counts["errors"].append(repr(e))
                return
        with lock:
            counts["ops"] += ops
            counts["bad"] += bad

    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put(counts)


@pytest.mark.limit(120)
def test_processes_and_threads_mixed_ops_no_mismatch(make_store, store_name, procs):
    s = make_store(store_name, capacity="1GiB")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    n = 3
    for i in range(n):
        procs.start(ctx, _stress_proc, store_name, 6.0, 3, i + 1, q)
    results = [q.get(timeout=90) for _ in range(n)]
    total = sum(r["ops"] for r in results)
    assert all(not r["errors"] for r in results), [r["errors"][:3] for r in results]
    assert sum(r["bad"] for r in results) == 0
    assert total > 500, total
    s.gc()
    rep = s.check()
    assert rep.ok, rep.errors
    for k in list(s):
        assert valid(s[k])


# ---------------------------------------------------------------- soak

def _fds():
    return len(os.listdir("/proc/self/fd"))


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(cycles, name, report_every=None):
    """Run the cycles; return [(cycle, rss, store file bytes, fds)] samples."""
    s = dedupshm.Store(name, create=True, capacity="512MiB", warm_bytes=0)
    s.merger.start(target_scan_s=0.1)
    rng = random.Random(5)
    m = s.mergeable_array(2 * MiB, np.uint8)
    samples = []
    live = []
    old = None
    try:
        for i in range(cycles):
            v = make_value(rng.randrange(1 << 20), rng.choice(SIZES))
            ref = s.put(v, key=f"k{i % 50}") if i % 3 else s.put(v)
            live.append(ref)
            got = s.get(ref)
            if not valid(got):
                raise AssertionError(f"cycle {i}: bad value")
            del got
            if len(live) > 20:
                old = live.pop(0)
                try:
                    s.delete(old)
                except KeyError:
                    pass
            if i % 97 == 0:
                m[: 4096 * 8] = np.frombuffer(v[: 4096 * 8].ljust(4096 * 8, b"\0"), np.uint8)
            if report_every and i % report_every == 0:
                gc.collect()
                samples.append((i, _rss(), store_bytes(name), _fds()))
        live.clear()
        ref = old = None                    # our last references
        for k in list(s):
            del s[k]
        # the mergeable region's merged pages are real pool pages: let go
        # of it too before counting what is left
        s.merger.stop()
        m = None
        gc.collect()
        samples.append((cycles, _rss(), store_bytes(name), _fds()))
        return samples, s.stats(), s.check()
    finally:
        s.merger.stop()
        m = None
        s.close()
        s.unlink()


# ================================================================ no write lost in mergeable memory

def test_zero_write_to_a_merged_page_is_kept(store):
    """A page merged onto a pool page, then written with zeros: the merger
    must not drop it with MADV_DONTNEED -- on a MAP_PRIVATE mapping of the
    pool file that throws the process's copy away and the page reads the
    pool page's old bytes again (a lost write; found by the fork campaign)."""
    page = np.frombuffer(np.random.default_rng(3).bytes(4096), np.uint8)
    store.put(page, key="p")
    m = store.mergeable_array(4 * 4096, np.uint8).reshape(4, 4096)
    m[1] = page
    for _ in range(3):
        store.merger.scan()
    m[1] = 0
    for _ in range(3):
        store.merger.scan()
    assert not m[1].any(), "a write of zeros to a merged page was lost (it reads the pool page again)"
    del m


@pytest.mark.limit(60)
def test_mergeable_pages_read_what_was_written_under_merges(store):
    """One thread keeps rewriting mergeable pages with copies of stored
    pages (which merge at first sight) and zeros, checking each page reads
    what it last wrote; another thread scans all along."""
    rng = np.random.default_rng(4)
    templates = [np.zeros(4096, np.uint8)] + [
        np.frombuffer(rng.bytes(4096), np.uint8) for _ in range(5)]
    store.put(np.concatenate(templates[1:]), key="templates")
    n = 96
    m = store.mergeable_array(n * 4096, np.uint8).reshape(n, 4096)
    shadow = [0] * n
    stop = threading.Event()
    bad = []

    def merge():
        while not stop.is_set():
            store.merger.scan()

    t = threading.Thread(target=merge, daemon=True)
    t.start()
    r = random.Random(5)
    try:
        end = time.monotonic() + 3
        while time.monotonic() < end and len(bad) < 10:
            for _ in range(8):
                i, k = r.randrange(n), r.randrange(len(templates))
                m[i] = templates[k]
                shadow[i] = k
            for i in range(n):
                if not np.array_equal(m[i], templates[shadow[i]]):
                    bad.append((i, shadow[i]))
            time.sleep(0.001)
    finally:
        stop.set()
        t.join(30)
    assert not bad, f"mergeable pages lost writes (page, template written): {bad[:10]}"
    del m


@pytest.mark.limit(240)
def test_soak_flat(store_name):
    cycles = 6000
    samples, st, rep = soak(cycles, store_name, report_every=500)
    assert rep.ok, rep.errors
    assert st["objects"] == 0 and st["physical_bytes"] == 0
    warm = samples[2]                       # after warm-up
    end = samples[-1]
    assert end[3] <= warm[3], f"file descriptors grew: {warm[3]} -> {end[3]}"
    assert end[1] - warm[1] < 24 * MiB, f"Rss grew {(end[1] - warm[1]) / MiB:.1f} MiB: {samples}"
    assert end[2] - warm[2] < 4 * MiB, f"the store's files grew {(end[2] - warm[2]) / MiB:.1f} MiB"


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=100_000)
    a = ap.parse_args()
    t0 = time.time()
    samples, st, rep = soak(a.cycles, f"soak-{os.getpid()}", report_every=max(a.cycles // 20, 1))
    print(f"{'cycle':>8} {'Rss MiB':>8} {'store MiB':>10} {'fds':>4}")
    for c, rss, shm, fds in samples:
        print(f"{c:>8} {rss / MiB:>8.1f} {shm / MiB:>10.1f} {fds:>4}")
    print(f"{a.cycles} cycles in {time.time() - t0:.0f} s; check: {'ok' if rep.ok else rep.errors[:3]}; "
          f"objects left {st['objects']}")
    sys.exit(0 if rep.ok and st["objects"] == 0 else 1)
