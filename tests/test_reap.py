"""gc reaps a dead process's references in slices (the lock is released
between slices): several processes reaping at once release everything
exactly once, and slots come back for new processes."""
import multiprocessing as mp
import os
import signal
import time

import dedupshm
from helpers import wait_for


def _hold_and_park(name, n, conn):
    s = dedupshm.Store(name)
    refs = [s.put(b"%060d" % i) for i in range(n)]       # inline values, one handle each
    refs += [s.put(b"%3000d" % i) for i in range(n // 10)]  # packed ones
    conn.send(len(refs))
    signal.pause()


def _gc_loop(name, rounds, conn):
    s = dedupshm.Store(name)
    for _ in range(rounds):
        s.gc()
    conn.send(s.stats()["handles"])
    s.close()


def test_concurrent_reapers_release_once(make_store):
    s = make_store(capacity="256MiB")
    ctx = mp.get_context("spawn")
    victims = []
    for _ in range(3):
        r, w = ctx.Pipe()
        p = ctx.Process(target=_hold_and_park, args=(s.name, 20000, w))
        p.start()
        assert r.poll(120)
        assert r.recv() == 22000
        victims.append(p)
    assert s.stats()["handles"] == 66000
    for p in victims:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    reapers = []
    for _ in range(2):
        r, w = ctx.Pipe()
        p = ctx.Process(target=_gc_loop, args=(s.name, 20, w))
        p.start()
        reapers.append((p, r))
    s.gc()
    for p, r in reapers:
        assert r.poll(120)
        r.recv()
        p.join(30)
        assert p.exitcode == 0
    wait_for(lambda: (s.gc(), s.stats()["handles"] == 0 and s.stats()["objects"] == 0)[1],
             timeout=60, msg="every reference of the dead processes released")
    st = s.stats()
    assert st["small_bytes"] == 0 and st["clients"] == 1, st
    assert s.check().ok
    # the freed slots are usable again
    r, w = ctx.Pipe()
    p = ctx.Process(target=_gc_loop, args=(s.name, 1, w))
    p.start()
    assert r.poll(60)
    p.join(30)
    assert p.exitcode == 0


def _put_delete_loop(name, nbytes, conn):
    os.environ["DEDUPSHM_TEST_REAP_SLICE"] = "16"   # before the core reads it
    import numpy as np
    s = dedupshm.Store(name)
    a = np.random.default_rng(os.getpid()).integers(0, 2**63, nbytes // 8)
    conn.send("ready")
    i = 0
    while True:
        i += 1
        a[::512] = i                       # new pages every time
        r = s.put(a)
        s.delete(r)
        del r


def test_large_deletes_in_slices_stay_consistent_and_survive_sigkill(make_store):
    """Large values are released in slices after their last reference
    goes; check() between slices, and the releaser's SIGKILL at any point,
    leave the store consistent and nothing held."""
    import random
    s = make_store(capacity="1GiB")           # warm cap 256 MiB: deletes punch too
    ctx = mp.get_context("spawn")
    rng = random.Random(7)
    for round_ in range(4):
        r, w = ctx.Pipe()
        p = ctx.Process(target=_put_delete_loop, args=(s.name, 192 << 20, w))
        p.start()
        assert r.poll(120) and r.recv() == "ready"
        deadline = time.monotonic() + rng.uniform(0.3, 1.5)
        while time.monotonic() < deadline:
            rep = s.check()
            assert rep.ok, rep.errors[:5]
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    wait_for(lambda: (s.gc(), s.stats()["pages_used"] == 0)[1], timeout=60,
             msg="pages of killed releasers given back")
    st = s.stats()
    assert st["objects"] == 0 and st["handles"] == 0, st
    assert s.check().ok
