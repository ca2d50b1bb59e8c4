"""The decay driver: one daemon thread per process that hands freed pages
back to the kernel once they have stayed unused for the decay time.

Freeing a page never punches it (while the store's ``warm_bytes`` cap has
room): it stays faulted in ("warm") so the next put reuses it at the cost
of a memcpy.  This thread calls ``ds_decay`` (csrc/pool.c) for every store
the process has open, which punches warm pages idle for longer than the
decay time, one hole per run of pages, in short slices under the store
lock.  Any process's thread decays the whole store, so an idle store
gives its memory back within about the decay time.

The thread holds weak references to the cores: it never keeps a store
attached, and it exits when none is left.  It is absent in a forked child
(threads do not survive fork); ``kick()`` (called by ``Store.delete``)
starts it again there.  At interpreter exit it is stopped before the
cores are closed.
"""
from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ._native import Core


#: Seconds a freed page stays warm before it is returned, by default.
DEFAULT_DECAY_S = 10.0
#: Environment override of the default, in milliseconds.
ENV_DECAY_MS = "DEDUPSHM_DECAY_MS"
_MAX_MS = (1 << 31) - 1


def default_decay_ms() -> int:
    v = os.environ.get(ENV_DECAY_MS)
    if v:
        try:
            return max(0, min(int(float(v)), _MAX_MS))
        except ValueError:
            pass
    return int(DEFAULT_DECAY_S * 1000)


def decay_ms_of(decay_s: Optional[float]) -> int:
    """The decay time in ms for Store(decay_s=...); None: the default."""
    if decay_s is None:
        return default_decay_ms()
    if isinstance(decay_s, bool) or not isinstance(decay_s, (int, float)):
        raise TypeError("decay_s must be a number of seconds")
    if not decay_s >= 0:
        raise ValueError("decay_s must be >= 0")
    return int(min(decay_s * 1000, _MAX_MS))


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.cores: dict[int, list[Any]] = {}          # id(core) -> [weakref, decay_ms] (the cursor lives in the core)
        self.thread: Optional[threading.Thread] = None
        self.stop = False
        self.atexit = False


_st = _State()


def _after_fork_child() -> None:
    # the thread does not exist here; locks may have been held by it
    old = _st.cores
    _st.__init__()  # type: ignore[misc]
    _st.cores = old


os.register_at_fork(after_in_child=_after_fork_child)


def register(core: Core, decay_ms: int) -> None:
    """Decay this core's store (at decay_ms) from this process's thread."""
    with _st.lock:
        ent = _st.cores.get(id(core))
        if ent is not None and ent[0]() is core:
            ent[1] = decay_ms
        else:
            # no callback: a weakref callback runs inside any allocation,
            # maybe while this thread holds _st.lock; the thread prunes
            _st.cores[id(core)] = [weakref.ref(core), decay_ms]
        _start_locked()
    _st.wake.set()


def kick() -> None:
    """Make sure the thread runs (after a fork it is gone)."""
    if _st.thread is None and _st.cores and not _st.stop:
        with _st.lock:
            _start_locked()


def _start_locked() -> None:
    if _st.thread is not None or _st.stop or not _st.cores:
        return
    if not _st.atexit:
        # registered after the first Core's weakref.finalize, so it runs
        # before the cores are closed at exit (atexit is last in, first out)
        atexit.register(_shutdown)
        _st.atexit = True
    t = threading.Thread(target=_run, args=(_st,), name="dedupshm-decay", daemon=True)
    _st.thread = t
    t.start()


def _shutdown() -> None:
    st = _st
    st.stop = True
    st.wake.set()
    t = st.thread
    if t is not None and t is not threading.current_thread():
        t.join(5.0)


def _run(st: _State) -> None:
    while True:
        with st.lock:
            for key in [k for k, e in st.cores.items() if e[0]() is None]:
                del st.cores[key]            # collected: its store is closed
            if st.stop or not st.cores or st is not _st:
                if st.thread is threading.current_thread():
                    st.thread = None
                return
            entries = list(st.cores.items())
        interval = 1.0
        for key, (wr, decay_ms) in entries:
            if st.stop:
                break
            core = wr()
            if core is None:
                continue
            ok = core.decay(decay_ms)
            del core
            if not ok:                       # closed (or an orphan after fork)
                with st.lock:
                    if st.cores.get(key, [None])[0] is wr:
                        del st.cores[key]
                continue
            # look again a quarter decay time later (at most once a second,
            # at least every 50 ms)
            interval = min(interval, max(0.05, decay_ms / 4000.0))
        st.wake.wait(interval)
        st.wake.clear()
