"""joblib (and scikit-learn's ``n_jobs``): a process backend whose large
arguments and results travel through a store.

    import dedupshm.joblib, joblib
    dedupshm.joblib.register()
    with joblib.parallel_config(backend="dedupshm", n_jobs=2):
        GridSearchCV(...).fit(X, y)          # X is put once, read zero-copy

The backend is joblib's loky backend (same reusable worker processes, same
batching) with one difference: a numpy array of at least ``min_nbytes``
(1 MiB) in a task's arguments or results is put into a store and travels
as a reference, instead of being dumped to a memmapped file per
``Parallel`` call (joblib's ``max_nbytes`` / ``mmap_mode`` /
``temp_folder`` do not apply: no ``joblib_memmapping_folder`` is written).

* Workers receive such arrays read-only, zero-copy, as with joblib's
  default ``mmap_mode="r"``; the caller receives large results as private
  copy-on-write arrays (writable, zero-copy until written).
* An array passed to many tasks of a call is put once; the same content in
  the next call is a dedup hit (the store keeps the previous call's values
  until the next call ends), not a new file.
* The store belongs to the calling process: created at its first call
  (named ``joblib-<pid>-...``), removed when it exits.  If the caller is
  SIGKILLed, the next process that uses the backend on the machine removes
  the stores of callers that no longer exist.
"""
from __future__ import annotations

import atexit
import io
import os
import threading
import uuid
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import joblib
from joblib._parallel_backends import FallbackToBackend, LokyBackend, SequentialBackend
from joblib import executor as joblib_executor
from joblib.externals.loky import get_reusable_executor

from . import _attach, _hoststore
from .pool import DEFAULT_MIN_NBYTES, _Packer, _Unpickler, check_min_nbytes
from .store import DEFAULT_DIRECTORY, parse_size

if TYPE_CHECKING:
    from .store import ObjectRef, Store

    # loky's (job, result) reducer tables: type -> reducer
    _Reducers = tuple[dict[type, "_ArgReducer"], dict[type, "_ResultReducer"]]

__all__ = ["register", "release", "reclaim", "DedupShmBackend", "BACKEND", "caller_store"]

#: The name the backend is registered under.
BACKEND = "dedupshm"
#: Prefix of the names of the stores this module creates.
PREFIX = "joblib-"


# ---------------------------------------------------------------- the caller's store

def _start_time(pid: int) -> Optional[int]:
    """The start time of process ``pid`` (clock ticks since boot), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(b")", 1)[1].split()[19])


def _orphaned(name: str, directory: Optional[str]) -> bool:
    """Whether store ``name`` belongs to a caller that no longer runs: its
    pid and start time (in the name) name no process here, and the store's
    client table (liveness by lock, valid across PID namespaces) has no live
    client with that pid.  Workers it left behind may still be attached:
    they only finish what they were doing."""
    try:
        _, pid_text, start_text, _ = name.split("-")
        pid, start = int(pid_text), int(start_text)
    except ValueError:
        return False                # not one of ours: leave it alone
    if _start_time(pid) == start:
        return False
    from .store import Store
    try:
        s = Store(name, directory=directory)
    except Exception:  # noqa: BLE001 - half created, another user's, or gone
        return False
    try:
        s.gc()
        return all(c["pid"] != pid for c in s.clients())
    finally:
        s.close()


def reclaim(directory: Optional[str] = None) -> list[str]:
    """Remove the stores of callers that died without removing them.
    Returns the names removed."""
    removed: list[str] = []
    with _hoststore.directory_lock(directory):
        for name in _hoststore.stores_of(PREFIX, directory):
            if _orphaned(name, directory):
                for p in _store_paths(name, directory):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
                removed.append(name)
    return removed


def _store_paths(name: str, directory: Optional[str]) -> tuple[str, str]:
    from .store import store_paths
    return store_paths(name, directory)


class _Caller:
    """This process's store for the backend, and what it keeps for the next call."""

    def __init__(self, capacity: Union[int, str, None], directory: str) -> None:
        pid = os.getpid()
        self.pid = pid
        self.name = f"{PREFIX}{pid}-{_start_time(pid)}-{uuid.uuid4().hex[:8]}"
        reclaim(directory)
        with _hoststore.directory_lock(directory):
            from .store import Store
            self.store = Store(self.name, create=True, capacity=capacity, directory=directory)
        self.lock = threading.Lock()
        self.current: Optional[_CallPacker] = None  # the running call's packer
        # ObjectRefs of the last call's values (dedup hits)
        self.previous: list[ObjectRef] = []

    def exists(self) -> bool:
        return os.path.exists(_store_paths(self.name, self.store.directory)[0])

    def remove(self) -> None:
        """Unlink the store (attached workers keep their views until they let go)."""
        if os.getpid() == self.pid:
            self.store.unlink()
            self.store.close()


_caller: Optional[_Caller] = None
_caller_lock = threading.Lock()


def caller_store(capacity: Union[int, str, None] = None,
                 directory: Optional[str] = None) -> _Caller:
    """This process's store for the backend (created on first use)."""
    global _caller
    with _caller_lock:
        c = _caller
        if c is None or c.pid != os.getpid() or c.store.closed or not c.exists():
            c = _Caller(capacity, directory or DEFAULT_DIRECTORY)
            _caller = c
            atexit.register(c.remove)
        return c


def release() -> None:
    """Remove this process's store now (the next call makes a new one).
    Workers keep what they still map until they let go."""
    global _caller
    with _caller_lock:
        c, _caller = _caller, None
    if c is not None:
        c.previous = []
        c.remove()


def _after_fork_in_child() -> None:
    global _caller, _caller_lock
    _caller_lock = threading.Lock()
    _caller = None                  # a forked child makes a store of its own


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------- reducers

class _CallPacker(_Packer):
    """A pool packer that also keeps every ObjectRef it made (for the next call)."""

    def __init__(self, store: Store, min_nbytes: int) -> None:
        super().__init__(store, min_nbytes)
        self.refs: list[ObjectRef] = []

    def _remember(self, obj: Any, ref: ObjectRef) -> None:
        self.refs.append(ref)
        super()._remember(obj, ref)


def _load(pid: tuple[Any, ...], writable: bool) -> Any:
    """Rebuild a value from its store reference (in a worker or the caller)."""
    return _Unpickler(io.BytesIO(b""), writable).persistent_load(pid)


class _ArgReducer:
    """Caller side: large arrays of a task's arguments go into the caller's store."""

    def __init__(self, caller: _Caller, min_nbytes: int) -> None:
        self.caller = caller
        self.min_nbytes = min_nbytes

    def __call__(self, a: np.ndarray[Any, Any]) -> Union[str, tuple[Any, ...]]:
        c = self.caller
        packer = c.current
        if packer is None:                  # pickled outside a call: a packer of its own
            packer = _CallPacker(c.store, self.min_nbytes)
        pid = packer.persistent_id(a)
        if pid is None:
            return a.__reduce_ex__(4)
        return _load, (pid, False)

    def __reduce__(self) -> tuple[Any, ...]:
        # loky hands the job queue (and its reducers) to the workers, which
        # only read from it: there, the store is reached by name
        c = self.caller
        return _ResultReducer, (c.name, c.store.directory, self.min_nbytes)


class _ResultReducer:
    """Worker side: large arrays of a result go into the caller's store."""

    def __init__(self, name: str, directory: str, min_nbytes: int) -> None:
        self.name, self.directory, self.min_nbytes = name, directory, min_nbytes

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _ResultReducer)
                and (self.name, self.directory, self.min_nbytes)
                == (other.name, other.directory, other.min_nbytes))

    def __hash__(self) -> int:
        return hash((self.name, self.directory, self.min_nbytes))

    def __call__(self, a: np.ndarray[Any, Any]) -> Union[str, tuple[Any, ...]]:
        if a.nbytes >= self.min_nbytes and not a.dtype.hasobject:
            store = _attach.attached_store(self.name, self.directory, keep=True)
            pid = _Packer(store, self.min_nbytes).persistent_id(a)
            if pid is not None:
                return _load, (pid, True)
        return a.__reduce_ex__(4)


# ---------------------------------------------------------------- the backend

class DedupShmBackend(LokyBackend):
    """joblib's loky backend with a store instead of memmapped files (see the
    module docstring).  Parameters (through ``parallel_config(backend=
    "dedupshm", ...)``): ``min_nbytes`` (arrays of at least this many bytes
    go through the store; default 1 MiB), ``capacity`` of the caller's
    store when it is created (default: half the free space of /dev/shm),
    ``directory`` (default /dev/shm)."""

    def __init__(self, nesting_level: Optional[int] = None,
                 inner_max_num_threads: Optional[int] = None, *,
                 min_nbytes: int = DEFAULT_MIN_NBYTES, capacity: Union[int, str, None] = None,
                 directory: Optional[str] = None, **backend_kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        self.min_nbytes = check_min_nbytes(min_nbytes)
        self.capacity = None if capacity is None else parse_size(capacity, "capacity")
        self.directory = directory
        self._caller: Optional[_Caller] = None

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Optional[str] = None,
                  require: Optional[str] = None, idle_worker_timeout: Optional[float] = None,
                  **kwargs: Any) -> int:
        """Start (or reuse) the worker processes; return their number."""
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        if "timeout" in kwargs or "timeout" in self.backend_kwargs:
            raise ValueError("use idle_worker_timeout, not timeout, with the dedupshm backend")
        if idle_worker_timeout is None:
            idle_worker_timeout = self.backend_kwargs.get("idle_worker_timeout", 300)
        c = self._caller = caller_store(self.capacity, self.directory)
        reducers = _reducers(c, self.min_nbytes)
        # joblib's own loky backend reuses loky's executor when its own last
        # arguments match, without comparing reducers: make them differ, so
        # it never inherits our workers and reducers
        joblib_executor._executor_args = {"backend": BACKEND}
        self._workers = get_reusable_executor(
            n_jobs, job_reducers=reducers[0], result_reducers=reducers[1],
            timeout=idle_worker_timeout, env=self._prepare_worker_env(n_jobs=n_jobs))
        if getattr(self._workers, "_temp_folder_manager", None) is None:
            # Parallel tells a loky backend's executor which temporary folder
            # the memmaps of the call go to; ours writes none
            self._workers._temp_folder_manager = _NoTemporaryFolder()
        self.parallel = parallel
        return n_jobs

    def start_call(self) -> None:
        c = self._caller
        if c is not None:
            c.current = _CallPacker(c.store, self.min_nbytes)

    def stop_call(self) -> None:
        c = self._caller
        if c is None or c.current is None:
            return
        packer, c.current = c.current, None
        # what this call put stays until the next call ends: the same
        # content in the next call is a dedup hit
        c.previous = packer.refs
        packer.close()

    def terminate(self) -> None:
        # the workers stay for the next call (as with loky); there is no
        # temporary folder to clean
        self._workers = None
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        self._workers.shutdown(kill_workers=True)
        self._workers = None
        if ensure_ready:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)


class _NoTemporaryFolder:
    """What Parallel expects of a loky executor's temporary folder manager."""

    def set_current_context(self, context_id: str) -> None:
        pass


_reducer_cache: dict[tuple[str, int], _Reducers] = {}


def _reducers(caller: _Caller, min_nbytes: int) -> _Reducers:
    """The (job, result) reducer tables for a caller's store: the same
    objects for the same store, so loky keeps its workers between calls."""
    key = (caller.name, min_nbytes)
    r = _reducer_cache.get(key)
    if r is None:
        r = ({np.ndarray: _ArgReducer(caller, min_nbytes)},
             {np.ndarray: _ResultReducer(caller.name, caller.store.directory, min_nbytes)})
        _reducer_cache.clear()
        _reducer_cache[key] = r
    return r


def register() -> None:
    """Make ``backend="dedupshm"`` available to joblib (``parallel_config``,
    ``parallel_backend``, ``Parallel(backend=...)``)."""
    joblib.register_parallel_backend(BACKEND, DedupShmBackend)
