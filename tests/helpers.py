"""Plain helpers shared by the tests and by their child processes.

Kept free of pytest so that 'spawn' children can import it cheaply
(multiprocessing hands the parent's sys.path to the child, which has this
directory on it when pytest runs the suite).
"""
import gc
import hashlib
import os
import re
import time
import uuid

import numpy as np

KiB = 1024
MiB = 1024 * 1024
PAGE = 4096
SHM_DIR = "/dev/shm"


# ---------------------------------------------------------------- kernel readings

def meminfo_shmem():
    """System-wide shared memory (tmpfs + shared anon) from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Shmem line in /proc/meminfo")


def _foreign_tmpfs_bytes(own_prefix):
    """tmpfs bytes held by files in /dev/shm that are not this test run's."""
    total = 0
    for root, dirs, files in os.walk(SHM_DIR):
        for f in files:
            if f.startswith(own_prefix):
                continue
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def shmem_bytes():
    """/proc/meminfo Shmem, less what other people's files in /dev/shm hold.

    Machine-wide, so still moved by anonymous shared memory of anything else
    running: tests measure store_bytes() (the store's own files) instead.

    The machine is shared (benchmarks and other test runs create and drop
    stores of hundreds of MiB at any moment); subtracting the tmpfs blocks
    of every file in /dev/shm that is not one of this run's stores
    (dedupshm.t<pid>-*) keeps deltas meaningful.  Readings whose foreign
    part moved while Shmem was read are retried."""
    own = f"dedupshm.t{os.getpid()}-"
    best = None
    for _ in range(20):
        f1 = _foreign_tmpfs_bytes(own)
        m = meminfo_shmem()
        f2 = _foreign_tmpfs_bytes(own)
        v = m - (f1 + f2) // 2
        if abs(f1 - f2) <= 256 * 1024:
            return v
        best = v
        time.sleep(0.01)
    return best


def file_bytes(*paths):
    """tmpfs/disk blocks really allocated to these files."""
    total = 0
    for p in paths:
        try:
            total += os.stat(p).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def store_bytes(*names, directory=None):
    """Memory the stores hold: the blocks allocated to their index and pool
    files.  Exact, and unmoved by whatever else runs on the machine (unlike
    /proc/meminfo's machine-wide Shmem): the store's data lives in these
    files and nowhere else in shared memory."""
    return sum(file_bytes(*store_files(n, directory)) for n in names)


def wait_store_bytes_below(name, limit, timeout=10.0, poke=None, directory=None):
    """Poll (collecting garbage, calling poke) until store_bytes(name) <= limit."""
    def ok():
        if poke is not None:
            poke()
        gc.collect()
        v = store_bytes(name, directory=directory)
        return v if v <= limit else None
    try:
        return wait_for(ok, timeout=timeout, interval=0.05,
                        msg=f"store files <= {limit / MiB:.1f} MiB")
    except AssertionError:
        raise AssertionError(
            f"store {name} files stayed at {store_bytes(name, directory=directory) / MiB:.1f} MiB, "
            f"expected <= {limit / MiB:.1f} MiB within {timeout}s") from None


def _kb_fields(path, pattern):
    """{name: bytes} of the 'Name:   N kB' lines of a /proc file whose name matches pattern."""
    out = {}
    with open(path) as f:
        for line in f:
            m = re.match(rf"^({pattern}):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2)) * 1024
    return out


def smaps_rollup(pid="self"):
    """/proc/PID/smaps_rollup as {field: bytes}."""
    return _kb_fields(f"/proc/{pid}/smaps_rollup", r"\w+")


def proc_status(pid="self"):
    """Memory lines of /proc/PID/status (VmRSS, RssAnon, RssFile, RssShmem) in bytes."""
    return _kb_fields(f"/proc/{pid}/status", r"Vm\w+|Rss\w+")


def memory_reading(pid="self"):
    """Private anonymous memory (smaps_rollup 'Anonymous') and resident
    shared-memory pages (status 'RssShmem') of a process, in bytes."""
    r = smaps_rollup(pid)
    st = proc_status(pid)
    return {"anon": r["Anonymous"], "rss": r["Rss"], "shmem": st["RssShmem"]}


def mapping_of(addr, pid="self"):
    """The /proc/PID/maps line (start, end, perms, path) containing addr."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                path = parts[5].strip() if len(parts) > 5 else ""
                return lo, hi, parts[1], path
    return None


def data_address(obj):
    """Address of the first byte of an ndarray or buffer."""
    if isinstance(obj, np.ndarray):
        return obj.__array_interface__["data"][0]
    return np.frombuffer(obj, dtype=np.uint8).__array_interface__["data"][0]


def in_pool(obj, name):
    """True if the bytes of obj live in a mapping of this store's pool file."""
    m = mapping_of(data_address(obj))
    return m is not None and f"dedupshm.{name}.pool" in m[3]


def shm_files(prefix="dedupshm.", directory=SHM_DIR):
    try:
        return sorted(f for f in os.listdir(directory) if f.startswith(prefix))
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------- waiting

def wait_for(pred, timeout=10.0, interval=0.02, msg="condition"):
    """Poll pred() until it returns a truthy value; fail after timeout.

    Returns the truthy value.  The last value is put into the message."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {msg} (last={last!r})")
        time.sleep(interval)


def wait_shmem_below(limit, timeout=10.0, poke=None):
    """Poll /proc/meminfo until Shmem <= limit; return the reading."""
    def ok():
        if poke is not None:
            poke()
        gc.collect()
        v = shmem_bytes()
        return v if v <= limit else None
    try:
        return wait_for(ok, timeout=timeout, interval=0.05, msg=f"Shmem <= {limit/MiB:.1f} MiB")
    except AssertionError:
        raise AssertionError(
            f"Shmem stayed at {shmem_bytes()/MiB:.1f} MiB, expected <= {limit/MiB:.1f} MiB "
            f"within {timeout}s") from None


# ---------------------------------------------------------------- data

def rand_array(nbytes, seed):
    """Deterministic random uint8 array; every 4 KiB page distinct and non-zero."""
    rng = np.random.default_rng(seed)
    a = np.frombuffer(rng.bytes(nbytes), dtype=np.uint8).copy()
    # make every page certainly non-zero and unique within the array
    n = nbytes // PAGE
    if n:
        v = a[: n * PAGE].reshape(n, PAGE)
        v[:, 0] = 1 + (np.arange(n) % 255)
    return a


def pattern_array(nbytes, seed):
    """Fast deterministic uint64 pattern; each page differs (for big values)."""
    n8 = nbytes // 8
    return (np.arange(n8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            + np.uint64(seed * 7919 + 1))


def digest(buf):
    return hashlib.blake2b(memoryview(buf).cast("B"), digest_size=16).hexdigest()


def open_store(name, directory=None, **kw):
    import dedupshm
    if directory is not None:
        kw["directory"] = directory
    return dedupshm.Store(name, **kw)


def store_files(name, directory=None):
    d = directory or SHM_DIR
    return [os.path.join(d, f"dedupshm.{name}.index"), os.path.join(d, f"dedupshm.{name}.pool")]


# ---------------------------------------------------------------- integrations

def addr_in_pool(addr, name):
    """True if address addr lies in a mapping of store name's pool file."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return len(parts) > 5 and f"dedupshm.{name}.pool" in parts[5]
    return False


def in_store(obj, name):
    """True if the first byte of obj (array, buffer or CPU tensor) is in the store's pool."""
    if hasattr(obj, "data_ptr"):
        addr = obj.data_ptr()
    elif isinstance(obj, np.ndarray):
        addr = obj.__array_interface__["data"][0]
    else:
        addr = np.frombuffer(obj, dtype=np.uint8).__array_interface__["data"][0]
    return addr_in_pool(addr, name)


def wait_objects(store, n, timeout=10):
    """Poll (collecting garbage) until the store holds n objects; returns the count seen."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        got = store.stats()["objects"]
        if got == n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


class ClassStore:
    """Mixin for unittest classes: a fresh 64 MiB store in ``cls.store``
    for the class's tests (set up first, gc()ed, check()ed -- errors fail
    the class -- and unlinked last)."""
    store = None
    store_tag = "tc"

    @classmethod
    def setUpClass(cls):
        import dedupshm
        cls.store = dedupshm.Store(f"{cls.store_tag}{os.getpid()}-{uuid.uuid4().hex[:10]}",
                                   create=True, capacity="64MiB")
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            store, cls.store = cls.store, None
            gc.collect()
            store.gc()
            errors = list(store.check().errors)
            store.unlink()
            store.close()
            assert not errors, errors
