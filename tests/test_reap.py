"""gc reaps a dead process's references in slices (the lock is released
between slices): several processes reaping at once release everything
exactly once, and slots come back for new processes."""
import multiprocessing as mp
import os
import signal

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
