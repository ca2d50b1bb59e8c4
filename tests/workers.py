"""Bodies of the child processes the tests start ('spawn' and 'fork').

Each takes the store's name (and directory) and talks to the parent through
a queue, an event or a pipe.  Children that must stay alive until the parent
kills them park in ``_park()``, which also ends them if the parent is gone.
"""
import gc
import os
import time

import numpy as np

from helpers import digest, memory_reading, open_store, pattern_array, rand_array


def _park(limit=120):
    ppid = os.getppid()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and os.getppid() == ppid:
        time.sleep(0.05)
    os._exit(3)


def put_same_array(name, directory, key, size, seed, go, q):
    s = open_store(name, directory)
    arr = rand_array(size, seed)
    q.put("ready")
    if not go.wait(60):
        q.put(("timeout",))
        return
    s.put(arr, key=key)
    q.put(("done", key))
    s.close()


def put_keyed(name, directory, key, size, seed, q):
    s = open_store(name, directory)
    arr = rand_array(size, seed)
    s[key] = arr
    q.put(("put", digest(arr)))
    s.close()


def get_and_measure(name, directory, key, q):
    """Read a value; report its digest and how this process's memory moved."""
    s = open_store(name, directory)
    gc.collect()
    before = memory_reading()
    v = s[key]
    d = digest(v)
    after = memory_reading()
    q.put({
        "digest": d,
        "readonly": (not v.flags.writeable) if isinstance(v, np.ndarray) else v.readonly,
        "anon": after["anon"] - before["anon"],
        "shmem": after["shmem"] - before["shmem"],
    })
    del v
    s.close()


def send_ref_and_exit(name, directory, size, seed, q):
    """Put an unkeyed value, send its ObjectRef through a queue, exit."""
    s = open_store(name, directory)
    ref = s.put(rand_array(size, seed))
    q.put(ref)
    q.close()
    q.join_thread()   # the pickled ref is in the pipe before we go
    del ref
    gc.collect()
    s.close()


def send_ref_then_park(name, directory, size, seed, conn):
    """Put an unkeyed value, send its ref through a pipe, keep holding it."""
    s = open_store(name, directory)
    ref = s.put(rand_array(size, seed))
    conn.send(ref)
    conn.send("sent")
    _park()
    del ref, s


def hold_unkeyed(name, directory, size, seed, conn):
    s = open_store(name, directory)
    ref = s.put(rand_array(size, seed))
    view = s.get(ref)
    conn.send(("ready", digest(view)))
    _park()
    del ref, view, s


def reader(name, directory, key, conn):
    """Hold a view of key; answer 'check' with the view's digest, 'release'
    by dropping it, 'exit' by leaving."""
    s = open_store(name, directory)
    view = s[key]
    conn.send(("ready", digest(view)))
    while True:
        if not conn.poll(60):
            return
        cmd = conn.recv()
        if cmd == "check":
            conn.send(("digest", digest(view)))
        elif cmd == "release":
            del view
            gc.collect()
            conn.send(("released",))
        elif cmd == "exit":
            s.close()
            conn.send(("bye",))
            return


def big_put(name, directory, key, size, seed, conn):
    """Announce, then put a large value under key (the parent kills us)."""
    s = open_store(name, directory)
    arr = pattern_array(size, seed)
    conn.send("ready")
    s.put(arr, key=key)
    conn.send("done")
    _park()


def create_half(name, directory, key, size, conn):
    """Fill half of a create() buffer, then wait to be killed inside the block."""
    s = open_store(name, directory)
    with s.create(key, size) as buf:
        half = size // 2
        buf[:half] = b"\x5a" * half
        conn.send("ready")
        _park()


def lock_hammer(name, directory, conn):
    """Take the store lock as often as possible until killed."""
    s = open_store(name, directory)
    conn.send("ready")
    i = 0
    while True:
        s.gc()
        s[f"h{i % 64}"] = b"h%08d" % i * 16
        s[f"t{i % 64}"] = b"t%08d" % i            # a tiny value: inline with its key
        s.stats()
        if i % 8 == 0:
            len(s)
            list(s)
        i += 1


def probe(name, directory, conn):
    """Answer each request with stats()['objects'] (needs the store lock)."""
    s = open_store(name, directory)
    conn.send("ready")
    while True:
        if not conn.poll(120):
            return
        cmd = conn.recv()
        if cmd == "exit":
            s.close()
            return
        if cmd == "put":
            s["probe"] = b"p" * 5000
            conn.send(bytes(s["probe"]) == b"p" * 5000)
            continue
        conn.send(s.stats()["objects"])


def churn(name, directory, wid, seconds, q):
    """Put/get/delete own keys with self-checking content for a while."""
    s = open_store(name, directory)
    rng = np.random.default_rng(wid)
    deadline = time.monotonic() + seconds
    n = errors = 0
    live = {}
    while time.monotonic() < deadline:
        k = f"w{wid}-{int(rng.integers(0, 20))}"
        op = rng.integers(0, 3)
        if op == 0:
            size = int(rng.choice([100, 5000, 70000, 1 << 20]))
            seed = int(rng.integers(0, 1 << 30))
            v = rand_array(size, seed)
            s[k] = v
            live[k] = digest(v)
        elif op == 1 and k in live:
            if digest(s[k]) != live[k]:
                errors += 1
        elif op == 2 and k in live:
            del s[k]
            del live[k]
        n += 1
    # final check of everything we believe is there
    for k, d in live.items():
        if digest(s[k]) != d:
            errors += 1
    q.put((wid, n, errors, sorted(live)))
    s.close()


def cow_writer(name, directory, key, conn):
    """Write through a writable view; report what we and a read-only view see."""
    s = open_store(name, directory)
    w = s.get(key, writable=True)
    w[:] = 0xEE
    ro = s[key]
    conn.send((digest(w), digest(ro)))
    del w, ro
    s.close()


def seal_slowly(name, directory, key, size, conn):
    """Fill a create() buffer in two halves with a pause between (for
    visibility checks from the parent)."""
    s = open_store(name, directory)
    with s.create(key, size) as buf:
        buf[: size // 2] = b"\x11" * (size // 2)
        conn.send("half")
        conn.recv()  # parent checked invisibility
        buf[size // 2:] = b"\x22" * (size - size // 2)
    conn.send("sealed")
    s.close()


def get_loop(name, directory, key, expected_digest, conn):
    """Map and release key as fast as possible (the parent kills us)."""
    s = open_store(name, directory)
    v = s[key]
    ok = digest(v) == expected_digest
    del v
    conn.send(("ready", ok))
    i = 0
    while True:
        v = s.get(key, writable=(i % 3 == 0))
        _ = v[0]
        del v
        i += 1


def attached_after_unlink(name, directory, conn):
    s = open_store(name, directory)
    conn.send("attached")
    if conn.recv() != "go":
        return
    arr = rand_array(2 * 1024 * 1024, 5)
    s["after-unlink"] = arr
    ok = bool(np.array_equal(s["after-unlink"], arr)) and bytes(s["before"]) == b"b" * 100
    conn.send(ok)
    s.close()
