"""dedupshm.pool.ProcessPoolExecutor does what the concurrent.futures docs
promise of a ProcessPoolExecutor: every test runs against ours (over a
store, every buffer of at least 1 byte travelling by reference) and against
concurrent.futures.ProcessPoolExecutor, the reference.

Start method: $DEDUPSHM_TEST_START_METHOD (default fork)."""
import concurrent.futures as cf
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

from helpers import in_store
from dedupshm.pool import ProcessPoolExecutor

CTX = mp.get_context(os.environ.get("DEDUPSHM_TEST_START_METHOD", "fork"))


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def fail(msg):
    raise KeyError(msg)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def wait_file(path, deadline_s=30):
    """Block until ``path`` exists (the test's go signal)."""
    end = time.monotonic() + deadline_s
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.01)
    return os.getpid()


def _raise_value_error():
    raise ValueError("cannot unpickle this")


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("cannot pickle this")


class ErrorAtUnpickle:
    def __reduce__(self):
        return _raise_value_error, ()


def unpicklable_result():
    return lambda: 1


_init_value = None


def init(value):
    global _init_value
    _init_value = value


def init_fails():
    raise RuntimeError("initializer failed")


def get_init_value(_=None):
    return _init_value


def pid(_=None):
    return os.getpid()


def first_byte(b):
    return bytes(b[:1]), len(b)


@pytest.fixture(params=["dedupshm", "concurrent.futures"])
def make_executor(request, tstore):
    made = []

    def factory(max_workers=2, **kw):
        kw.setdefault("mp_context", CTX)
        if request.param == "dedupshm":
            ex = ProcessPoolExecutor(max_workers, store=tstore, min_nbytes=1, **kw)
        else:
            ex = cf.ProcessPoolExecutor(max_workers, **kw)
        made.append(ex)
        return ex

    factory.ours = request.param == "dedupshm"
    factory.store = tstore
    yield factory
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


def test_is_a_process_pool_executor(tstore):
    with ProcessPoolExecutor(1, store=tstore, mp_context=CTX) as ex:
        assert isinstance(ex, cf.ProcessPoolExecutor)
        assert isinstance(ex.submit(square, 3), cf.Future)


def test_submit_result_and_exception(make_executor):
    with make_executor() as ex:
        f = ex.submit(add, 2, b=3)
        assert f.result(timeout=30) == 5
        assert f.done() and not f.running() and not f.cancelled()
        g = ex.submit(fail, "nope")
        with pytest.raises(KeyError, match="nope"):
            g.result(timeout=30)
        assert isinstance(g.exception(timeout=30), KeyError)


def test_large_values_travel_by_reference(make_executor):
    with make_executor() as ex:
        data = bytes(range(256)) * 4096
        head, n = ex.submit(first_byte, data).result(timeout=30)
        assert (head, n) == (b"\x00", len(data))
        big = np.arange(1 << 16, dtype=np.float64)
        out = ex.submit(add, big, b=big).result(timeout=30)
        assert (out == 2 * big).all()
        assert in_store(out, make_executor.store.name) == make_executor.ours


def test_unpicklable_result_is_the_futures_exception(make_executor):
    with make_executor() as ex:
        f = ex.submit(unpicklable_result)
        assert f.exception(timeout=30) is not None
        assert ex.submit(square, 4).result(timeout=30) == 16    # the pool still works


def test_map_order_iterables_chunksize(make_executor):
    with make_executor() as ex:
        assert list(ex.map(square, range(20))) == [i * i for i in range(20)]
        assert list(ex.map(add, range(10), range(100, 90, -1), chunksize=3)) == [100] * 10
        assert list(ex.map(square, [])) == []
        it = ex.map(fail, ["x"])
        with pytest.raises(KeyError):
            next(it)


def test_map_timeout(make_executor, tmp_path):
    go = tmp_path / "go"
    with make_executor(1) as ex:
        it = ex.map(wait_file, [str(go)], timeout=0.2)
        with pytest.raises(cf.TimeoutError):
            next(it)
        go.touch()


def test_wait_and_as_completed_and_done_callbacks(make_executor):
    with make_executor() as ex:
        seen = []
        fs = [ex.submit(square, i) for i in range(8)]
        for f in fs:
            f.add_done_callback(seen.append)
        done, not_done = cf.wait(fs, timeout=30)
        assert not not_done
        assert sorted(f.result() for f in cf.as_completed(fs, timeout=30)) == \
            [i * i for i in range(8)]
        deadline = time.monotonic() + 30
        while len(seen) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert set(map(id, seen)) == set(map(id, fs))       # the caller's futures


def test_shutdown_then_submit_raises(make_executor):
    ex = make_executor()
    assert ex.submit(square, 2).result(timeout=30) == 4
    ex.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        ex.submit(square, 3)
    ex.shutdown()                              # again: no error


def test_shutdown_cancel_futures(make_executor, tmp_path):
    go = tmp_path / "go"
    ex = make_executor(1)
    running = ex.submit(wait_file, str(go))
    pending = [ex.submit(square, i) for i in range(20)]
    t = threading.Thread(target=ex.shutdown, kwargs={"wait": True, "cancel_futures": True})
    t.start()
    go.touch()
    t.join(60)
    assert not t.is_alive()
    assert running.result(timeout=30) > 0
    cancelled = [f for f in pending if f.cancelled()]
    assert cancelled                           # the queue beyond the call queue is dropped
    for f in pending:
        assert f.done()
        if not f.cancelled():
            f.result(timeout=0)


def test_shutdown_wait_false_returns_at_once(make_executor, tmp_path):
    go = tmp_path / "go"
    ex = make_executor(1)
    f = ex.submit(wait_file, str(go))
    t0 = time.monotonic()
    ex.shutdown(wait=False)
    returned_in = time.monotonic() - t0
    go.touch()
    assert f.result(timeout=30) > 0           # the running call still completes
    assert returned_in < 10                   # not a timing claim: it did not wait for go


def test_context_manager_waits(make_executor, tmp_path):
    go = tmp_path / "go"
    with make_executor(1) as ex:
        f = ex.submit(wait_file, str(go))
        threading.Timer(0.3, go.touch).start()
    assert f.done() and f.result() > 0         # __exit__ is shutdown(wait=True)


def test_worker_death_breaks_the_pool(make_executor):
    ex = make_executor()
    f = ex.submit(die)
    with pytest.raises(BrokenProcessPool):
        f.result(timeout=60)
    with pytest.raises(BrokenProcessPool):
        ex.submit(square, 1)


def test_initializer(make_executor):
    with make_executor(2, initializer=init, initargs=("hello",)) as ex:
        assert set(ex.map(get_init_value, [None] * 4, timeout=30)) == {"hello"}


def test_initializer_failure_breaks_the_pool(make_executor):
    ex = make_executor(1, initializer=init_fails)
    f = ex.submit(square, 2)
    with pytest.raises(BrokenProcessPool):
        f.result(timeout=60)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="max_tasks_per_child is 3.11+")
def test_max_tasks_per_child(make_executor):
    if CTX.get_start_method() == "fork":
        pytest.skip("max_tasks_per_child refuses the fork start method")
    with make_executor(1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(pid).result(timeout=60) for _ in range(4)]
    assert len(set(pids)) == 2


def test_cancel_a_pending_future(make_executor, tmp_path):
    go = tmp_path / "go"
    with make_executor(1) as ex:
        blocker = ex.submit(wait_file, str(go))
        queued = [ex.submit(square, i) for i in range(10)]
        last = queued[-1]
        assert last.cancel()                   # beyond the call queue: not started yet
        assert last.cancelled() and last.done()
        with pytest.raises(cf.CancelledError):
            last.result(timeout=0)
        go.touch()
        assert blocker.result(timeout=30) > 0
        assert [f.result(timeout=30) for f in queued[:-1]] == [i * i for i in range(9)]


def test_argument_that_cannot_be_pickled_fails_its_future(make_executor):
    with make_executor() as ex:
        f = ex.submit(id, ErrorAtPickle())
        with pytest.raises(pickle.PicklingError):
            f.result(timeout=30)
        assert ex.submit(square, 3).result(timeout=30) == 9


def test_argument_that_cannot_be_unpickled(make_executor):
    """Ours: that future fails with the error and the pool goes on (the
    argument is unpickled inside the task); the standard executor's worker
    dies on it and the pool is broken."""
    ex = make_executor()
    f = ex.submit(id, ErrorAtUnpickle())
    if make_executor.ours:
        with pytest.raises(ValueError, match="cannot unpickle"):
            f.result(timeout=60)
        assert ex.submit(square, 3).result(timeout=30) == 9
    else:
        with pytest.raises(BrokenProcessPool):
            f.result(timeout=60)
