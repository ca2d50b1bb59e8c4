"""Crash campaign: worker processes do random store work and are SIGKILLed
at random instants.  After every kill:

  * no surviving process waited more than 1 s for the store's lock
    (an observer thread times stats() calls all along),
  * gc() then check() are clean,
  * every object whose put completed (journaled "done") is intact, and
    every visible object is whole (its bytes follow from its key),
  * nothing half-put is visible;

and at the end, after deleting everything, the store is empty and Shmem
is back at the store's empty baseline.

    python tests/crash_campaign.py --kills 5000          # the full campaign
    python tests/crash_campaign.py --kills 200 --seed 1  # what CI runs
"""
import argparse
import multiprocessing as mp
import os
import random
import signal
import sys
import threading
import time

import numpy as np

import dedupshm

PAGE = 4096
SIZES = [64, 900, 3000, 5 * PAGE + 17, 64 * 1024, 512 * 1024, 3 * 1024 * 1024]


def value_for(seed, size):
    """The bytes of a key are a function of its name: any visible object can be verified."""
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 256, size, dtype=np.uint8)
    if seed % 3 == 0:
        v[: size // 2] = 0                         # zero pages too
    if seed % 5 == 0:
        v = np.resize(rng.integers(0, 256, PAGE, dtype=np.uint8), size)   # repeated pages
    return v


def parse_key(key):
    _, _, seed, size = key.split("-")   # w<worker>.<incarnation>-<n>-<seed>-<size>
    return int(seed), int(size)


def shmem():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(name, wid, seed, journal):
    """Random put/get/delete/create/merge work; journals each completed put."""
    rng = random.Random(seed)
    s = dedupshm.Store(name)
    mine = []
    m = s.mergeable_array(64 * PAGE, np.uint8)
    n = 0
    while True:
        n += 1
        op = rng.random()
        if op < 0.45 or len(mine) < 3:
            vseed = rng.randrange(1 << 30)
            size = rng.choice(SIZES)
            key = f"w{wid}-{n}-{vseed}-{size}"
            v = value_for(vseed, size)
            if rng.random() < 0.2:
                with s.create(key, size) as buf:
                    buf[:] = v.tobytes()
            else:
                s.put(v, key=key)
            journal.send(("done", key))
            mine.append(key)
        elif op < 0.65:
            key = mine.pop(rng.randrange(len(mine)))
            journal.send(("del", key))
            del s[key]
        elif op < 0.85:
            key = rng.choice(mine)
            got = np.asarray(s.get(key)).view(np.uint8)
            vseed, size = parse_key(key)
            if not np.array_equal(got.reshape(-1), value_for(vseed, size)):
                journal.send(("corrupt", key))
        elif op < 0.95:
            src = s.get(rng.choice(mine))
            k = min(len(src), m.nbytes)
            m[:k] = np.asarray(src).view(np.uint8).reshape(-1)[:k]
            s.merger.scan()
        else:
            r = s.put(b"unkeyed %d" % rng.randrange(10))
            del r


class Observer(threading.Thread):
    """Calls stats() all the time; records the longest wait."""

    def __init__(self, store):
        super().__init__(daemon=True)
        self.store = store
        self.max_wait = 0.0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            t = time.perf_counter()
            self.store.stats()
            self.max_wait = max(self.max_wait, time.perf_counter() - t)
            time.sleep(0.002)


def run(kills, seed=0, workers=2, capacity="512MiB", verbose=True, progress=None):
    rnd = random.Random(seed)
    name = f"campaign-{os.getpid()}"
    base = shmem()
    store = dedupshm.Store(name, create=True, capacity=capacity, warm_bytes=0)
    ctx = mp.get_context("fork")
    done = {}              # key -> True (completed, not deleted)
    corrupt = []
    procs = {}
    incarnation = {}
    obs = Observer(store)
    bytes_checked = 0
    t0 = time.time()

    def start(wid):
        parent, child = ctx.Pipe(duplex=False)
        incarnation[wid] = incarnation.get(wid, 0) + 1
        p = ctx.Process(target=worker, args=(name, f"{wid}.{incarnation[wid]}", rnd.randrange(1 << 30), child),
                        daemon=True)
        p.start()
        child.close()
        procs[wid] = (p, parent)

    def drain(conn):
        try:
            while conn.poll():
                kind, key = conn.recv()
                if kind == "done":
                    done[key] = True
                elif kind == "del":
                    done.pop(key, None)
                elif kind == "corrupt":
                    corrupt.append(key)
        except (EOFError, OSError):
            pass

    try:
        for w in range(workers):
            start(w)
        obs.start()
        for i in range(kills):
            wid = rnd.randrange(workers)
            time.sleep(rnd.uniform(0.0, 0.03))
            p, conn = procs[wid]
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
            drain(conn)
            conn.close()
            # the victim may have been between "del" journaled and the delete:
            # such keys may still be there; that is fine.
            store.gc()
            rep = store.check()
            if rep.errors:
                raise AssertionError(f"kill {i}: check() found {rep.errors[:5]}")
            # the victim's journal is complete now (live workers' may lag)
            prefix = f"w{wid}.{incarnation[wid]}-"
            present = {k for k in store.keys() if k.startswith(prefix)}
            missing = [k for k in done if k.startswith(prefix) and k not in present]
            if missing:
                raise AssertionError(f"kill {i}: completed puts vanished: {missing[:5]}")
            for k in present:
                vseed, size = parse_key(k)
                got = np.asarray(store[k]).view(np.uint8).reshape(-1)
                bytes_checked += got.nbytes
                if not np.array_equal(got, value_for(vseed, size)):
                    raise AssertionError(f"kill {i}: visible object {k} is not whole")
                del got                     # a live view would keep its object
            keep = 0.2 if len(done) < 150 else 0.0
            for k in present:               # the next incarnation starts afresh
                if rnd.random() >= keep:
                    del store[k]
                    done.pop(k, None)
            if corrupt:
                raise AssertionError(f"workers read corrupt values: {corrupt[:5]}")
            if obs.max_wait > 1.0:
                raise AssertionError(f"a process waited {obs.max_wait:.2f} s for the lock")
            for w, (pw, cw) in procs.items():
                drain(cw)
            start(wid)
            if progress:
                progress(i + 1)
            elif verbose and (i + 1) % 100 == 0:
                print(f"  {i + 1} kills, {len(done)} objects live, max lock wait "
                      f"{obs.max_wait * 1e3:.1f} ms", flush=True)
    finally:
        obs.stop.set()
        for p, conn in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
            conn.close()
    store.gc()
    for k in store.keys():
        del store[k]
    store.gc()
    st = store.stats()
    rep = store.check()
    empty_ok = st["objects"] == 0 and st["physical_bytes"] == 0 and rep.ok
    time.sleep(0.1)
    shmem_left = shmem() - base
    result = {
        "kills": kills, "seconds": round(time.time() - t0, 1), "max_lock_wait_ms": round(obs.max_wait * 1e3, 2),
        "bytes_checked": bytes_checked + rep.bytes_checked, "mismatches": len(corrupt),
        "empty_after_delete": empty_ok, "shmem_left_bytes": shmem_left,
        "recoveries": st["recoveries"], "reaped_clients": st["reaped_clients"],
    }
    store.close()
    store.unlink()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    r = run(args.kills, seed=args.seed, workers=args.workers)
    for k, v in r.items():
        print(f"{k:>20}: {v}")
    ok = r["empty_after_delete"] and r["mismatches"] == 0
    print("campaign passed" if ok else "campaign FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
