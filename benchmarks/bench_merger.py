"""The background merger (ksmd-style dedup of live process memory) vs Linux KSM.

Four spawned worker processes (kept for the whole benchmark, driven by
commands over a pipe) each fill memory with the SAME random bytes
(generated from one seed in 64 KiB chunks, so no big temporary stays in
their heaps):

 ours  ``Store(name).mergeable_array(n, np.uint8)``, then
       ``store.merger.start()`` at its defaults (advisor: a full pass every
       0.2 s, at most 25% of a core per process).
 KSM   ``mmap.mmap(-1, n)`` + ``madvise(MADV_MERGEABLE)``; the parent sets
       /sys/kernel/mm/ksm/run=1 with the defaults pages_to_scan=100,
       sleep_millisecs=20 (every old setting is restored in a finally; run=2
       unmerges what is left first).  Needs root and /sys/kernel/mm/ksm.

1. time to 90% merged.  Duplicates = (P-1)/P of all pages; the parent polls
   ``store.stats()["pages_sharing"]`` (ours) or ksm/pages_sharing (KSM)
   from the moment the mergers are started (run=1) until >= 90% of them
   (deadline 60 s for 32 MiB, 120 s for 256 MiB; "> deadline" if missed;
   ours also stops waiting once pages_sharing has not grown for 15 s and
   is reported as stalled).
   CPU to get there: ours = merger_cpu_seconds (C scan time, all
   processes) and the workers' utime+stime (/proc/PID/stat, whole
   processes: Python pacing and page faults included); KSM = ksmd's
   utime+stime.  Then both are left to converge (>= 99.9% of duplicates, or
   a few seconds) and physical memory is measured:
     ours  sum over workers of the growth of smaps_rollup Anonymous since
           before the fill + the growth of /proc/meminfo Shmem (the store's
           files; cross-checked with their allocated blocks)
     KSM   sum over workers of the growth of (Anonymous - KSM) + the KSM
           pages (growth of ksm/pages_shared x 4 KiB), which is what is
           physically there (smaps counts a KSM page in every process that
           maps it), plus ksmd's rmap_items x 64 B (its own bookkeeping,
           kernel memory that smaps does not show), as ANCHORS counts it
   Each worker then checks its memory still equals the generated data.
   Full: 4 x 32 MiB (ours: median of 3 runs) and 4 x 256 MiB (median of 2,
   not repeated when the first misses 90%);
   --quick: ours 4 x 32 MiB, KSM at 4 x 16 MiB (skipped if estimated
   > 30 s) with ours also run at 4 x 16 MiB for a like-for-like ratio.
2. steady state: after converging, nothing changes; the mergers keep
   running at their defaults for 5 s: merger CPU as % of one core per
   process (target <= 5%), also measured for ksmd over the same window
   (per process = ksmd / P).
3. scan throughput of the C scanner, one process, one core: 256 MiB
   (--quick 64 MiB) of mergeable memory, random, no page matches anything;
   ``merger.scan()`` passes: 1st (all pages new -> volatile), 2nd (stable:
   fingerprint + lookup + hint), 4th (smart scan skips them all); GB/s =
   pages_scanned x 4 KiB / scan CPU seconds (medians of 3 fresh regions).
   Peers: the fingerprint alone (``store._fingerprint_pages``, thread CPU
   time) over the same memory, and ksmd's pages_scanned x 4 KiB / its CPU
   seconds in step 1.
4. mixed workload: 4 x 64 MiB identical, mergers at defaults, merged to
   90%; then each process rewrites 10% of its pages per second (random
   pages, new random content, 20 ms rate limiter) for 8 s (--quick 4 s),
   keeping a numpy shadow copy.  Reported: pages merged / sharing /
   volatile / unshared, merger CPU, the median and slowest write batch, and
   mismatches between memory and shadow (must be 0: anything else is a
   lost or torn write, i.e. a bug).
"""
import contextlib
import mmap
import multiprocessing as mp
import os
import time
import traceback

from _common import (MiB, PAGE, Result, allocated_bytes, fmt_bytes, fmt_time, median, meminfo,
                     note, ns, run_standalone, store_files, store_name, temp_store)

NAME = "merger"
NPROC = 4
CHUNK = 64 * 1024
KSM_DIR = "/sys/kernel/mm/ksm"
KSM_RMAP_ITEM_BYTES = 64          # sizeof(struct ksm_rmap_item) on x86-64
CLK_TCK = os.sysconf("SC_CLK_TCK")
SEED = 20240611
#: ours gives up waiting once pages_sharing has not grown for this long (our
#: merger passes every ~0.2 s; KSM gets no such early exit: its first pass
#: only takes checksums and shows no progress for a long time)
STALL_S = 15.0


# ---------------------------------------------------------------------------
# worker process (a command server)


def _fill(np, arr, seed):
    rng = np.random.default_rng(seed)
    n = arr.nbytes
    for off in range(0, n, CHUNK):
        k = min(CHUNK, n - off)
        arr[off:off + k] = np.frombuffer(rng.bytes(k), np.uint8)


def _diff_pages(np, a, b):
    """Pages of two equal-length uint8 arrays that differ."""
    return int((a.reshape(-1, PAGE) != b.reshape(-1, PAGE)).any(axis=1).sum())


def _verify(np, arr, seed):
    """Pages of arr that differ from the data generated from seed."""
    rng = np.random.default_rng(seed)
    n = arr.nbytes
    bad = 0
    for off in range(0, n, CHUNK):
        k = min(CHUNK, n - off)
        ref = np.frombuffer(rng.bytes(k), np.uint8)
        seg = arr[off:off + k]
        if not np.array_equal(seg, ref):
            bad += _diff_pages(np, seg, ref)
    return bad


def _shadow_diff(np, arr, shadow):
    bad = 0
    step = 1024 * PAGE
    for off in range(0, arr.nbytes, step):
        a, b = arr[off:off + step], shadow[off:off + step]
        if not np.array_equal(a, b):
            bad += _diff_pages(np, a, b)
    return bad


class _WorkerState:
    def __init__(self, idx):
        import numpy as np
        import dedupshm
        import dedupshm.merger  # noqa: F401 - loaded now, not inside a measurement
        self.np = np
        # warm the data path too, so its one-time allocations are not
        # counted as memory of the first run
        _fill(np, np.zeros(2 * CHUNK, np.uint8), 0)
        self.idx = idx
        self.kind = None
        self.store = None
        self.mm = None
        self.arr = None
        self.seed = None
        self.shadow = None

    # -- commands -----------------------------------------------------------
    def setup(self, kind, name, nbytes, seed):
        np = self.np
        self.release()
        t0 = ns()
        if kind == "ours":
            import dedupshm
            self.store = dedupshm.Store(name)
            self.arr = self.store.mergeable_array(nbytes, np.uint8)
        else:
            self.mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.mm.madvise(mmap.MADV_MERGEABLE)
            self.arr = np.frombuffer(self.mm, np.uint8)
        self.kind, self.seed = kind, seed
        _fill(np, self.arr, seed)
        return {"fill_s": (ns() - t0) / 1e9}

    def start(self, kw):
        self.store.merger.start(**kw)

    def stop(self):
        self.store.merger.stop()
        return dict(self.store.merger.last)

    def verify(self):
        t0 = ns()
        bad = _verify(self.np, self.arr, self.seed)
        return {"bad_pages": bad, "pages": self.arr.nbytes // PAGE, "s": (ns() - t0) / 1e9}

    def scan_passes(self, npasses):
        out = []
        m = self.store.merger
        for _ in range(npasses):
            t0 = ns()
            m.scan()
            wall = (ns() - t0) / 1e9
            d = dict(m.last)
            d["wall_s"] = wall
            out.append(d)
        return out

    def fingerprint(self, reps):
        """Thread CPU seconds of _fingerprint_pages over the whole array."""
        ts = []
        for _ in range(reps):
            t0 = time.thread_time_ns()
            self.store._fingerprint_pages(self.arr)
            ts.append((time.thread_time_ns() - t0) / 1e9)
        return ts

    def mixed(self, frac_per_s, dur, seed):
        """Rewrite frac_per_s of the pages per second for dur seconds,
        mirroring every write into a numpy shadow copy."""
        np = self.np
        self.shadow = self.arr.copy()
        a2 = self.arr.reshape(-1, PAGE)
        s2 = self.shadow.reshape(-1, PAGE)
        npages = a2.shape[0]
        rate = frac_per_s * npages
        rng = np.random.default_rng(seed)
        done = 0
        batch_s = []
        t0 = time.perf_counter()
        while True:
            now = time.perf_counter() - t0
            if now >= dur:
                break
            due = int(rate * now) - done
            if due > 0:
                idx = rng.integers(0, npages, size=due)
                data = np.frombuffer(rng.bytes(due * PAGE), np.uint8).reshape(due, PAGE)
                tb = time.perf_counter()
                a2[idx] = data
                batch_s.append(time.perf_counter() - tb)
                s2[idx] = data
                done += due
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        return {"writes": done, "elapsed": elapsed, "rate": done / elapsed, "npages": npages,
                "batches": len(batch_s), "max_batch_s": max(batch_s, default=0.0),
                "median_batch_s": float(np.median(batch_s)) if batch_s else 0.0,
                "pages_per_batch": done / max(len(batch_s), 1),
                "bad_pages_running": _shadow_diff(np, self.arr, self.shadow)}

    def verify_shadow(self):
        return {"bad_pages": _shadow_diff(self.np, self.arr, self.shadow)}

    def release(self):
        if self.store is not None and self.store._merger is not None:
            self.store.merger.stop()
        self.arr = None
        self.shadow = None
        import gc
        gc.collect()
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.store is not None:
            self.store.close()
            self.store = None
        gc.collect()


def _worker(idx, conn):
    try:
        st = _WorkerState(idx)
    except BaseException:  # noqa: BLE001
        conn.send(("err", traceback.format_exc()))
        return
    conn.send(("ok", os.getpid()))
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            break
        if cmd == "exit":
            try:
                st.release()
                conn.send(("ok", None))
            except BaseException:  # noqa: BLE001
                conn.send(("err", traceback.format_exc()))
            break
        try:
            conn.send(("ok", getattr(st, cmd)(*args)))
        except BaseException:  # noqa: BLE001 - report to the parent
            conn.send(("err", traceback.format_exc()))


class Workers:
    """NPROC spawned command servers; always ended on exit."""

    def __init__(self, n):
        self.n = n
        self.ctx = mp.get_context("spawn")
        self.procs, self.conns, self.pids = [], [], []
        self.exitcodes = None

    def __enter__(self):
        try:
            for i in range(self.n):
                a, b = self.ctx.Pipe()
                p = self.ctx.Process(target=_worker, args=(i, b), name=f"merger-w{i}")
                p.start()
                b.close()
                self.procs.append(p)
                self.conns.append(a)
            for i in range(self.n):
                self.pids.append(self._recv(i, 120))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _recv(self, i, timeout):
        c = self.conns[i]
        if not c.poll(timeout):
            raise TimeoutError(f"worker {i} did not answer within {timeout} s")
        status, val = c.recv()
        if status != "ok":
            raise RuntimeError(f"worker {i} failed:\n{val}")
        return val

    def call(self, cmd, *args, which=None, timeout=300):
        """Send cmd to the workers (all, or the indices in which) at once;
        return their answers in order."""
        which = range(self.n) if which is None else which
        for i in which:
            self.conns[i].send((cmd, args))
        return [self._recv(i, timeout) for i in which]

    def call_each(self, cmd, argsfn, which=None, timeout=300):
        which = range(self.n) if which is None else which
        for i in which:
            self.conns[i].send((cmd, argsfn(i)))
        return [self._recv(i, timeout) for i in which]

    def __exit__(self, *exc):
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.send(("exit", ()))
        for i, c in enumerate(self.conns):
            with contextlib.suppress(Exception):
                if c.poll(30):
                    c.recv()
        for p in self.procs:
            p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        self.exitcodes = [p.exitcode for p in self.procs]
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.close()


# ---------------------------------------------------------------------------
# /proc and /sys


def proc_cpu(pid):
    """utime + stime of a process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def procs_cpu(pids):
    return sum(proc_cpu(p) for p in pids)


def smaps_rollup(pid):
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def anon_private(pid):
    """Anonymous memory of a process not counting KSM pages (bytes)."""
    r = smaps_rollup(pid)
    return r.get("Anonymous", 0) - r.get("KSM", 0)


def ksm_stat(pid):
    out = {}
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/ksm_stat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                with contextlib.suppress(ValueError):
                    out[k] = int(v)
    return out


def ksm_read(name):
    with open(os.path.join(KSM_DIR, name)) as f:
        return f.read().strip()


def ksm_int(name):
    return int(ksm_read(name))


def ksm_write(name, value):
    with open(os.path.join(KSM_DIR, name), "w") as f:
        f.write(str(value))


def find_ksmd():
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{d}/comm") as f:
                if f.read().strip() == "ksmd":
                    return int(d)
    return None


def ksm_unavailable():
    """None if KSM can be used here, else why not."""
    if os.geteuid() != 0:
        return "not root (KSM needs root to enable)"
    if not os.path.isdir(KSM_DIR):
        return f"{KSM_DIR} absent (kernel without KSM)"
    if find_ksmd() is None:
        return "no ksmd thread found in /proc/*/comm"
    if not os.access(os.path.join(KSM_DIR, "run"), os.W_OK):
        return f"{KSM_DIR}/run is not writable"
    return None


class KsmSession:
    """Records run, pages_to_scan, sleep_millisecs (and advisor_mode), sets
    the defaults, and restores everything on exit (run=2 first if merged
    pages are left over from us)."""

    def __init__(self, pages_to_scan=100, sleep_ms=20):
        self.old = {}
        self.restored = False
        self.pages_to_scan, self.sleep_ms = pages_to_scan, sleep_ms

    def __enter__(self):
        for k in ("run", "pages_to_scan", "sleep_millisecs"):
            self.old[k] = ksm_read(k)
        if os.path.exists(os.path.join(KSM_DIR, "advisor_mode")):
            cur = ksm_read("advisor_mode")                   # "[none] scan-time"
            self.old["advisor_mode"] = cur[cur.index("[") + 1:cur.index("]")] if "[" in cur else cur
        self.base_shared = ksm_int("pages_shared")
        try:
            if self.old.get("advisor_mode", "none") != "none":
                ksm_write("advisor_mode", "none")
            ksm_write("pages_to_scan", self.pages_to_scan)
            ksm_write("sleep_millisecs", self.sleep_ms)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def start(self):
        ksm_write("run", 1)

    def stop(self):
        ksm_write("run", 0)

    def __exit__(self, *exc):
        errors = []
        try:
            ksm_write("run", 0)
        except OSError as e:
            errors.append(f"run=0: {e}")
        with contextlib.suppress(OSError, ValueError):
            if ksm_int("pages_shared") > self.base_shared:
                ksm_write("run", 2)                          # unmerge what is left
        for k in ("pages_to_scan", "sleep_millisecs", "advisor_mode"):
            if k in self.old:
                try:
                    ksm_write(k, self.old[k])
                except OSError as e:
                    errors.append(f"{k}={self.old[k]}: {e}")
        try:
            ksm_write("run", self.old["run"])
        except OSError as e:
            errors.append(f"run={self.old['run']}: {e}")
        self.restored = not errors
        if errors:
            note("WARNING: could not restore KSM settings: " + "; ".join(errors))
        return False


# ---------------------------------------------------------------------------
# phase 1 (+2): time to 90%, CPU, memory, correctness, steady state


def _wait(read, goal, deadline_s, poll_s, t0, stall_s=None, stalled=None):
    """Poll read() until >= goal; returns (seconds since t0 or None, last
    value).  With stall_s: give up early once the value has not grown by
    0.1% of goal for stall_s seconds (stalled["at"] says when)."""
    best, t_best = -1, 0.0
    while True:
        v = read()
        now = (ns() - t0) / 1e9
        if v >= goal:
            return now, v
        if now >= deadline_s:
            return None, v
        if v > best + 0.001 * goal:
            best, t_best = v, now
        elif stall_s is not None and now - t_best >= stall_s:
            if stalled is not None:
                stalled["at"] = now
            return None, v
        time.sleep(poll_s)


def _converge(read, goal, max_extra_s, poll_s, stall_s=None):
    """Keep polling until read() >= goal, max_extra_s passed, or (with
    stall_s) the value has not changed for stall_s; returns the last value."""
    now = time.monotonic()
    t_end = now + max_extra_s
    v = read()
    last, t_last = v, now
    while v < goal and now < t_end:
        time.sleep(poll_s)
        v = read()
        now = time.monotonic()
        if v != last:
            last, t_last = v, now
        elif stall_s is not None and now - t_last >= stall_s:
            break
    return v


#: both at their fastest (issue 10): ours scans without pause on a whole
#: core per process; KSM scans 10000 pages per wake-up, no sleep
OURS_FASTEST = {"pages_to_scan": 1 << 20, "sleep_ms": 0, "max_cpu": 1.0}
KSM_FASTEST = {"pages_to_scan": 10000, "sleep_ms": 0}


def run_ours(w, size, deadline, steady_s=0.0, start_kw=None):
    """One run of our merger (at defaults unless start_kw) on NPROC x size
    identical bytes."""
    pages = size // PAGE
    dups = (NPROC - 1) * pages
    goal = 0.9 * dups
    name = store_name("merge")
    files = store_files(name)
    out = {"size": size, "dups": dups}
    with temp_store("merge", name=name, capacity="4GiB", warm_bytes=0) as s:
        try:
            base_anon = [anon_private(p) for p in w.pids]
            shmem0 = meminfo("Shmem")
            blocks0 = allocated_bytes(files)
            fills = w.call("setup", "ours", name, size, SEED)
            out["fill_s"] = median([f["fill_s"] for f in fills])
            cpu0_w = procs_cpu(w.pids)
            st0 = s.stats()
            t0 = ns()
            w.call("start", start_kw or {})
            stalled = {}
            t90, v = _wait(lambda: s.stats()["pages_sharing"], goal, deadline, 0.01, t0,
                           stall_s=STALL_S, stalled=stalled)
            st1 = s.stats()
            out["stalled_at"] = stalled.get("at")
            cpu1_w = procs_cpu(w.pids)
            out.update(t90=t90, sharing_at_stop=v,
                       merger_cpu=st1["merger_cpu_seconds"] - st0["merger_cpu_seconds"],
                       workers_cpu=cpu1_w - cpu0_w,
                       full_scans=st1["full_scans"] - st0["full_scans"],
                       pages_scanned=st1["pages_scanned"] - st0["pages_scanned"])
            # converge, then measure memory
            tc = ns()
            # our passes take ~0.2 s: 1 s without change = converged
            v = _converge(lambda: s.stats()["pages_sharing"], 0.999 * dups,
                          5.0 if t90 is not None else 0.0, 0.02, stall_s=1.0)
            out["converge_extra_s"] = (ns() - tc) / 1e9
            out["t_total_converge"] = (ns() - t0) / 1e9
            st2 = s.stats()
            anon = [anon_private(p) for p in w.pids]
            shmem1 = meminfo("Shmem")
            blocks1 = allocated_bytes(files)
            out.update(sharing_final=st2["pages_sharing"], merged_final=st2["pages_merged"],
                       anon_delta=sum(a - b for a, b in zip(anon, base_anon)),
                       shmem_delta=shmem1 - shmem0, blocks_delta=blocks1 - blocks0,
                       physical_bytes=st2["physical_bytes"],
                       metadata_bytes=st2.get("metadata_bytes"), stats=st2)
            shm_part = out["shmem_delta"]
            out["shmem_judged_on"] = "Shmem"
            if abs(out["shmem_delta"] - out["blocks_delta"]) > 0.01 * size:
                shm_part = out["blocks_delta"]
                out["shmem_judged_on"] = "file blocks"
            out["phys"] = out["anon_delta"] + shm_part
            if steady_s:
                c0m = s.stats()["merger_cpu_seconds"]
                c0w = procs_cpu(w.pids)
                fs0 = s.stats()["full_scans"]
                time.sleep(steady_s)
                st3 = s.stats()
                out["steady"] = {
                    "seconds": steady_s,
                    "merger_cpu": st3["merger_cpu_seconds"] - c0m,
                    "workers_cpu": procs_cpu(w.pids) - c0w,
                    "full_scans": st3["full_scans"] - fs0,
                    "sharing": st3["pages_sharing"]}
            lasts = w.call("stop")
            out["last_scan"] = lasts[0]
            ver = w.call("verify")
            out["bad_pages"] = sum(x["bad_pages"] for x in ver)
        finally:
            with contextlib.suppress(Exception):
                w.call("release", timeout=60)
    return out


def run_ksm(w, size, deadline, ksmd, steady_s=0.0, settings=None):
    """One run of kernel KSM (at its defaults unless settings) on NPROC x
    size identical bytes."""
    pages = size // PAGE
    dups = (NPROC - 1) * pages
    goal = 0.9 * dups
    out = {"size": size, "dups": dups}
    with KsmSession(**(settings or {})) as ks:
        try:
            base_anon = [anon_private(p) for p in w.pids]
            shmem0 = meminfo("Shmem")
            fills = w.call("setup", "ksm", None, size, SEED)
            out["fill_s"] = median([f["fill_s"] for f in fills])
            sh0, sg0 = ksm_int("pages_shared"), ksm_int("pages_sharing")
            scanned0 = ksm_int("pages_scanned") if os.path.exists(f"{KSM_DIR}/pages_scanned") else None
            fs0 = ksm_int("full_scans")
            cpu0_k, cpu0_w = proc_cpu(ksmd), procs_cpu(w.pids)
            t0 = ns()
            ks.start()
            t90, v = _wait(lambda: ksm_int("pages_sharing") - sg0, goal, deadline, 0.05, t0)
            cpu1_k, cpu1_w = proc_cpu(ksmd), procs_cpu(w.pids)
            out.update(t90=t90, sharing_at_stop=v, ksmd_cpu=cpu1_k - cpu0_k,
                       workers_cpu=cpu1_w - cpu0_w, full_scans=ksm_int("full_scans") - fs0)
            if scanned0 is not None:
                out["pages_scanned"] = ksm_int("pages_scanned") - scanned0
                out["scan_cpu"] = cpu1_k - cpu0_k
            tc = ns()
            left = max(0.0, deadline - (tc - t0) / 1e9)
            v = _converge(lambda: ksm_int("pages_sharing") - sg0, 0.999 * dups,
                          min(left, 8.0) if t90 is not None else 0.0, 0.05)
            out["converge_extra_s"] = (ns() - tc) / 1e9
            out["t_total_converge"] = (ns() - t0) / 1e9
            shared_pages = ksm_int("pages_shared") - sh0
            anon = [anon_private(p) for p in w.pids]
            rmap = sum(ksm_stat(p).get("ksm_rmap_items", 0) for p in w.pids)
            out.update(sharing_final=ksm_int("pages_sharing") - sg0, shared_pages=shared_pages,
                       anon_delta=sum(a - b for a, b in zip(anon, base_anon)),
                       shmem_delta=meminfo("Shmem") - shmem0, rmap_items=rmap,
                       rmap_bytes=rmap * KSM_RMAP_ITEM_BYTES)
            out["phys_pages"] = out["anon_delta"] + shared_pages * PAGE
            out["phys"] = out["phys_pages"] + out["rmap_bytes"]
            if steady_s:
                c0 = proc_cpu(ksmd)
                time.sleep(steady_s)
                out["steady"] = {"seconds": steady_s, "ksmd_cpu": proc_cpu(ksmd) - c0}
            ks.stop()
            ver = w.call("verify")
            out["bad_pages"] = sum(x["bad_pages"] for x in ver)
        finally:
            with contextlib.suppress(Exception):
                w.call("release", timeout=60)
    out["restored"] = ks.restored
    return out


# ---------------------------------------------------------------------------
# phase 3: scan throughput, one process


def run_scan(w, size, reps):
    runs = []
    for r in range(reps):
        name = store_name("scan")
        with temp_store("scan", name=name, capacity="4GiB", warm_bytes=0):
            try:
                w.call("setup", "ours", name, size, SEED + 1000 + r, which=[0])
                passes = w.call("scan_passes", 4, which=[0])[0]
                fp = w.call("fingerprint", 3, which=[0])[0]
                runs.append({"passes": passes, "fp": fp})
            finally:
                with contextlib.suppress(Exception):
                    w.call("release", which=[0], timeout=60)
    return runs


# ---------------------------------------------------------------------------
# phase 4: mixed workload


def run_mixed(w, size, dur, frac=0.10):
    pages = size // PAGE
    dups = (NPROC - 1) * pages
    name = store_name("mixed")
    out = {"size": size, "dur": dur, "frac": frac}
    with temp_store("mixed", name=name, capacity="4GiB", warm_bytes=0) as s:
        try:
            w.call("setup", "ours", name, size, SEED + 7)
            t0 = ns()
            w.call("start", {})
            t90, _ = _wait(lambda: s.stats()["pages_sharing"], 0.9 * dups, 60, 0.02, t0)
            out["t90"] = t90
            st0 = s.stats()
            out["before"] = {k: st0[k] for k in ("pages_merged", "pages_sharing",
                                                  "pages_volatile", "pages_unshared")}
            c0w = procs_cpu(w.pids)
            for i in range(NPROC):
                w.conns[i].send(("mixed", (frac, dur, SEED + 100 + i)))
            samples = []
            t_end = time.monotonic() + dur
            while time.monotonic() < t_end:
                time.sleep(1.0)
                st = s.stats()
                samples.append({k: st[k] for k in ("pages_merged", "pages_sharing",
                                                   "pages_volatile", "pages_unshared")})
            res = [w._recv(i, dur + 120) for i in range(NPROC)]
            st1 = s.stats()
            out["workers_cpu"] = procs_cpu(w.pids) - c0w
            out["merger_cpu"] = st1["merger_cpu_seconds"] - st0["merger_cpu_seconds"]
            out["elapsed"] = max(r["elapsed"] for r in res)
            out["after"] = {k: st1[k] for k in ("pages_merged", "pages_sharing", "pages_volatile",
                                                "pages_unshared", "physical_bytes")}
            out["samples"] = samples
            out["writes"] = sum(r["writes"] for r in res)
            out["rate_per_proc"] = median([r["rate"] for r in res])
            out["max_batch_s"] = max(r["max_batch_s"] for r in res)
            out["median_batch_s"] = median([r["median_batch_s"] for r in res])
            out["pages_per_batch"] = median([r["pages_per_batch"] for r in res])
            out["bad_running"] = sum(r["bad_pages_running"] for r in res)
            out["pages_total"] = NPROC * pages
            w.call("stop")
            out["bad_final"] = sum(x["bad_pages"] for x in w.call("verify_shadow"))
        finally:
            with contextlib.suppress(Exception):
                w.call("release", timeout=60)
    return out


# ---------------------------------------------------------------------------


def _pct(x):
    return None if x is None else 100.0 * x


def run(quick=False, use_ray=True):  # noqa: C901 - one straight-line report
    import dedupshm.merger
    res = Result(NAME, quick)
    wp = dedupshm.merger.wp_mode()
    why_no_ksm = ksm_unavailable()
    ksmd = find_ksmd() if why_no_ksm is None else None
    reps32 = 3
    reps256 = 2
    steady_s = 5.0
    scan_size = 64 * MiB if quick else 256 * MiB
    mixed_dur = 4.0 if quick else 8.0
    note(f"merger: {NPROC} processes, write-protect mode {wp}; "
         f"KSM: {'available (ksmd pid %d)' % ksmd if ksmd else 'SKIPPED: ' + why_no_ksm}")
    res.info.update(nproc=NPROC, wp_mode=wp, ksm=why_no_ksm or "used")

    t_bench = time.monotonic()
    phases = res.info["phase_seconds"] = {}

    @contextlib.contextmanager
    def phase(label):
        t0 = time.monotonic()
        try:
            yield
        finally:
            phases[label] = round(time.monotonic() - t0, 1)

    est16 = 2.2 * NPROC * (16 * MiB // PAGE) / 5000.0   # ~2 full scans at 5000 pages/s
    ksm16 = quick and ksmd is not None and est16 <= 30
    if quick and ksmd and not ksm16:
        note(f"KSM at 4 x 16 MiB would take ~{est16:.0f} s > 30 s: skipped in --quick")
    ours32, ours16, ours256 = [], [], []
    ksm_small = ksm256 = None
    with Workers(NPROC) as w:
        phases["spawn workers"] = round(time.monotonic() - t_bench, 1)
        # ---- 1 + 2: ours at 32 MiB (median of reps), steady state on the
        # first run (--quick with KSM: at 16 MiB instead, beside ksmd's)
        with phase("ours 4 x 32 MiB"):
            for r in range(reps32):
                ours32.append(run_ours(w, 32 * MiB, 60,
                                       steady_s=steady_s if r == 0 and not ksm16 else 0.0))
                _note_ours(ours32[-1], r)
        res.info["ours32"] = ours32
        if ksm16:
            with phase("ours 4 x 16 MiB"):
                for r in range(reps32):
                    ours16.append(run_ours(w, 16 * MiB, 60, steady_s=steady_s if r == 0 else 0.0))
                    _note_ours(ours16[-1], r)
            res.info["ours16"] = ours16
            with phase("KSM 4 x 16 MiB"):
                ksm_small = run_ksm(w, 16 * MiB, 60, ksmd, steady_s=steady_s)
        elif ksmd and not quick:
            with phase("KSM 4 x 32 MiB"):
                ksm_small = run_ksm(w, 32 * MiB, 60, ksmd, steady_s=steady_s)
        if ksm_small:
            _note_ksm(ksm_small, 60)
        res.info["ksm_small"] = ksm_small

        if not quick:
            with phase("ours 4 x 256 MiB"):
                for r in range(reps256):
                    ours256.append(run_ours(w, 256 * MiB, 120,
                                            steady_s=steady_s if r == 0 else 0.0))
                    _note_ours(ours256[-1], r)
                    if ours256[-1]["t90"] is None:
                        note("ours 4 x 256 MiB missed 90%: not repeated (time budget)")
                        break
            if ksmd:
                with phase("KSM 4 x 256 MiB"):
                    ksm256 = run_ksm(w, 256 * MiB, 120, ksmd)
                _note_ksm(ksm256, 120)
            res.info["ours256"], res.info["ksm256"] = ours256, ksm256

        # ---- 1b: both at their fastest
        fsize = 32 * MiB if quick else 256 * MiB
        with phase(f"fastest 4 x {fsize // MiB} MiB"):
            fast = [run_ours(w, fsize, 60, start_kw=OURS_FASTEST) for _ in range(2)]
            kfast = run_ksm(w, fsize, 60, ksmd, settings=KSM_FASTEST) if ksmd else None
        res.info["fastest"] = {"ours": fast, "ksm": kfast}
        _report_fastest(res, fsize, fast, kfast, why_no_ksm)

        # ---- 3: scan throughput
        with phase("scan throughput"):
            scan = run_scan(w, scan_size, 3)
        res.info["scan"] = scan

        # ---- 4: mixed workload
        with phase("mixed workload"):
            mixed = run_mixed(w, 64 * MiB, mixed_dur)
        res.info["mixed"] = mixed
    res.info["worker_exitcodes"] = w.exitcodes
    res.info["seconds"] = time.monotonic() - t_bench
    note("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))

    _report(res, quick, ours32, ours16, ours256, ksm_small, ksm256, scan, scan_size, mixed,
            why_no_ksm, w.exitcodes)
    return res


def _report_fastest(res, size, fast, kfast, why_no_ksm):
    label = f"both at their fastest, 4 x {size // MiB} MiB"
    t = _med([r for r in fast if r["t90"] is not None], "t90")
    cpu = _med(fast, "merger_cpu")
    kt = kfast["t90"] if kfast else None
    kcpu = kfast["ksmd_cpu"] if kfast else None
    kname = "KSM 10000 pages, 0 ms" if kfast else f"KSM: {why_no_ksm}"
    res.row(f"time to 90% merged, {label}", t, kt, kname)
    res.row("  CPU s to 90% (merger_cpu_seconds; ksmd utime+stime)", cpu, kcpu, kname)
    note(f"fastest: ours {', '.join(fmt_time(r['t90']) if r['t90'] else 'missed' for r in fast)}"
         f" (merger CPU {fmt_time(cpu) if cpu is not None else '-'}); KSM "
         f"{fmt_time(kt) if kt else '-'} (ksmd CPU {fmt_time(kcpu) if kcpu else '-'})")
    ok = None
    if t is not None and kt is not None:
        ok = kt / t >= 5 and (cpu or 0) <= (kcpu or 0)
    res.target(f"time to 90% merged, {label}", t, kt, kname, "s", "lower",
               ">= 5x sooner than KSM, CPU <= ksmd's", ok)
    res.target(f"CPU s to 90%, {label}", cpu, kcpu, kname, "s", "lower", "(info)", None)


def _note_ours(o, r):
    if o["t90"] is not None:
        t = fmt_time(o["t90"])
    elif o.get("stalled_at") is not None:
        t = (f"NOT reached: stalled at {o['sharing_at_stop'] / o['dups'] * 100:.1f}% of duplicates "
             f"(no growth for {STALL_S:.0f} s, gave up at {o['stalled_at']:.1f} s)")
    else:
        t = f"NOT reached by the deadline ({o['sharing_at_stop'] / o['dups'] * 100:.1f}%)"
    note(f"ours 4 x {fmt_bytes(o['size'])} run {r + 1}: 90% in {t}, merger CPU "
         f"{o['merger_cpu']:.3f} s, workers CPU {o['workers_cpu']:.2f} s, "
         f"physical {fmt_bytes(o['phys'])}, bad pages {o['bad_pages']}")


def _note_ksm(k, deadline):
    note(f"KSM 4 x {fmt_bytes(k['size'])}: 90% in "
         f"{fmt_time(k['t90']) if k['t90'] is not None else f'> {deadline} s'}, "
         f"ksmd CPU {k['ksmd_cpu']:.2f} s, physical {fmt_bytes(k['phys'])}, "
         f"bad pages {k['bad_pages']}")


def _med(runs, key):
    xs = [r[key] for r in runs if r.get(key) is not None]
    return median(xs) if xs else None


def _report(res, quick, ours32, ours16, ours256, ksm_small, ksm256, scan, scan_size, mixed,
            why_no_ksm, exitcodes):
    ksm_name = "KSM defaults" if why_no_ksm is None else ""

    def group(label, ours_runs, ksm, deadline, summary_time=True, summary_mem=True, want=20):
        missed = sum(1 for r in ours_runs if r["t90"] is None)
        t_ours = _med([r for r in ours_runs if r["t90"] is not None], "t90")
        if missed:
            worst = min(ours_runs, key=lambda r: r["sharing_at_stop"])
            why = (f"stalled at {worst['sharing_at_stop'] / worst['dups'] * 100:.1f}% of duplicates "
                   f"(no growth for {STALL_S:.0f} s)" if worst.get("stalled_at") is not None
                   else f"deadline {deadline} s")
            res.finding(f"ours {label}: 90% of duplicates not merged in {missed} of "
                        f"{len(ours_runs)} runs: {why}; merger CPU meanwhile "
                        f"{worst['merger_cpu']:.1f} s")
        t_ksm = ksm["t90"] if ksm else None
        ksm_label = ksm_name if ksm else ""
        nrun = f" (median of {len(ours_runs)})" if len(ours_runs) > 1 else ""
        res.row(f"time to 90% merged, {label}{nrun}", t_ours, t_ksm, ksm_label)
        if ksm and ksm["t90"] is None:
            note(f"KSM {label}: > {deadline} s deadline (reached "
                 f"{ksm['sharing_at_stop'] / ksm['dups'] * 100:.0f}% of duplicates)")
        upto = "to 90%" if not missed and not (ksm and ksm["t90"] is None) else "to 90% (or giving up)"
        res.row(f"  CPU {upto}: ours merger_cpu_seconds / ksmd", _med(ours_runs, "merger_cpu"),
                ksm["ksmd_cpu"] if ksm else None, ksm_label)
        res.row(f"  CPU {upto}: ours workers' utime+stime / ksmd", _med(ours_runs, "workers_cpu"),
                ksm["ksmd_cpu"] if ksm else None, ksm_label)
        fsc = _med(ours_runs, "full_scans")
        res.row("  full scans to 90% (ours: passes per process) (info)",
                fsc / NPROC if fsc is not None else None,
                ksm["full_scans"] if ksm else None, ksm_label, unit="")
        res.row("  duplicates merged at measurement (%)",
                _pct(_med(ours_runs, "sharing_final") / ours_runs[0]["dups"]),
                _pct(ksm["sharing_final"] / ksm["dups"]) if ksm else None, ksm_label,
                unit="%", better="higher")
        p_ours = _med(ours_runs, "phys")
        res.row("  physical memory after converging", p_ours, ksm["phys"] if ksm else None,
                ksm_label + (" (+ rmap_items x 64 B)" if ksm else ""), unit="B")
        if ksm:
            res.row("    KSM without its rmap_items (smaps-visible only)", p_ours,
                    ksm["phys_pages"], ksm_label, unit="B")
        res.row("    workers' private Anonymous growth (info)", _med(ours_runs, "anon_delta"),
                ksm["anon_delta"] if ksm else None, ksm_label + (" (Anon - KSM)" if ksm else ""),
                unit="B")
        res.row("    ours: Shmem growth (info)", _med(ours_runs, "shmem_delta"), None, unit="B")
        res.row("    ours: store files' allocated blocks growth (info)",
                _med(ours_runs, "blocks_delta"), None, unit="B")
        res.row("    ours: stats physical_bytes (info)", _med(ours_runs, "physical_bytes"), None,
                unit="B")
        res.row("    ours: stats metadata_bytes (info)", _med(ours_runs, "metadata_bytes"), None,
                unit="B")
        if ksm:
            res.row("    KSM: pages_shared x 4 KiB / rmap_items x 64 B (info)",
                    ksm["shared_pages"] * PAGE, ksm["rmap_bytes"], "rmap_items x 64 B", unit="B")
        judged = sorted({r["shmem_judged_on"] for r in ours_runs})
        if judged != ["Shmem"]:
            note(f"ours {label}: /proc/meminfo Shmem moved by other processes during some "
                 "runs; the store files' allocated blocks were used there instead")
        bad = sum(r["bad_pages"] for r in ours_runs)
        bad_k = ksm["bad_pages"] if ksm else None
        res.row("  data check: pages differing from the generated data", bad, bad_k, ksm_label,
                unit="pages")
        if bad:
            res.finding(f"DATA CORRUPTION: ours {label}: {bad} pages differ from the generated "
                        "data after merging")
        if bad_k:
            res.finding(f"KSM {label}: {bad_k} pages differ (?!)")
        if summary_time:
            ok = None
            if ksm and t_ours:
                t_k = ksm["t90"] if ksm["t90"] is not None else deadline
                ok = t_k / t_ours >= want
            tdesc = f"KSM/ours >= {want}x" + ("" if want == 20 else
                                              " (20x at 32 MiB; KSM's time halves with the size)")
            if t_ours is None:
                ok = False
                tdesc += (f" -- ours NEVER reached 90% (stopped at "
                          f"{max(r['sharing_at_stop'] for r in ours_runs) / ours_runs[0]['dups'] * 100:.0f}%"
                          " of duplicates)")
            r = res.target(f"time to 90% merged, {label}", t_ours,
                           ksm["t90"] if ksm and ksm["t90"] is not None else (None if not ksm else deadline),
                           (ksm_name if ksm["t90"] is not None else f"KSM > {deadline} s deadline")
                           if ksm else "", "s", "lower", tdesc, ok)
            if not ksm:
                r["target"] += f" (KSM skipped: {why_no_ksm or 'not run at this size'})"
            res.target(f"CPU s to 90% (merger_cpu_seconds), {label}", _med(ours_runs, "merger_cpu"),
                       ksm["ksmd_cpu"] if ksm else None, ksm_label, "s", "lower", "(info)", None)
        if summary_mem:
            ok = None
            mdesc = "ours <= 1.02x KSM (ratio >= 0.98)"
            if ksm and p_ours:
                f_o = _med(ours_runs, "sharing_final") / ours_runs[0]["dups"]
                f_k = ksm["sharing_final"] / ksm["dups"]
                if min(f_o, f_k) >= 0.99:
                    ok = ksm["phys"] / p_ours >= 0.98
                else:
                    mdesc += f" -- not judged: merged ours {f_o * 100:.0f}%, KSM {f_k * 100:.0f}%"
            res.target(f"physical memory, {label}", p_ours, ksm["phys"] if ksm else None,
                       ksm_label, "B", "lower", mdesc, ok)
        res.target(f"data check after merging, {label}", bad, bad_k, ksm_label, "pages", "lower",
                   "0 differing pages", bad == 0)

    if quick:
        group("4 x 32 MiB", ours32, None, 60, summary_mem=False)
        if ours16:
            group("4 x 16 MiB", ours16, ksm_small, 60, want=10)
    else:
        group("4 x 32 MiB", ours32, ksm_small, 60)
        group("4 x 256 MiB", ours256, ksm256, 120)

    # ---- steady state
    for label, runs, ksm in (("4 x 32 MiB", ours32, None if quick else ksm_small),
                             ("4 x 16 MiB", ours16, ksm_small if quick else None),
                             ("4 x 256 MiB", ours256, None)):
        st = runs[0].get("steady") if runs else None
        if not st:
            continue
        ours_pct = 100 * st["merger_cpu"] / st["seconds"] / NPROC
        ours_pct_w = 100 * st["workers_cpu"] / st["seconds"] / NPROC
        k_pct = (100 * ksm["steady"]["ksmd_cpu"] / ksm["steady"]["seconds"] / NPROC
                 if ksm and ksm.get("steady") else None)
        kl = "ksmd / 4" if k_pct is not None else ""
        res.row(f"steady state {label}: merger CPU, % of a core per process", ours_pct, k_pct,
                kl, unit="%")
        res.row("  workers' whole-process CPU, % of a core per process", ours_pct_w, k_pct, kl,
                unit="%")
        res.row("  full scans in the window (info)", st["full_scans"], None, unit="")
        res.target(f"steady-state merger CPU per process, {label}", ours_pct, k_pct, kl, "%",
                   "lower", "<= 5% of a core", ours_pct <= 5)
        if ours_pct_w > 2 * ours_pct + 1:
            res.finding(f"steady state {label}: the workers use {ours_pct_w:.1f}% of a core each "
                        f"but merger_cpu_seconds accounts for {ours_pct:.1f}%: CPU outside the "
                        "C scan (Python pacing loop, faults) is not counted in merger_cpu_seconds")

    # ---- scan throughput
    def pass_fig(i):
        gbs, wall, vis = [], [], []
        for r in scan:
            p = r["passes"][i]
            if p["cpu_ns"]:
                gbs.append(p["scanned"] * PAGE / (p["cpu_ns"] / 1e9))
                vis.append(p["visited"] * PAGE / (p["cpu_ns"] / 1e9))
            wall.append(p["wall_s"])
        return median(gbs), median(wall), median(vis), median([r["passes"][i]["scanned"] for r in scan])

    fp_rate = median([scan_size / median(r["fp"]) for r in scan])
    ksm_rate = None
    src = ksm256 or ksm_small
    if src and src.get("scan_cpu"):
        ksm_rate = src["pages_scanned"] * PAGE / src["scan_cpu"]
    tag = fmt_bytes(scan_size)
    for i, what in ((0, "1st pass (all new: volatile)"), (1, "2nd pass (stable, no match)"),
                    (3, "4th pass (smart scan skips unmatched pages)")):
        g, wall, vis, nsc = pass_fig(i)
        if i == 3:
            res.row(f"scan {tag}, {what}: GB/s visited per CPU s", vis, None, unit="B/s",
                    better="higher")
        else:
            res.row(f"scan {tag}, {what}: GB/s scanned per CPU s", g, ksm_rate,
                    "ksmd (pages_scanned/CPU)" if ksm_rate else "", unit="B/s", better="higher")
        res.row(f"  wall time of the pass, pages scanned {nsc:.0f} (info)", wall, None)
        if i in (0, 1):
            res.target(f"scan throughput, {what.split(' (')[0]}, {tag}", g, ksm_rate,
                       "ksmd" if ksm_rate else "", "B/s", "higher", "(info)", None)
    res.row("  fingerprint alone (_fingerprint_pages), same memory, per CPU s", fp_rate, None,
            unit="B/s", better="higher")

    # ---- mixed
    m = mixed
    tot = m["pages_total"]
    a = m["after"]
    res.row(f"mixed 4 x 64 MiB, 10%/s rewritten for {m['dur']:.0f} s: time to 90% first",
            m["t90"], None)
    res.row("  writes done, pages/s per process (target 10% = "
            f"{0.1 * tot / NPROC:.0f})", m["rate_per_proc"], None, unit="pages/s", better="higher")
    res.row(f"  write batch of ~{m['pages_per_batch']:.0f} random pages: median (info)",
            m["median_batch_s"], None)
    res.row("  slowest write batch, any process (info)", m["max_batch_s"], None)
    res.row("  pages_merged at end, % of all pages", 100 * a["pages_merged"] / tot, None, unit="%",
            better="higher")
    res.row("  pages_sharing at end, % of duplicates", 100 * a["pages_sharing"] / (tot * 3 / 4),
            None, unit="%", better="higher")
    res.row("  pages_volatile at end", a["pages_volatile"], None, unit="pages")
    res.row("  pages_unshared at end", a["pages_unshared"], None, unit="pages")
    res.row("  merger CPU, % of a core per process", 100 * m["merger_cpu"] / m["elapsed"] / NPROC,
            None, unit="%")
    res.row("  workers' whole-process CPU, % of a core per process (incl. writing)",
            100 * m["workers_cpu"] / m["elapsed"] / NPROC, None, unit="%")
    res.row("  memory vs shadow: differing pages, merger running", m["bad_running"], None,
            unit="pages")
    res.row("  memory vs shadow: differing pages, merger stopped", m["bad_final"], None,
            unit="pages")
    bad = m["bad_running"] + m["bad_final"]
    res.target("mixed workload: lost/torn writes (memory != shadow)", bad, None, "", "pages",
               "lower", "0 (anything else is a bug)", bad == 0)
    res.target("mixed workload: pages merged at end, % of all pages",
               100 * a["pages_merged"] / tot, None, "", "%", "higher", "(info)", None)
    if bad:
        res.finding(f"BUG: mixed workload: {m['bad_running']} pages differ from the shadow copy "
                    f"with the merger running and {m['bad_final']} after stopping it: writes "
                    "were lost or torn")
    if exitcodes and any(c != 0 for c in exitcodes):
        res.finding(f"workers did not exit cleanly: exit codes {exitcodes}")
    res.print_detail()
    note(f"mixed: samples (merged, sharing, volatile, unshared) per second: "
         + ", ".join(f"({s['pages_merged']},{s['pages_sharing']},{s['pages_volatile']},"
                     f"{s['pages_unshared']})" for s in m["samples"]))


if __name__ == "__main__":
    run_standalone(run)
