"""Issue 9 #8: no lock of the Python layer may be held across fork.

A thread that opens and closes stores holds the attach cache's lock at
random instants; a fork landing then must still give a child that can open
a store.  Pools that fork workers from their handler thread
(``maxtasksperchild``) while the main thread unpacks results are the case
users hit."""
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest

import dedupshm
from dedupshm.pool import Pool

FORK = mp.get_context("fork")


def _wait_child(pid, deadline):
    """Exit status of child pid, or None if it is still running at deadline
    (then it is SIGKILLed and reaped)."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@pytest.mark.limit(120)
def test_fork_while_another_thread_opens_and_closes_stores(make_store):
    churn = [make_store(capacity="16MiB") for _ in range(2)]
    target = make_store(capacity="16MiB")
    target["k"] = b"hello"
    names = [s.name for s in churn]
    for s in churn:
        s.close()                       # the thread's opens attach afresh each time
    tname = target.name
    target.close()
    stop = threading.Event()
    opened = [0]

    def opener():
        i = 0
        while not stop.is_set():
            s = dedupshm.Store(names[i % 2])
            s.close()
            del s
            i += 1
            opened[0] = i

    t = threading.Thread(target=opener, daemon=True)
    t.start()
    hung, failed, forks = 0, 0, 50
    try:
        while opened[0] < 5:
            time.sleep(0.001)
        for i in range(forks):
            time.sleep(0.001 * (i % 7))
            pid = os.fork()
            if pid == 0:                # child: open a store, read it, leave
                code = 1
                try:
                    with dedupshm.Store(tname) as s:
                        code = 0 if bytes(s["k"]) == b"hello" else 2
                finally:
                    os._exit(code)
            rc = _wait_child(pid, time.monotonic() + 10)
            if rc is None:
                hung += 1
            elif rc != 0:
                failed += 1
            if hung + failed >= 3:
                break                   # enough to tell
    finally:
        stop.set()
        t.join(30)
    assert opened[0] > 5
    assert (hung, failed) == (0, 0), f"{hung} of {forks} children hung, {failed} failed"


def _echo(a):
    return a


@pytest.mark.limit(300)
def test_pool_maxtasksperchild_imap_unordered_completes(make_store):
    s = make_store(capacity="64MiB")
    a = np.full(1 << 16, 3, dtype=np.uint8)            # 64 KiB: travels by reference
    n = 600
    got = 0
    with Pool(2, store=s, min_nbytes=4096, maxtasksperchild=1, context=FORK) as pool:
        it = pool.imap_unordered(_echo, [a] * n)     # results travel by reference too
        for _ in range(n):
            try:
                r = it.next(timeout=30)
            except mp.TimeoutError:
                pytest.fail(f"the pool stopped after {got} of {n} results")
            assert r.shape == a.shape and r[0] == 3 and r[-1] == 3
            got += 1
            del r
    assert got == n


_entered = threading.Event()
_gate = threading.Event()
_parent = [None]


class _Blocker:
    """Unpickles slowly in the parent (holding whatever value() holds), at
    once in a forked child."""

    def __reduce__(self):
        return (_rebuild_blocker, ())


def _rebuild_blocker():
    if os.getpid() == _parent[0]:
        _entered.set()
        _gate.wait(30)
    return "rebuilt"


@pytest.mark.limit(60)
def test_fork_while_a_thread_unpacks_a_message(make_store):
    from dedupshm.pool import pack
    s = make_store(capacity="16MiB")
    _parent[0] = os.getpid()
    _entered.clear()
    _gate.clear()
    p = pack({"b": _Blocker(), "n": 1}, s)
    t = threading.Thread(target=p.value, daemon=True)
    t.start()
    try:
        assert _entered.wait(10)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if p.value() == {"b": "rebuilt", "n": 1} else 2
            finally:
                os._exit(code)
        rc = _wait_child(pid, time.monotonic() + 10)
    finally:
        _gate.set()
        t.join(10)
    assert rc == 0, "the child hung on a lock held at fork" if rc is None else rc
    assert p.value() == {"b": "rebuilt", "n": 1}
