"""Freed memory decays instead of being punched at once (issue 10).

A freed page stays faulted in ("warm", up to ``warm_bytes``) so the next
put reuses it without page faults, and a background thread of every
process returns it to the kernel once it has been unused for the decay
time (``decay_s`` / DEDUPSHM_DECAY_MS).  Memory is measured on the store's
pool file (st_blocks), never by wall time.
"""
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import dedupshm
from helpers import MiB, file_bytes, store_files

PAGE = 4096


def pool_bytes(store):
    return file_bytes(store_files(store.name)[1])


def random_array(nbytes, seed):
    return np.random.default_rng(seed).integers(0, 2**63, size=nbytes // 8, dtype=np.uint64)


def wait_until(cond, timeout=15.0, step=0.05):
    """Poll cond() (only os.stat and the like: no store calls)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def test_delete_does_not_punch(make_store):
    # larger than the old 32 MiB default of warm_bytes: main punched the rest
    s = make_store(capacity=256 * MiB, decay_s=60)
    a = random_array(48 * MiB, 1)
    r = s.put(a)
    before = pool_bytes(s)
    assert before >= 48 * MiB
    s.delete(r)
    del r
    assert pool_bytes(s) == before               # nothing returned on the delete path
    st = s.stats()
    assert st["pages_free_warm"] == 48 * MiB // PAGE
    assert st["warm_bytes"] == 48 * MiB
    assert st["physical_bytes"] == 0             # warm pages are not stored data
    assert s.check().ok


def test_warm_pages_are_reused(make_store):
    s = make_store(capacity=256 * MiB, decay_s=60)
    a = random_array(48 * MiB, 2)
    s.delete(s.put(a))
    held = pool_bytes(s)
    assert s.stats()["pages_free_warm"] == 48 * MiB // PAGE
    a[:: PAGE // 8] += np.uint64(1)              # every page differs: no dedup hit
    r = s.put(a)
    assert pool_bytes(s) == held                 # the warm pages, not new ones
    assert s.stats()["pages_free_warm"] == 0
    assert np.array_equal(s.get(r), a)


def test_decayed_pages_are_returned_without_any_call(make_store):
    s = make_store(capacity=256 * MiB, decay_s=0.5)
    r = s.put(random_array(16 * MiB, 3))
    s.delete(r)
    del r
    assert pool_bytes(s) >= 16 * MiB
    # no store call from here on: the background thread gives it back
    assert wait_until(lambda: pool_bytes(s) < 1 * MiB), pool_bytes(s)
    st = s.stats()
    assert st["pages_free_warm"] == 0
    assert s.check().ok


def test_idle_process_gives_memory_back(make_store, tmp_path):
    # another process puts, deletes, and then does nothing at all; the
    # decay time comes from the environment
    s = make_store(capacity=256 * MiB, decay_s=3600)   # our own thread: too slow to matter
    flag = tmp_path / "deleted"
    code = textwrap.dedent(f"""
        import sys, time, numpy as np, dedupshm
        s = dedupshm.Store({s.name!r})
        a = np.random.default_rng(4).integers(0, 2**63, size={16 * MiB // 8}, dtype=np.uint64)
        s.delete(s.put(a))
        open({str(flag)!r}, "w").close()
        time.sleep(60)
    """)
    env = dict(os.environ, DEDUPSHM_DECAY_MS="500")
    p = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        assert wait_until(flag.exists, timeout=30)
        assert wait_until(lambda: pool_bytes(s) < 1 * MiB), pool_bytes(s)
        assert p.poll() is None                  # it was idle, not exiting
    finally:
        p.kill()
        p.wait()
    assert s.check().ok


def test_warm_cap_is_honoured(make_store):
    s = make_store(capacity=256 * MiB, warm_bytes=4 * MiB, decay_s=60)
    r = s.put(random_array(32 * MiB, 5))
    assert pool_bytes(s) >= 32 * MiB
    s.delete(r)
    del r
    st = s.stats()
    assert st["pages_free_warm"] == 4 * MiB // PAGE
    assert pool_bytes(s) <= 4 * MiB + 64 * 1024
    assert s.check().ok


def test_warm_bytes_zero_keeps_nothing(make_store):
    s = make_store(capacity=64 * MiB, warm_bytes=0, decay_s=60)
    s.delete(s.put(random_array(8 * MiB, 6)))
    assert s.stats()["pages_free_warm"] == 0
    assert pool_bytes(s) <= 64 * 1024


def test_decay_s_is_validated(make_store):
    with pytest.raises(ValueError):
        make_store(decay_s=-1)
    with pytest.raises(TypeError):
        make_store(decay_s="soon")


@pytest.mark.limit(120)
def test_fork_while_decaying_does_not_hang(make_store):
    s = make_store(capacity=256 * MiB, decay_s=0)
    a = random_array(4 * MiB, 7)
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            i += 1
            a[:: PAGE // 8] += np.uint64(i)
            s.delete(s.put(a))

    t = threading.Thread(target=churn)
    t.start()
    try:
        for i in range(20):
            pid = os.fork()
            if pid == 0:                        # child: use the store, then leave
                code = 1
                try:
                    b = np.arange(i, i + PAGE, dtype=np.uint64)
                    r = s.put(b, key=f"child{i}")
                    ok = np.array_equal(s.get(f"child{i}"), b)
                    s.delete(f"child{i}")
                    del r
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 30
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("a child forked while the decayer ran hung")
                time.sleep(0.01)
            assert os.waitstatus_to_exitcode(status) == 0
            time.sleep(0.02)
    finally:
        stop.set()
        t.join()
    assert wait_until(lambda: s.stats()["pages_free_warm"] == 0)
    assert s.check().ok
