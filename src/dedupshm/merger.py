"""The background merger: ksmd-style dedup of this process's mergeable memory.

Each process that uses :meth:`Store.mergeable` memory runs its own merger
thread (only a process can remap its own pages); the mergers of different
processes meet in the store's shared content table.  The scan itself runs
in C without the GIL.  See csrc/merger.c for the algorithm.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Optional

from ._native import merger_wp_mode as wp_mode  # noqa: F401 - public
from .errors import StoreClosedError

if TYPE_CHECKING:
    from ._native import Core
    from .store import Store

#: ksmd-like defaults; the advisor (target_scan_s, max_cpu) is on by default.
DEFAULT_SLEEP_MS = 20
DEFAULT_TARGET_SCAN_S = 0.2
DEFAULT_MAX_CPU = 0.25
#: Longest sleep between scans while nothing changes.
IDLE_MAX_S = 0.5
#: Share of vm.max_map_count the merger may use for the mappings it creates.
DEFAULT_VMA_SHARE = 0.25
#: Scans that fail in a row before the merger thread gives up.
MAX_CONSECUTIVE_ERRORS = 3
#: Pause after a failed scan before the next try (seconds).
ERROR_PAUSE_S = 0.1

_mergers: weakref.WeakSet[Merger] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # only the forking thread survives a fork: no merger runs in the child,
    # and a lock another thread held must not stay held
    for m in list(_mergers):
        m._lock = threading.Lock()
        m._thread = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


class Merger:
    """Control of this process's merger for one store.

    ``start(pages_to_scan=..., sleep_ms=...)`` paces it like ksmd (pages per
    wake-up, sleep between).  With ``target_scan_s`` (the default mode) an
    advisor picks pages_to_scan so that a full pass over this process's
    mergeable memory takes about that long, without using more than
    ``max_cpu`` of one core.  ``scan()`` runs one full pass now and returns
    the number of pages it merged.

    A scan that fails is counted in ``errors`` (its exception is
    ``last_error``) and retried; after ``MAX_CONSECUTIVE_ERRORS`` failures in
    a row the thread ends with a RuntimeWarning, and the next ``stop()``
    raises the error that ended it.  ``start`` and ``stop`` may be called
    from any thread.  A forked child has no merger running: it calls
    ``start()`` itself."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()     # guards _thread, _stop, _fatal
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._fatal: Optional[BaseException] = None   # the error that ended the thread
        self.errors = 0
        self.last_error: Optional[BaseException] = None
        self.last: dict[str, Any] = {}
        self._vma_budget = 0
        self.vma_budget = max(64, int(_max_map_count() * DEFAULT_VMA_SHARE))
        _mergers.add(self)

    @property
    def vma_budget(self) -> int:
        """Most memory mappings (VMAs) the merger may add to this process;
        past it, only runs of 16+ contiguous pages are merged."""
        return self._vma_budget

    @vma_budget.setter
    def vma_budget(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError("vma_budget must be an int >= 0")
        self._store._c().merger_config(n)
        self._vma_budget = n

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def scan(self) -> int:
        """One full synchronous pass; returns the pages merged by it."""
        info = self._store._c().merge_scan(0)
        self.last = info
        return int(info["merged"])

    def start(self, pages_to_scan: Optional[int] = None, sleep_ms: Optional[float] = None,
              target_scan_s: Optional[float] = None, max_cpu: Optional[float] = None) -> None:
        """Start the background thread (idempotent: restarts with new pacing)."""
        if pages_to_scan is not None and (isinstance(pages_to_scan, bool)
                                          or not isinstance(pages_to_scan, int)
                                          or pages_to_scan <= 0):
            raise ValueError("pages_to_scan must be a positive int")
        sleep_ms = DEFAULT_SLEEP_MS if sleep_ms is None else sleep_ms
        if sleep_ms < 0:
            raise ValueError("sleep_ms must be >= 0")
        if pages_to_scan is None and target_scan_s is None:
            target_scan_s = DEFAULT_TARGET_SCAN_S
        if target_scan_s is not None and target_scan_s <= 0:
            raise ValueError("target_scan_s must be > 0")
        max_cpu = DEFAULT_MAX_CPU if max_cpu is None else max_cpu
        if not 0 < max_cpu <= 1:
            raise ValueError("max_cpu must be in (0, 1]")
        core = self._store._c()             # StoreClosedError here, not in the thread
        with self._lock:
            self._stop_locked()
            self._fatal = None              # a restart forgets how the last run ended
            stop = self._stop = threading.Event()
            args = (core, pages_to_scan, sleep_ms / 1000.0, target_scan_s, max_cpu, stop)
            t = threading.Thread(target=self._run, args=args, name="dedupshm-merger",
                                 daemon=True)
            t.start()
            self._thread = t

    def stop(self) -> None:
        """Stop the background thread and wait for it.  If the thread had
        ended on an error, raise that error (once)."""
        with self._lock:
            self._stop_locked()
            err, self._fatal = self._fatal, None
        if err is not None:
            raise err

    def _stop_locked(self) -> None:
        t = self._thread
        if t is None:
            return
        self._stop.set()
        if t is not threading.current_thread():
            t.join()
        self._thread = None

    def _failed(self, e: BaseException, consecutive: int) -> bool:
        """Count a failed scan; True if the thread should end."""
        self.errors += 1
        self.last_error = e
        if consecutive < MAX_CONSECUTIVE_ERRORS:
            return False
        self._fatal = e
        warnings.warn(f"dedupshm merger of store {self._store.name!r} stopped after "
                      f"{consecutive} failed scans in a row: {e!r} "
                      f"(merger.stop() raises it)", RuntimeWarning, stacklevel=2)
        return True

    def _run(self, core: Core, pages_to_scan: Optional[int], sleep_s: float,
             target_scan_s: Optional[float], max_cpu: float, stop: threading.Event) -> None:
        cpu_per_page = 1e-6            # seconds; learned as we go
        total = 0
        idle = 0
        failures = 0
        n = pages_to_scan or 256
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                info = core.merge_scan(n)
            except StoreClosedError:
                return                     # closed under us: nothing left to merge
            except Exception as e:  # noqa: BLE001 - counted, surfaced, re-raised by stop()
                failures += 1
                if self._failed(e, failures):
                    return
                stop.wait(ERROR_PAUSE_S)
                continue
            failures = 0
            self.last = info
            total = info["total_pages"]
            if info["visited"]:
                cpu_per_page = 0.8 * cpu_per_page + 0.2 * (info["cpu_ns"] / 1e9 / info["visited"])
            busy = time.perf_counter() - t0
            if target_scan_s is not None:
                # pages per second to finish a pass in target_scan_s ...
                rate = total / target_scan_s if total else 0
                # ... but no more than max_cpu of a core
                rate = min(rate, max_cpu / max(cpu_per_page, 1e-9))
                n = max(64, int(rate * max(sleep_s, 0.001)))
                # sleep so that busy / (busy + sleep) <= max_cpu
                pause = max(sleep_s, busy * (1 - max_cpu) / max_cpu)
            else:
                pause = sleep_s
            # nothing happening (all merged or waiting): wake less often, up
            # to IDLE_MAX_S; any change brings the normal pace back
            active = (info["merged"] or info["unmerged"] or info["promoted"] or info["zeroed"]
                      or info["scanned"] * 4 > info["visited"] - info["skipped"])   # still settling
            idle = 0 if active else min(idle + 1, 6)
            if idle:
                pause = max(pause, min(IDLE_MAX_S, sleep_s * (1 << idle)))
            if not total:
                pause = max(pause, 0.1)
            stop.wait(pause)
