"""Issue 9, the object/pool side of the C core: capacity counts only new
pages (#4), create() hands out clean pages and commits through the put
pipeline (#5, #16), values of more page runs than a process may map are
still readable (#11), fallocate survives signals (#15), and the scalar and
AVX2 fingerprint kernels agree (CI runs the store on the scalar one)."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import dedupshm
from helpers import MiB, PAGE, rand_array

HERE = os.path.dirname(os.path.abspath(__file__))


def _pages(s):
    return s.stats()["pages_used"]


def _run(code, env=None, timeout=120):
    e = dict(os.environ)
    e.update(env or {})
    e["PYTHONPATH"] = HERE + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=e)


# ================================================================ #4 capacity counts new pages only

def test_zero_value_larger_than_capacity_fits(make_store):
    s = make_store(capacity="1MiB")
    z = np.zeros(2 * MiB, dtype=np.uint8)
    s["z"] = z                                     # needs no page at all
    assert np.array_equal(s["z"], z) and _pages(s) == 0
    with s.create("cz", 2 * MiB):                  # left zero: needs no page either
        pass
    assert bytes(s["cz"]) == bytes(2 * MiB)
    assert _pages(s) == 0 and s.check().ok


def test_copies_of_stored_content_fit_a_full_store(make_store):
    s = make_store(capacity="1MiB")
    a = rand_array(1 * MiB - 4 * PAGE, 41)         # the store is (nearly) full
    s["a"] = a
    used = _pages(s)
    with pytest.raises(dedupshm.StoreFullError):
        s.put(rand_array(64 * PAGE, 42))
    four = np.tile(a, 4)                           # 4x the capacity, no new page
    s["four"] = four
    assert np.array_equal(s["four"], four)
    # create() of content already stored: neither create nor commit fails
    with s.create("c", a.nbytes) as buf:
        buf[:] = a.tobytes()
    assert np.array_equal(np.frombuffer(s["c"], np.uint8), a)
    assert _pages(s) == used and s.check().ok


def test_repeated_page_value_fits_a_small_store(make_store):
    s = make_store(capacity="1MiB")
    page = rand_array(PAGE, 43)
    v = np.tile(page, 1024)                        # 4 MiB: one distinct page
    s["v"] = v
    assert np.array_equal(s["v"], v)
    assert _pages(s) == 1 and s.check().ok


# ================================================================ #5 create leaves no old bytes

def test_create_pages_are_clean_and_tail_dedups(make_store):
    s = make_store(capacity="16MiB", warm_bytes="16MiB")
    for i in range(4):                             # leave warm freed pages with old bytes
        s[f"old{i}"] = rand_array(64 * PAGE, 50 + i)
    for i in range(4):
        del s[f"old{i}"]
    assert _pages(s) == 0
    y = rand_array(PAGE, 60)[:3000].tobytes()     # one page, tail not the caller's
    with s.create("c", len(y)) as buf:
        assert bytes(buf) == bytes(len(y))        # no earlier object's bytes show
        buf[:] = y
    assert bytes(s["c"]) == y
    before = _pages(s)
    s["p"] = y                                     # put of the same bytes: same page
    assert _pages(s) == before == 1, "create() left old bytes in its last page's tail"
    # whole pages handed out are zero too
    with s.create("d", 32 * PAGE) as buf:
        assert bytes(buf) == bytes(32 * PAGE)
    assert s.check().ok


# ================================================================ #16 commit uses the put pipeline

def test_create_dedups_within_the_value(make_store):
    s = make_store(capacity="64MiB")
    page = rand_array(PAGE, 70).tobytes()
    with s.create("c", 1024 * PAGE) as buf:
        for i in range(1024):
            buf[i * PAGE:(i + 1) * PAGE] = page
    assert _pages(s) == 1, f"1024 identical pages took {_pages(s)} pool pages"
    assert bytes(s["c"]) == page * 1024
    st = s.stats()
    assert st["pages_sharing"] == 1023
    assert s.check().ok


def test_commit_does_not_hold_the_lock_for_the_value(make_store):
    """A thread doing small puts while another commits a large created
    value waits far less than the commit takes (the old commit compared
    and mapped every page under the one lock).  The value's pages all
    dedup against a stored copy, so the commit is comparison-bound."""
    s = make_store(capacity="512MiB")
    n = 128 * MiB
    a = rand_array(n, 80)
    s["a"] = a
    mv = memoryview(a).cast("B")
    worst = []
    for rep in range(3):
        with s.create(f"c{rep}", n) as buf:
            buf[:] = mv
            stop = threading.Event()
            started = threading.Event()
            waits = []

            def small_puts():
                i = 0
                while not stop.is_set():
                    t0 = time.perf_counter()
                    s.put(b"x%d" % i, key="small")
                    waits.append(time.perf_counter() - t0)
                    i += 1
                    started.set()

            th = threading.Thread(target=small_puts)
            th.start()
            started.wait(10)
            t0 = time.perf_counter()
        commit = time.perf_counter() - t0           # the with block's exit is the commit
        stop.set()
        th.join(30)
        worst.append((max(waits), commit, len(waits)))
    assert np.array_equal(np.frombuffer(s["c2"], np.uint8), a)
    # generous: the old code made a small put wait ~the whole commit (measured
    # 0.77-0.96 of it); the pipeline holds the lock per 64 pages (0.1-0.2,
    # scheduling noise on a shared machine).  The best of three must be < 1/2.
    print("lock probe (worst wait s, commit s, puts):", worst)
    assert min(w / c for w, c, _ in worst) < 0.5, worst


# ================================================================ #11 fragmented values stay readable

FRAG = """
import ctypes, mmap, os, sys
import numpy as np
import dedupshm
from helpers import rand_array, PAGE, MiB

s = dedupshm.Store(sys.argv[1] if len(sys.argv) > 1 else os.environ["NAME"])
n = 4096
a = rand_array(n * PAGE, 90)                  # stored: pool pages 0..n-1
s["a"] = a
u = rand_array(n * PAGE, 91)
v = np.empty(2 * n * PAGE, np.uint8)
A, U, V = a.reshape(n, PAGE), u.reshape(n, PAGE), v.reshape(2 * n, PAGE)
V[0::2] = A[::-1]                             # dedups onto a's pages, backwards
V[1::2] = U                                   # new pages: every page is its own run
s["v"] = v
assert s.check().ok
if os.environ.get("EAT_MAPS"):
    # leave far fewer free mappings than the value has runs
    maxmap = int(open("/proc/sys/vm/max_map_count").read())
    used = len(open("/proc/self/maps").readlines())
    eat = max(0, maxmap - used - 3000)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    base = libc.mmap(None, (eat + 1) * PAGE, 3, 0x22 | 0x4000, -1, 0)
    for i in range(0, eat, 2):
        libc.mprotect(base + i * PAGE, PAGE, 1)
    assert len(open("/proc/self/maps").readlines()) > maxmap - 3500
for writable in (False, True):
    got = s.get("v", writable=writable)
    assert got.flags.writeable == writable, writable
    assert np.array_equal(got, v), writable
    if writable:
        got[::PAGE] ^= 0xFF                   # private: the store keeps its bytes
        assert np.array_equal(s["v"], v)
    del got
# a created value as fragmented as that commits and reads back too
with s.create("c", v.nbytes) as buf:
    buf[:] = memoryview(v).cast("B")
assert np.array_equal(np.frombuffer(buf, np.uint8), v)
assert np.array_equal(np.frombuffer(s["c"], np.uint8), v)
assert s.check().ok
s.close()
print("ok")
"""


@pytest.mark.limit(180)
def test_value_with_more_runs_than_free_mappings_reads_back(make_store, store_name):
    make_store(store_name, capacity="128MiB")
    r = _run(FRAG, env={"NAME": store_name, "EAT_MAPS": "1", "DEDUPSHM_VIEW_RUNS": "1024"})
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stdout, r.stderr[-3000:])


@pytest.mark.limit(180)
def test_fragmented_value_reads_back_over_a_small_view_budget(make_store, store_name):
    make_store(store_name, capacity="128MiB")
    r = _run(FRAG, env={"NAME": store_name, "DEDUPSHM_VIEW_RUNS": "16"})
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stdout, r.stderr[-3000:])


# ================================================================ #15 fallocate and signals

def test_puts_and_creates_survive_a_1khz_signal(make_store):
    s = make_store(capacity="512MiB", warm_bytes=0)
    hits = [0]

    def on_sig(signum, frame):
        hits[0] += 1

    old = signal.signal(signal.SIGPROF, on_sig)
    signal.setitimer(signal.ITIMER_PROF, 0.001, 0.001)
    try:
        for i in range(6):
            a = rand_array(32 * MiB, 100 + i)      # new pages: fallocate every time
            r = s.put(a)
            assert np.array_equal(s.get(r), a)
            with s.create(f"c{i}", 8 * MiB) as buf:
                buf[:] = rand_array(8 * MiB, 200 + i).tobytes()
            s.delete(r)                             # punched again (warm_bytes=0)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, old)
    assert hits[0] > 0
    assert s.check().ok


# ================================================================ fingerprint kernels

FP = """
import os, sys
import numpy as np
import dedupshm
from dedupshm import _native
from helpers import rand_array, PAGE
s = dedupshm.Store(os.environ["NAME"])
pages = [bytes(PAGE), b"\\xff" * PAGE, rand_array(PAGE, 1).tobytes(),
         bytes(range(256)) * 16] + [rand_array(PAGE, 7 + i).tobytes() for i in range(20)]
print(_native.hash_impl())
print(" ".join(str(s._fingerprint(p)) for p in pages))
s.close()
"""


def test_scalar_and_avx2_fingerprints_agree(make_store, store_name):
    make_store(store_name, capacity="16MiB")
    out = {}
    for kernel in ("scalar", "avx2"):
        r = _run(FP, env={"NAME": store_name, "DEDUPSHM_FINGERPRINT": kernel})
        assert r.returncode == 0, r.stderr[-3000:]
        impl, fps = r.stdout.split("\n")[:2]
        out[kernel] = (impl, fps)
    assert out["scalar"][0] == "scalar", "DEDUPSHM_FINGERPRINT=scalar was not honoured"
    if out["avx2"][0] != "avx2":
        pytest.skip("this CPU has no AVX2")
    assert out["scalar"][1] == out["avx2"][1]


# ================================================================ create() buffers and fork

@pytest.mark.limit(60)
def test_child_writing_an_inherited_create_buffer_changes_no_stored_byte(make_store):
    """A child forked inside ``with create()`` keeps its copy of the buffer;
    after the parent commits, the child's writes to it must stay its own
    (the old create mapped the pool pages themselves, MAP_SHARED)."""
    s = make_store(capacity="64MiB")
    data = rand_array(64 * PAGE, 110).tobytes()
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    with s.create("c", len(data)) as buf:
        buf[:] = data
        pid = os.fork()
        if pid == 0:                                   # child: never leaves the block
            try:
                os.read(go_r, 1)                       # the parent has committed
                buf[:] = b"\xaa" * len(data)
                os.write(done_w, b"1")
            finally:
                os._exit(0)
    os.write(go_w, b"1")
    assert os.read(done_r, 1) == b"1"
    _, status = os.waitpid(pid, 0)
    assert status == 0
    for fd in (go_r, go_w, done_r, done_w):
        os.close(fd)
    assert bytes(s["c"]) == data, "a child's write reached the stored pages"
    assert bytes(buf) == data
    s["again"] = data                                  # and it still dedups onto them
    assert s.stats()["pages_used"] == 64
    assert s.check().ok


# ================================================================ #17 ids read from shared memory

def _class_units():
    units, u = [], 2
    for _ in range(120):
        units.append(u)
        n = u + u // 4
        u = n if n > u else u + 1
    return units


def _heap_chunks(index_path):
    """(file offset, kind, cls) of every chunk of a store's heap."""
    import struct
    with open(index_path, "rb") as f:
        head = f.read(4096)
        heap_off = struct.unpack_from("<Q", head, 104)[0]
        f.seek(heap_off)
        heap = f.read(64 << 20)
    units, out, uid = _class_units(), [], 1
    while uid * 16 + 2 <= len(heap):
        kind, cls = heap[uid * 16], heap[uid * 16 + 1]
        if kind == 0 or cls >= 120:
            break
        out.append((heap_off + uid * 16, kind, cls))
        uid += units[cls]
    return out


@pytest.mark.corrupts_store
def test_chunk_with_unknown_class_is_never_freed_into_the_header(make_store):
    """A blob whose class byte is corrupt: freeing it used to index the
    class tables with it (free_head[126] is the 'objects' counter)."""
    from dedupshm.store import store_paths
    s = make_store(capacity="16MiB")
    s["v"] = rand_array(8 * PAGE, 120)
    index = store_paths(s.name, s.directory)[0]
    blobs = [(off, cls) for off, kind, cls in _heap_chunks(index) if kind == 0xB2]
    assert len(blobs) == 1, blobs
    with open(index, "r+b") as f:
        f.seek(blobs[0][0] + 1)
        f.write(bytes([126]))
    del s["v"]
    import gc
    gc.collect()
    st = s.stats()
    assert st["objects"] == 0 and st["keys"] == 0, st
    rep = s.check()
    assert not rep.ok and any("class" in e for e in rep.errors), rep.errors
    # the store goes on working around the leaked chunk
    w = rand_array(8 * PAGE, 121)
    s["w"] = w
    assert np.array_equal(s["w"], w)
