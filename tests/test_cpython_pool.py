"""CPython's own multiprocessing.Pool tests (Lib/test/_test_multiprocessing.py)
run against dedupshm.pool.Pool, which claims to be a drop-in Pool.

Nothing is copied from CPython: the suite is imported from the running
interpreter's ``test`` package (skipped, with the reason, where the
interpreter ships without it) and its Pool classes are subclassed twice:

* ``WithDedupshm...``: ``self.Pool`` is our Pool over a store (every value
  of at least 1 byte that can travel by reference does), and the names
  ``multiprocessing.Pool`` / ``multiprocessing.pool.Pool`` that some of
  these tests call directly resolve to our Pool too: each test function is
  re-bound to globals where ``multiprocessing`` is a view of the real
  module with only those two names replaced (the real module is not
  patched, so multiprocessing's own threads never see a substitute);
* ``WithMultiprocessing...``: the same tests against multiprocessing's
  Pool, the reference: ours must pass wherever these pass.

Start method: $DEDUPSHM_TEST_START_METHOD (default fork), passed to both
pools as their context.
"""
import multiprocessing
import multiprocessing.pool
import os
import subprocess
import sys
import textwrap
import types
import unittest
import uuid

import pytest

from dedupshm.pool import Pool as DedupshmPool
from helpers import ClassStore

try:
    import test._test_multiprocessing as cpython
except ImportError as e:           # a Python without its test package
    cpython = None
    _missing = f"CPython's test package is not installed ({e})"

START_METHOD = os.environ.get("DEDUPSHM_TEST_START_METHOD", "fork")
CTX = multiprocessing.get_context(START_METHOD)

# tests that do not touch the pool under test, with the reason
NOT_ABOUT_THE_POOL = {
    # runs `from multiprocessing import Pool` in a fresh interpreter;
    # test_our_pool_held_at_interpreter_exit below is ours
    "test_worker_finalization_via_atexit_handler_of_multiprocessing",
    # TestInitializers' other test is about managers
    "test_manager_initializer",
}


class _ModuleView(types.ModuleType):
    """A module that is ``real`` except for the names given."""

    def __init__(self, real, **names):
        super().__init__(real.__name__)
        self.__dict__.update(names)
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)


def _rebind(func, globs):
    f = types.FunctionType(func.__code__, globs, func.__name__, func.__defaults__,
                           func.__closure__)
    f.__kwdefaults__ = func.__kwdefaults__
    f.__dict__.update(func.__dict__)
    f.__qualname__ = func.__qualname__
    f.__module__ = func.__module__
    return f


class _PoolUnderTest:
    """Mixin: ``make_pool`` is the pool under test; the test methods of
    the class see it as ``multiprocessing.Pool`` and
    ``multiprocessing.pool.Pool`` as well."""

    @classmethod
    def make_pool(cls, *args, **kwargs):
        raise NotImplementedError

    @classmethod
    def Pool(cls, *args, **kwargs):
        return cls.make_pool(*args, **kwargs)


class _OursMixin(ClassStore, _PoolUnderTest):
    store_tag = "tcp"

    @classmethod
    def make_pool(cls, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                  context=None):
        return DedupshmPool(processes, initializer=initializer, initargs=initargs,
                            maxtasksperchild=maxtasksperchild,
                            context=context if context is not None else CTX,
                            store=cls.store, min_nbytes=1)


class _ReferenceMixin(_PoolUnderTest):
    @classmethod
    def make_pool(cls, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                  context=None):
        return multiprocessing.pool.Pool(processes, initializer, initargs, maxtasksperchild,
                                         context if context is not None else CTX)


def _adapt(base, mixin, name, extra_bases=()):
    """``base``'s tests with ``mixin``'s pool, as a new TestCase class."""
    cls = type(name, (mixin, base) + extra_bases, {"__module__": __name__})

    def pool_factory(*args, **kwargs):
        return cls.make_pool(*args, **kwargs)

    view = _ModuleView(multiprocessing, Pool=pool_factory,
                       pool=_ModuleView(multiprocessing.pool, Pool=pool_factory))
    for attr in dir(base):
        if not attr.startswith("test"):
            continue
        func = getattr(base, attr)
        if attr in NOT_ABOUT_THE_POOL:
            setattr(cls, attr, unittest.skip("not about the pool under test")(func))
            continue
        if isinstance(func, types.FunctionType):
            globs = dict(func.__globals__)
            globs["multiprocessing"] = view
            setattr(cls, attr, _rebind(func, globs))
    return cls


if cpython is None:
    def test_cpython_pool_suite_available():
        pytest.skip(_missing)
else:
    class _Processes(cpython.ProcessesMixin):
        """CPython's ProcessesMixin (the pool is replaced by the adapter)."""

    _BASE_TEST_CASES = ["_TestPool", "_TestPoolWorkerErrors", "_TestPoolWorkerLifetime"]
    _PLAIN_TEST_CASES = ["TestPoolNotLeakOnFailure", "TestInitializers"]

    for _variant, _mixin in (("Dedupshm", _OursMixin), ("Multiprocessing", _ReferenceMixin)):
        for _n in _BASE_TEST_CASES:
            _name = f"With{_variant}{_n[1:]}"
            globals()[_name] = _adapt(getattr(cpython, _n), _mixin, _name,
                                      (_Processes, unittest.TestCase))
        for _n in _PLAIN_TEST_CASES:
            _name = f"With{_variant}{_n}"
            globals()[_name] = _adapt(getattr(cpython, _n), _mixin, _name)
    del _variant, _mixin, _n, _name


# ---- ours, for what the suite checks only with multiprocessing's Pool

_HELD_AT_EXIT = textwrap.dedent("""
    import sys
    import dedupshm
    from dedupshm.pool import Pool

    class Holder:
        def __init__(self, store):
            self.pool = Pool(1, store=store, min_nbytes=1)

    store = dedupshm.Store(sys.argv[1], create=True, capacity="16MiB")
    problem = Holder(store)
    assert problem.pool.map(float, tuple(range(10))) == [float(i) for i in range(10)]
    store.unlink()
    # no close(), no join(): the interpreter must still exit, cleanly
""")


def test_our_pool_held_at_interpreter_exit():
    """bpo-38744/39360 with our Pool: a pool still referenced at interpreter
    exit must not hang the exit nor print errors."""
    name = f"tcx{os.getpid()}-{uuid.uuid4().hex[:10]}"
    try:
        r = subprocess.run([sys.executable, "-c", _HELD_AT_EXIT, name], capture_output=True,
                           text=True, timeout=60)
    finally:
        leftover = [f for f in os.listdir("/dev/shm") if f.startswith(f"dedupshm.{name}")]
        for f in leftover:
            os.remove(os.path.join("/dev/shm", f))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert not leftover
