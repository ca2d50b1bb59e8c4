"""dedupshm.pool: Pool, ProcessPoolExecutor and Queue with real worker
processes.  Large values must travel as references (the bytes through the
pipe stay small), arrive zero-copy from the store's pages, be stored once,
and be freed when nobody holds them."""
import gc
import multiprocessing as mp
import os
import pickle
import time

import numpy as np
import pytest

from helpers import in_store, wait_objects
from dedupshm.pool import Pool, ProcessPoolExecutor, Queue, pack

MIN = 64 << 10          # small threshold keeps the tests fast
# the start method of the pools under test ($DEDUPSHM_TEST_START_METHOD, CI
# runs forkserver too: the default on Linux from Python 3.14)
CTX = mp.get_context(os.environ.get("DEDUPSHM_TEST_START_METHOD", "fork"))


def describe(x):
    """What the worker received: type, writeable, in the store, checksum."""
    name = os.environ.get("TI_STORE")
    if isinstance(x, np.ndarray):
        return ("nd", x.flags.writeable, in_store(x, name), float(x.sum()))
    if isinstance(x, memoryview):
        return ("mv", x.readonly, in_store(x, name), len(x))
    return (type(x).__name__, None, None, None)


def _set_ti_store(name):
    os.environ["TI_STORE"] = name


def ti(tstore):
    """Pool keywords giving the workers $TI_STORE (a forkserver's children
    have the environment of the server, started by an earlier test)."""
    return {"initializer": _set_ti_store, "initargs": (tstore.name,)}


def nested(x):
    a, d = x
    return describe(a) + describe(d["k"][0])


def add(a, b):
    return a + b


def big_result(i):
    return np.full(1 << 17, 3.0)          # 1 MiB, same for every task


def echo(x):
    return x


def boom(x):
    raise ValueError(f"bad {x}")


def slow(x):
    time.sleep(x)
    return x


class Holder:
    def __init__(self, arr):
        self.arr = arr


def holder_sum(h):
    return float(h.arr.sum()), h.arr.flags.writeable


def write_first(a):
    a[0] = 42.0
    return float(a[0])


# ---- Pool

def test_pool_arguments_and_results_travel_through_store(tstore):
    big = np.arange(1 << 17, dtype=np.float64)          # 1 MiB
    small = np.arange(10)
    with Pool(2, store=tstore, min_nbytes=MIN, context=CTX, **ti(tstore)) as pool:
        r = pool.map(describe, [big, small, b"x" * (MIN + 1), 7])
        assert r[0] == ("nd", False, True, float(big.sum()))
        assert r[1] == ("nd", True, False, float(small.sum()))      # small: pickled as usual
        assert r[2] == ("mv", True, True, MIN + 1)
        assert r[3] == ("int", None, None, None)
        assert pool.map(nested, [(big, {"k": [big]})]) == [("nd", False, True, float(big.sum())) * 2]
        res = pool.map(big_result, range(6))
        assert all(in_store(a, tstore.name) and not a.flags.writeable for a in res)
        assert all((a == 3.0).all() for a in res)
        # six equal 1 MiB results are stored once
        st = tstore.stats()
        assert st["logical_bytes"] >= 6 << 20
        assert st["physical_bytes"] < 2 << 20
        del res, r
    assert wait_objects(tstore, 0) == 0


def test_pool_api_is_multiprocessing_pools(tstore):
    big = np.ones(1 << 17)
    with Pool(2, store=tstore, min_nbytes=MIN, context=CTX) as pool:
        assert pool.starmap(add, [(1, 2), (big, big)])[0] == 3
        assert (pool.starmap(add, [(big, big)])[0] == 2).all()
        assert (pool.apply(add, (big,), {"b": 1}) == 2).all()
        ar = pool.apply_async(echo, (big,))
        assert ar.get(timeout=30).sum() == big.sum() and ar.ready() and ar.successful()
        assert [float(a.sum()) for a in pool.imap(echo, (big for _ in range(3)))] == [big.sum()] * 3
        assert sorted(pool.imap_unordered(echo, range(5), chunksize=2)) == list(range(5))
        it = pool.imap(echo, [1, 2])
        assert it.next(timeout=30) == 1 and next(it) == 2
        assert len(pool.map_async(echo, [big] * 4, chunksize=2).get(30)) == 4
        got = []
        pool.apply_async(echo, (big,), callback=got.append).wait(30)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(got[0], np.ndarray) and got[0].sum() == big.sum()
        with pytest.raises(ValueError, match="bad 3"):
            pool.apply(boom, (3,))
        errs = []
        ar4 = pool.apply_async(boom, (4,), error_callback=errs.append)
        ar4.wait(30)
        assert ar4.ready() and not ar4.successful()
        assert len(errs) == 1 and isinstance(errs[0], ValueError) and "bad 4" in str(errs[0])
        with pytest.raises(ValueError, match="bad 4"):
            ar4.get(0)
        # objects inside arbitrary picklable objects travel too
        assert pool.apply(holder_sum, (Holder(big),)) == (big.sum(), False)
        pool.close()
        pool.join()
    del ar, got, it
    assert wait_objects(tstore, 0) == 0


def test_pool_pipe_bytes_are_small(tstore):
    big = np.random.default_rng(1).random(1 << 19)        # 4 MiB
    msg = pickle.dumps(pack((big, {"a": [big]}), tstore, MIN))
    assert len(msg) < 1024
    assert len(pickle.dumps((big, {"a": [big]}))) > 4 << 20


def test_pool_same_argument_stored_once_and_freed(tstore):
    big = np.random.default_rng(2).random(1 << 19)        # 4 MiB
    with Pool(2, store=tstore, min_nbytes=MIN, context=CTX, **ti(tstore)) as pool:
        it = pool.imap(describe, [big] * 8)
        first = next(it)
        # while tasks are in flight: one stored copy for eight tasks
        assert tstore.stats()["logical_bytes"] <= (4 << 20) + (64 << 10)
        rest = list(it)
    assert first[2] and all(r == first for r in rest)
    assert wait_objects(tstore, 0) == 0
    assert tstore.stats()["physical_bytes"] == 0


def test_pool_writable_gives_private_copies(tstore):
    big = np.zeros(1 << 17)
    with Pool(1, store=tstore, min_nbytes=MIN, writable=True, context=CTX) as pool:
        assert pool.map(write_first, [big, big]) == [42.0, 42.0]
        r = pool.apply(echo, (big,))
        assert r.flags.writeable
        r[0] = 1.0                          # private: the store is unchanged
    assert big[0] == 0


def test_pool_spawn_context(tstore):
    big = np.ones(1 << 17)
    with Pool(1, store=tstore, min_nbytes=MIN, context=mp.get_context("spawn")) as pool:
        assert float(pool.apply(echo, (big,)).sum()) == big.sum()


def test_pool_terminate_then_gc_frees(make_store):
    ttl = 4
    s = make_store(capacity="256MiB", transit_ttl=ttl)
    big = np.ones(1 << 17)
    pool = Pool(1, store=s, min_nbytes=MIN, context=CTX)
    try:
        pool.map_async(slow, [0.5] * 3)
        sent = time.monotonic()
        r = pool.apply_async(echo, (big,))
        time.sleep(0.2)
    finally:
        pool.terminate()
        pool.join()
    del r
    gc.collect()
    # the unclaimed message's reference keeps its value until the transit
    # TTL: still reachable, never leaked into a dead process's name (judged
    # only while the TTL is surely not over: terminating a pool started by
    # forkserver can take seconds on a busy machine) ...
    objects = s.stats()["objects"]
    if time.monotonic() - sent < ttl - 1:
        assert objects == 1
    # ... and gc frees it once the TTL is over
    deadline = time.monotonic() + 30
    while s.stats()["objects"] and time.monotonic() < deadline:
        time.sleep(0.2)
        s.gc()
    assert s.stats()["objects"] == 0


def test_bad_arguments(tstore):
    with pytest.raises(TypeError):
        Pool(1, store="nope")
    with pytest.raises(ValueError):
        Pool(1, store=tstore, min_nbytes=0)


# ---- ProcessPoolExecutor

def test_executor(tstore):
    big = np.arange(1 << 17, dtype=np.float64)
    with ProcessPoolExecutor(2, store=tstore, min_nbytes=MIN, mp_context=CTX) as ex:
        f = ex.submit(add, big, b=big)
        out = f.result(timeout=30)
        assert in_store(out, tstore.name) and (out == 2 * big).all()
        assert [float(a.sum()) for a in ex.map(add, [big, big], [1, 2])] == \
            [float(big.sum()) + len(big), float(big.sum()) + 2 * len(big)]
        assert list(ex.map(add, range(4), range(4), chunksize=2)) == [0, 2, 4, 6]
        with pytest.raises(ValueError, match="bad 1"):
            ex.submit(boom, 1).result(timeout=30)
        blocker = [ex.submit(slow, 0.3) for _ in range(4)]
        last = ex.submit(slow, 0.3)
        assert last.cancel() or last.result(timeout=30) == 0.3
        for b in blocker:
            b.result(timeout=30)
    del f, out
    assert wait_objects(tstore, 0) == 0


# ---- Queue

def _producer(q, n):
    for i in range(n):
        q.put((i, np.full(1 << 17, float(i + 1))))
    q.put(None)


def test_queue_between_processes(tstore):
    q = Queue(store=tstore, min_nbytes=MIN, ctx=CTX)
    p = CTX.Process(target=_producer, args=(q, 4), daemon=True)
    p.start()
    try:
        got = []
        while True:
            item = q.get(timeout=30)
            if item is None:
                break
            i, a = item
            assert in_store(a, tstore.name) and not a.flags.writeable and a[0] == i + 1
            got.append(i)
        assert got == [0, 1, 2, 3]
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join()
    del item, a
    assert wait_objects(tstore, 0) == 0


def test_queue_in_process(tstore):
    q = Queue(store=tstore, min_nbytes=MIN, ctx=CTX)
    q.put(b"y" * (MIN * 2))
    q.put_nowait("small")
    v = q.get(timeout=10)
    assert isinstance(v, memoryview) and v.readonly and v == b"y" * (MIN * 2)
    assert q.get(timeout=10) == "small" and q.empty()
    q.close()
    q.join_thread()


def test_import_dedupshm_never_imports_torch():
    import subprocess
    import sys
    code = ("import sys, dedupshm, dedupshm.pool, dedupshm.sequence, dedupshm.server; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_queue_follows_a_store_created_anew_under_the_same_name(make_store):
    old = make_store(capacity="64MiB")
    q_old = Queue(store=old, min_nbytes=MIN, ctx=CTX)         # registers `old` by name
    old.unlink()                                               # `old` stays open
    new = make_store(old.name, capacity="64MiB")
    q = Queue(store=new, min_nbytes=MIN, ctx=CTX)
    q.put(np.full(1 << 17, 5.0))
    got = q.get(timeout=10)
    assert in_store(got, new.name) and got[0] == 5.0
    del got
    for x in (q, q_old):
        x.close()
        x.join_thread()


def test_min_nbytes_1_small_buffers(tstore):
    """min_nbytes=1: buffers of any size travel, and the references that
    carry them (which pickle small bytes themselves) do not recurse."""
    values = [b"", b"x", bytes(range(16)), bytes(100), bytes(range(256)) * 16,
              np.arange(3, dtype=np.uint8)]
    with Pool(1, store=tstore, min_nbytes=1, context=CTX) as pool:
        out = pool.map(echo, values)
    assert [bytes(v) for v in out] == [bytes(v) for v in values]
    assert isinstance(out[3], memoryview)               # travelled (a small value: a copy)
    assert isinstance(out[4], memoryview) and in_store(out[4], tstore.name)


class _Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("cannot pickle this")


def test_unpicklable_arguments_fail_the_result(tstore):
    """As in multiprocessing: the *_async call returns, its result (and
    error_callback) carries the pickling error; the pool goes on."""
    for pool_cls, kw in ((Pool, {"store": tstore}), (mp.pool.Pool, {})):
        with pool_cls(1, context=CTX, **kw) as pool:
            errors = []
            r = pool.apply_async(echo, (_Unpicklable(),), error_callback=errors.append)
            with pytest.raises(pickle.PicklingError):
                r.get(timeout=30)
            m = pool.map_async(echo, [1, _Unpicklable()], error_callback=errors.append)
            with pytest.raises(pickle.PicklingError):
                m.get(timeout=30)
            deadline = time.monotonic() + 30
            while len(errors) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [type(e) for e in errors] == [pickle.PicklingError] * 2, pool_cls
            assert pool.apply(echo, (5,)) == 5
