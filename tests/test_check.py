"""store.check(): a healthy store checks clean; damage is reported, not raised."""
import multiprocessing as mp
import os
import signal
import time

import numpy as np

import dedupshm
from helpers import MiB, PAGE


def rand(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_healthy_store_checks_clean(store):
    a = rand(2 * MiB, 1)
    store["a"] = a
    store["b"] = a                                   # shared pages
    b = a.copy()
    b[7 * PAGE] ^= 1
    store["c"] = b                                   # one page differs
    store["z"] = np.zeros(MiB)                       # zero pages
    refs = [store.put(f"small {i % 10}".encode()) for i in range(50)]   # packed + dedup
    with store.create("made", 3 * PAGE) as buf:
        buf[:] = a[:3 * PAGE].tobytes()
    m = store.mergeable_array(a.size, np.uint8)
    m[:] = a
    store.merger.scan()
    v = store.get("a")
    del store["b"]
    rep = store.check()
    assert rep.errors == [], rep.errors
    assert rep.ok and rep.objects >= 5 and rep.bytes_checked >= 2 * MiB
    del refs, v, m


def test_changed_page_bytes_are_reported(store):
    a = rand(MiB, 2)
    store["a"] = a
    store["b"] = a
    fd = os.open(store_paths(store)[1], os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff\xfe", 3 * PAGE + 10)      # scribble on a shared pool page
    finally:
        os.close(fd)
    rep = store.check()
    assert not rep.ok
    assert any("bytes changed" in e for e in rep.errors), rep.errors


def test_broken_refcount_is_reported(store):
    store["a"] = rand(MiB, 3)
    # page meta of page 0 lives at the header's pmeta offset: bump its refcount
    idx = store_paths(store)[0]
    with open(idx, "rb") as f:
        head = f.read(4096)
    import struct
    # ds_header: magic u64, format u32, page_size u32, capacity u64, cap_pages u32,
    # max_clients u32, salt 16, uuid 16, index_size u64, clients_off, pmeta_off ...
    pmeta_off = struct.unpack_from("<Q", head, 8 + 4 + 4 + 8 + 4 + 4 + 16 + 16 + 8 + 8)[0]
    fd = os.open(idx, os.O_RDWR)
    try:
        raw = os.pread(fd, 12, pmeta_off)
        fp, refcnt, nxt = struct.unpack("<III", raw)
        os.pwrite(fd, struct.pack("<III", fp, refcnt + 5, nxt), pmeta_off)
    finally:
        os.close(fd)
    rep = store.check()
    assert any("page 0: refcount" in e for e in rep.errors), rep.errors


def store_paths(store):
    from dedupshm.store import store_paths as sp
    return sp(store.name, store.directory)


def _put_forever(name, q):
    s = dedupshm.Store(name)
    q.put("ready")
    i = 0
    while True:
        s.put(rand(8 * MiB, i % 3), key=f"k{i % 5}")
        s.put(b"tiny %d" % (i % 7))
        with s.create(f"c{i % 3}", 5 * PAGE) as buf:
            buf[:4] = b"abcd"
        i += 1


def test_check_clean_after_sigkills_and_gc(make_store, store_name, procs):
    s = make_store(store_name, capacity="512MiB")
    ctx = mp.get_context("fork")
    for it in range(6):
        q = ctx.Queue()
        p = procs.start(ctx, _put_forever, store_name, q)
        assert q.get(timeout=30) == "ready"
        time.sleep(0.05 + 0.07 * it)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        s.gc()
        rep = s.check()
        assert rep.errors == [], (it, rep.errors)
    for k in list(s):
        del s[k]
    s.gc()
    st = s.stats()
    assert st["objects"] == 0 and st["physical_bytes"] == 0, st
    assert s.check().ok


def test_cli_check(store):
    import subprocess
    import sys
    store["a"] = rand(64 * 1024, 9)
    r = subprocess.run([sys.executable, "-m", "dedupshm", "check", store.name],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: 1 objects")
    fd = os.open(store_paths(store)[1], os.O_RDWR)
    try:
        os.pwrite(fd, b"\x01", 100)
    finally:
        os.close(fd)
    r = subprocess.run([sys.executable, "-m", "dedupshm", "check", store.name, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    import json
    rep = json.loads(r.stdout)
    assert not rep["ok"] and any("bytes changed" in e for e in rep["errors"])
