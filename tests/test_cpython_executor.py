"""CPython's own ProcessPoolExecutor tests (Lib/test/test_concurrent_futures/,
a package from Python 3.12 on) run against dedupshm.pool.ProcessPoolExecutor.

As in test_cpython_pool.py nothing is copied: the suite's test classes are
imported from the running interpreter's ``test`` package (skipped where it
is missing: 3.11 and earlier here) and combined twice with the suite's own
process-pool mixin for $DEDUPSHM_TEST_START_METHOD (default fork):

* ``Dedupshm...``: ``executor_type`` is our executor over a store (every
  buffer of 64 bytes or more travels by reference);
* ``Reference...``: concurrent.futures.ProcessPoolExecutor, as CPython runs
  them: ours must pass wherever these pass.
"""
import functools
import importlib
import inspect
import os
import unittest

import pytest

from dedupshm.pool import ProcessPoolExecutor
from helpers import ClassStore

START_METHOD = os.environ.get("DEDUPSHM_TEST_START_METHOD", "fork")

try:
    util = importlib.import_module("test.test_concurrent_futures.util")
except ImportError as e:
    util = None
    _missing = f"CPython's test.test_concurrent_futures package is not installed ({e})"

# (module, class): the suite's process-pool test classes
SUITE = [("test_process_pool", "ProcessPoolExecutorTest"),
         ("test_shutdown", "ProcessPoolShutdownTest"),
         ("test_wait", "WaitTests"),
         ("test_as_completed", "AsCompletedTests"),
         ("test_deadlock", "ExecutorDeadlockTest"),
         ("test_init", "InitializerMixin"),
         ("test_init", "FailingInitializerMixin")]


def _runs_the_standard_executor(func):
    """Tests that write ``from concurrent.futures import
    <executor_type.__name__>`` into a script for a fresh interpreter: they
    would test the standard executor, not ours."""
    try:
        return "executor_type.__name__" in inspect.getsource(func)
    except (OSError, TypeError):
        return False


# Where ours differs on purpose (see ProcessPoolExecutor's docstring), as
# strict xfails: the day one passes, the difference is gone.
_UNPICKLE = ("a value that cannot be unpickled on the other side fails its own future "
             "with the error; the standard executor breaks the pool (BrokenProcessPool)")
DIFFERS_ON_PURPOSE = {
    "test_error_at_task_unpickle": _UNPICKLE,
    "test_exit_at_task_unpickle": _UNPICKLE,
    "test_error_during_result_unpickle_in_result_handler": _UNPICKLE,
    "test_exit_during_result_unpickle_in_result_handler": _UNPICKLE,
    # its arguments cannot be pickled: submit() fails the future at once,
    # before any worker is started; the test counts the started workers
    "test_processes_terminate": "a submit whose arguments cannot be pickled starts no worker",
}


def _xfail(func, reason):
    @functools.wraps(func)           # a new function: the marks stay off the suite's
    def test(self, *args, **kwargs):
        return func(self, *args, **kwargs)
    return pytest.mark.xfail(strict=True, reason=reason)(test)


class StoreProcessPoolExecutor(ProcessPoolExecutor):
    """Our executor over the store of the test class that runs."""
    test_class = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, store=type(self).test_class.store, min_nbytes=1, **kwargs)


class _WithStore(ClassStore):
    store_tag = "tce"

    @classmethod
    def setUpClass(cls):
        StoreProcessPoolExecutor.test_class = cls
        super().setUpClass()


if util is None:
    def test_cpython_executor_suite_available():
        pytest.skip(_missing)
else:
    _exec_mixin = {"fork": util.ProcessPoolForkMixin,
                   "forkserver": util.ProcessPoolForkserverMixin,
                   "spawn": util.ProcessPoolSpawnMixin}[START_METHOD]

    class _Ours(_WithStore, _exec_mixin):
        executor_type = StoreProcessPoolExecutor

    for _mod, _cls in SUITE:
        _base = getattr(importlib.import_module(f"test.test_concurrent_futures.{_mod}"), _cls)
        for _prefix, _mixin in (("Dedupshm", _Ours), ("Reference", _exec_mixin)):
            _name = f"{_prefix}{_cls}"
            _new = type(_name, (_base, _mixin, util.BaseTestCase), {"__module__": __name__})
            if _prefix == "Dedupshm":
                for _attr in dir(_new):
                    if _attr.startswith("test") and \
                            _runs_the_standard_executor(getattr(_new, _attr)):
                        setattr(_new, _attr, unittest.skip(
                            "runs the standard executor in a fresh interpreter")(
                                getattr(_new, _attr)))
                    elif _attr in DIFFERS_ON_PURPOSE:
                        setattr(_new, _attr, _xfail(getattr(_new, _attr),
                                                    DIFFERS_ON_PURPOSE[_attr]))
                del _attr
            globals()[_name] = _new
    del _mod, _cls, _base, _prefix, _mixin, _name, _new
