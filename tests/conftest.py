"""Fixtures for the dedupshm test suite.

- ``make_store``: factory of stores with unique names; every store a test
  creates is gc()ed and check()ed, closed and unlinked at teardown, and
  teardown fails if check() reported errors or ``unlink()`` left any file
  behind.  Tests that damage a store on purpose say so with
  ``@pytest.mark.corrupts_store`` (test_check.py and test_corrupt.py are
  exempt as a whole).
- ``store``: one fresh store from that factory.
- ``procs``: registry of child processes; any still alive at teardown is
  SIGKILLed (so a failing test never leaves children behind).
- memory is measured on the store's own files (helpers.store_bytes), never
  on the machine-wide /proc/meminfo Shmem, which anything else running moves.
- a per-test hang guard (SIGALRM for the test body, faulthandler as a last
  resort), because a lock bug must fail a test, not hang the suite.
- a session-end check that no ``dedupshm.t*`` file leaked into /dev/shm.
"""
import faulthandler
import gc
import os
import signal
import subprocess
import sys
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import helpers  # noqa: E402
from helpers import MiB, SHM_DIR, shm_files  # noqa: E402,F401

DEFAULT_LIMIT = 90  # seconds per test body


def pytest_configure(config):
    config.addinivalue_line("markers", "limit(seconds): hang guard for this test's body")
    config.addinivalue_line("markers", "memory: measures kernel memory (run serially)")
    config.addinivalue_line("markers", "corrupts_store: damages its stores on purpose; "
                                       "make_store's teardown does not check() them")


# ---------------------------------------------------------------- hang guard

class TestHang(Exception):
    pass


def _alarm(signum, frame):
    raise TestHang("test exceeded its time limit (hang guard)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    m = item.get_closest_marker("limit")
    limit = m.args[0] if m else DEFAULT_LIMIT
    # last resort if the process is stuck in C: dump stacks and exit
    faulthandler.dump_traceback_later(limit + 60, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    m = item.get_closest_marker("limit")
    limit = m.args[0] if m else DEFAULT_LIMIT
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(limit))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- leak check

def _our_files():
    # only this run's stores (names are t<pid of this pytest process>-...):
    # other test runs may be going on at the same time
    return set(shm_files(f"dedupshm.t{os.getpid()}-"))


@pytest.fixture(scope="session", autouse=True)
def no_leaked_store_files():
    before = _our_files()
    yield
    gc.collect()
    leaked = sorted(_our_files() - before)
    for f in leaked:
        try:
            os.remove(os.path.join(SHM_DIR, f))
        except OSError:
            pass
    assert not leaked, f"store files leaked in {SHM_DIR}: {leaked}"


# ---------------------------------------------------------------- stores

def new_name(tag="t"):
    return f"{tag}{os.getpid()}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store_name():
    return new_name()


#: modules whose tests damage stores on purpose (teardown does not check them)
CORRUPTING_MODULES = {"test_check", "test_corrupt"}


def _wants_check(request):
    if request.node.get_closest_marker("corrupts_store"):
        return False
    mod = getattr(request, "module", None)
    return getattr(mod, "__name__", "").rsplit(".", 1)[-1] not in CORRUPTING_MODULES


@pytest.fixture
def make_store(request):
    import dedupshm

    opened = []
    names = []

    def factory(name=None, *, capacity=None, directory=None, warm_bytes=None, create=True,
                **kw):
        if name is None:
            name = new_name()
        if capacity is not None:
            kw["capacity"] = capacity
        if directory is not None:
            kw["directory"] = directory
        if warm_bytes is not None:
            kw["warm_bytes"] = warm_bytes
        s = dedupshm.Store(name, create=create, **kw)
        opened.append(s)
        if (name, directory) not in names:
            names.append((name, directory))
        return s

    factory.opened = opened
    factory.names = names
    yield factory

    gc.collect()
    problems = []
    for s in opened:
        try:
            s.close()
        except Exception as e:  # pragma: no cover - reported below
            problems.append(f"close() raised {e!r}")
    for name, directory in names:
        try:
            s = helpers.open_store(name, directory)
        except FileNotFoundError:
            s = None
        except Exception as e:
            problems.append(f"attach for cleanup of {name} raised {e!r}")
            s = None
        if s is not None and _wants_check(request):
            try:
                s.gc()                      # what dead children left is not an error
                rep = s.check()
                if rep.errors:
                    problems.append(f"check() of {name} after the test: {list(rep.errors)[:5]}")
            except Exception as e:
                problems.append(f"check() of {name} raised {e!r}")
        if s is not None:
            try:
                s.unlink()
            except Exception as e:
                problems.append(f"unlink() of {name} raised {e!r}")
            finally:
                s.close()
        d = directory or SHM_DIR
        try:
            listing = os.listdir(d)
        except FileNotFoundError:
            listing = []
        left = [f for f in listing if f.startswith(f"dedupshm.{name}.")
                or f == f"dedupshm.{name}"]
        for f in left:
            try:
                os.remove(os.path.join(d, f))
            except OSError:
                pass
        if left:
            problems.append(f"files left after unlink() of {name}: {left}")
    if problems:
        pytest.fail("store cleanup: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def store(make_store):
    return make_store()


# ---------------------------------------------------------------- processes

class Procs:
    """Tracks child processes (multiprocessing or subprocess) of a test."""

    def __init__(self):
        self.items = []

    def add(self, p):
        self.items.append(p)
        return p

    def start(self, ctx, target, *args, **kw):
        p = ctx.Process(target=target, args=args, kwargs=kw, daemon=True)
        p.start()
        return self.add(p)

    def kill_all(self):
        for p in self.items:
            try:
                if isinstance(p, subprocess.Popen):
                    if p.poll() is None:
                        p.kill()
                    p.wait(timeout=10)
                else:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGKILL)
                    p.join(timeout=10)
            except (ProcessLookupError, ValueError, AssertionError):
                pass


@pytest.fixture
def procs():
    reg = Procs()
    yield reg
    reg.kill_all()


@pytest.fixture
def tstore():
    """A 1 GiB store for the integration tests; its name is also in
    $TI_STORE for forked workers.  Unlinked, and checked to leave no file."""
    import dedupshm
    name = f"ti{os.getpid()}-{uuid.uuid4().hex[:10]}"
    s = dedupshm.Store(name, create=True, capacity="1GiB")
    os.environ["TI_STORE"] = name
    try:
        yield s
    finally:
        gc.collect()
        s.unlink()
        s.close()
        left = [f for f in os.listdir(SHM_DIR) if f.startswith(f"dedupshm.{name}.")]
        assert not left, left
