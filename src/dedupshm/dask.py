"""Dask distributed: the workers of a host keep their large values in one store.

    from dedupshm.dask import StorePlugin
    client.register_plugin(StorePlugin())

:class:`StorePlugin` is a worker plugin.  On every worker process it opens
its host's store (created by the first worker of the host, attached by the
others, removed by the last one to leave; a host is ``socket.gethostname()``
unless the environment variable ``DEDUPSHM_DASK_HOST`` names another).  Then:

* every numpy array of at least ``min_nbytes`` bytes (not of object dtype)
  that the worker holds -- a task's result, data scattered to it, a value
  fetched from another worker -- is put into the host's store and held as a
  read-only array over the store's shared memory.  Equal values are stored
  once per host (the store dedups pages).  A task's result is put in the
  task's own thread; scattered data on arrival (on the event loop);
* a transfer of such a value to another worker of the same host carries a
  reference (about 150 bytes) instead of the bytes; the receiver maps the
  same pages.  Transfers to other hosts, and to the client, take Dask's
  normal path;
* the worker's memory monitor counts its private memory only (RSS without
  shared-memory pages): the store's pages, which show in the RSS of every
  worker that reads them, make no worker pause or spill, and store-backed
  values are never spilled to disk (spilling them would free nothing).

Tasks receive store-backed arrays read-only (as with joblib's memmapping):
a task that writes into its input must copy it first.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import os
import pickle
import socket
import weakref
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union, cast

import numpy as np
from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin
from distributed.protocol.serialize import dask_deserialize, dask_serialize

from . import _hoststore
from .errors import StoreFullError
from .pool import DEFAULT_MIN_NBYTES, check_min_nbytes
from .store import DEFAULT_DIRECTORY, parse_size

if TYPE_CHECKING:
    from typing import ParamSpec, TypeGuard, TypeVar

    from dask.typing import Key

    from ._typing import Buffer
    from .store import ObjectRef

    _P = ParamSpec("_P")
    _T = TypeVar("_T")
    # distributed's serializer functions: (value, context=) -> (header, frames)
    # and (header, frames) -> value
    _Dumps = Callable[..., tuple[dict[str, Any], list[Buffer]]]
    _Loads = Callable[[dict[str, Any], list[Buffer]], Any]

__all__ = ["StorePlugin", "HOST_ENV", "is_shared"]

logger = logging.getLogger(__name__)

#: Environment variable naming this process's host (default: the host name).
HOST_ENV = "DEDUPSHM_DASK_HOST"
#: Prefix of the names of the stores this module creates.
PREFIX = "dask-"
#: Key of our entry in a connection's handshake: the store the peer uses.
_HANDSHAKE_KEY = "dedupshm-store"

# id(array) -> (weakref to the array, its ObjectRef): the store-backed
# arrays of this process.  Plain dict operations (atomic under the GIL).
_backed: dict[int, tuple[weakref.ref[np.ndarray[Any, Any]], ObjectRef]] = {}
# what this process's serializer did (for tests and diagnostics)
counts = {"sent_refs": 0, "sent_shared_as_bytes": 0, "received_refs": 0}
# the host's store of this process, shared by its workers (LocalCluster
# with processes=False runs several in one process)
_host: Optional[_Host] = None


def host_identity() -> str:
    """This process's host, as the plugin sees it."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def store_name(host: str, scheduler: str) -> str:
    """The name of the store of ``host``'s workers of ``scheduler``."""
    h = hashlib.sha256(f"{host}\0{scheduler}".encode()).hexdigest()[:20]
    return f"{PREFIX}{h}"


def is_shared(x: object) -> TypeGuard[np.ndarray[Any, Any]]:
    """Whether ``x`` is an array held in this process's host store."""
    e = _backed.get(id(x))
    return e is not None and e[0]() is x


def _remember(view: np.ndarray[Any, Any], ref: ObjectRef) -> None:
    i = id(view)
    forget = cast("Callable[[weakref.ref[np.ndarray[Any, Any]]], object]",
                  lambda _, i=i: _backed.pop(i, None))
    _backed[i] = (weakref.ref(view, forget), ref)


class _Host:
    """This process's attachment to its host's store."""

    def __init__(self, name: str, directory: str, capacity: Optional[int],
                 min_nbytes: int) -> None:
        self.store = _hoststore.open_shared(name, PREFIX, directory, capacity=capacity)
        self.min_nbytes = min_nbytes
        self.token = [name, self.store.directory, self.store._c().uuid.hex()]
        self.workers = 0

    def share(self, value: object) -> Optional[np.ndarray[Any, Any]]:
        """A store-backed equal of ``value``, or None if it stays private."""
        if type(value) is not np.ndarray or value.dtype.hasobject:
            return None
        if value.nbytes < self.min_nbytes or is_shared(value):
            return None
        try:
            ref = self.store.put(value)
        except StoreFullError:
            logger.warning("dedupshm: host store %s is full; a value of %d bytes stays "
                           "in worker memory", self.store.name, value.nbytes)
            return None
        view: np.ndarray[Any, Any] = self.store.get(ref)
        _remember(view, ref)
        return view


class _SharedData(MutableMapping["Key", object]):
    """A worker's ``data``: large arrays go to the host's store (and are
    never spilled); everything else goes to the worker's own mapping (its
    SpillBuffer), whose attributes (``fast``, ``evict``...) show through."""

    def __init__(self, inner: MutableMapping[Key, object], host: _Host) -> None:
        self.inner = inner
        self.shared: dict[Key, np.ndarray[Any, Any]] = {}
        self.host = host

    def __setitem__(self, key: Key, value: object) -> None:
        if not is_shared(value):
            v = self.host.share(value)
            if v is not None:
                value = v
        if is_shared(value):
            if key in self.inner:
                del self.inner[key]
            self.shared[key] = value
        else:
            self.shared.pop(key, None)
            self.inner[key] = value

    def __getitem__(self, key: Key) -> object:
        try:
            return self.shared[key]
        except KeyError:
            return self.inner[key]

    def __delitem__(self, key: Key) -> None:
        try:
            del self.shared[key]
        except KeyError:
            del self.inner[key]

    def __contains__(self, key: object) -> bool:
        return key in self.shared or key in self.inner

    def __iter__(self) -> Iterator[Key]:
        yield from self.shared
        yield from self.inner

    def __len__(self) -> int:
        return len(self.shared) + len(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "shared", "host"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class _SharingExecutor(cf.Executor):
    """The worker's task executor, with one more step in the task's thread:
    a large result is put into the host's store there (not later, on the
    worker's event loop, which must not block for the copy)."""

    def __init__(self, inner: cf.Executor, host: _Host) -> None:
        self.inner = inner
        self.host = host

    def _run(self, fn: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _T:
        msg = fn(*args, **kwargs)
        if isinstance(msg, dict) and msg.get("op") == "task-finished":
            v = self.host.share(msg.get("result"))
            if v is not None:
                msg["result"] = v
        return msg

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> cf.Future[_T]:
        return self.inner.submit(self._run, fn, args, kwargs)

    def shutdown(self, wait: bool = True, **kw: Any) -> None:
        return self.inner.shutdown(wait, **kw)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "host"):
            raise AttributeError(name)
        return getattr(self.inner, name)


# ---------------------------------------------------------------- serialization

_numpy_dumps: Optional[_Dumps] = None
_numpy_loads: Optional[_Loads] = None


def _install_serializers() -> None:
    """Route numpy arrays through _dumps/_loads (once per process)."""
    global _numpy_dumps, _numpy_loads
    if _numpy_dumps is not None:
        return
    # dask's Dispatch objects are not annotated
    serialize, deserialize = cast(Any, dask_serialize), cast(Any, dask_deserialize)
    _numpy_dumps = serialize.dispatch(np.ndarray)       # loads distributed's own
    _numpy_loads = deserialize.dispatch(np.ndarray)
    serialize.register(np.ndarray)(_dumps)
    deserialize.register(np.ndarray)(_loads)


def _dumps(x: object, context: Optional[dict[str, Any]] = None
           ) -> tuple[dict[str, Any], list[Buffer]]:
    host = _host
    if host is not None and context and is_shared(x):
        peer = (context.get("recipient") or {}).get(_HANDSHAKE_KEY)
        if peer is not None and list(peer) == host.token:
            ref = _backed[id(x)][1]
            counts["sent_refs"] += 1
            return {"dedupshm": host.token}, [pickle.dumps(ref, protocol=5)]
    header, frames = cast("_Dumps", _numpy_dumps)(x, context=context)
    if is_shared(x) and "writeable" in header:
        # read-only only because it lives in the store: the receiver's copy
        # is its own, writable as without the plugin
        header["writeable"] = [True] * len(header["writeable"])
        counts["sent_shared_as_bytes"] += 1
    return header, frames


def _loads(header: dict[str, Any], frames: list[Buffer]) -> Any:
    token = header.get("dedupshm")
    if token is None:
        return cast("_Loads", _numpy_loads)(header, frames)
    host = _host
    if host is None or list(token) != host.token:
        raise ValueError(f"a reference into the store {token[0]!r} reached a worker "
                         f"that is not attached to it")
    ref = pickle.loads(frames[0])
    view: np.ndarray[Any, Any] = host.store.get(ref)
    _remember(view, ref)
    counts["received_refs"] += 1
    return view


# ---------------------------------------------------------------- memory

def private_memory(pid: Union[int, str] = "self") -> int:
    """A process's resident memory without shared-memory pages (the
    store's, counted once per host rather than once per reader)."""
    rss = shmem = 0
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"RssShmem:"):
                shmem = int(line.split()[1]) * 1024
    return rss - shmem


class _NannyMemory(NannyPlugin):
    """Installed on a worker's nanny by the worker: the nanny restarts its
    worker past 95% of the memory limit by RSS; it must not count the
    shared pages either."""

    name = "dedupshm-memory"

    def setup(self, nanny: Any) -> None:
        pc = nanny.periodic_callbacks.get("memory_monitor")
        if pc is None or getattr(pc.callback, "_dedupshm", False):
            return
        original = pc.callback

        def monitor() -> None:
            proc = nanny.process.process if nanny.process is not None else None
            limit = nanny.memory_manager.memory_limit
            if proc is not None and proc.pid is not None and limit:
                try:
                    mine = private_memory(proc.pid)
                except (OSError, ValueError):
                    mine = None
                if mine is not None and mine / limit <= nanny.memory_manager.memory_terminate_fraction:
                    return
            original()
        tagged = cast(Any, monitor)         # a function with two attributes
        tagged._dedupshm = True
        tagged._original = original
        pc.callback = monitor

    def teardown(self, nanny: Any) -> None:
        pc = nanny.periodic_callbacks.get("memory_monitor")
        if pc is not None and getattr(pc.callback, "_dedupshm", False):
            pc.callback = pc.callback._original


# ---------------------------------------------------------------- the plugin

class StorePlugin(WorkerPlugin):
    """Gives every worker process the store of its host (see the module
    docstring).  ``capacity``: of a host's store when it is created (int or
    "8GiB"; default half the free space of /dev/shm).  ``min_nbytes``: arrays
    of at least this many bytes go to the store.  ``directory``: where
    stores live (default /dev/shm)."""

    name = "dedupshm"
    idempotent = True
    # set by setup (absent before; teardown without setup is a no-op)
    _host: Optional[_Host]
    _get_process_memory: Callable[[], int]

    def __init__(self, capacity: Union[int, str, None] = None,
                 min_nbytes: int = DEFAULT_MIN_NBYTES, directory: Optional[str] = None) -> None:
        self.capacity = None if capacity is None else parse_size(capacity, "capacity")
        self.min_nbytes = check_min_nbytes(min_nbytes)
        self.directory = directory or DEFAULT_DIRECTORY

    async def setup(self, worker: Any) -> None:
        self._setup(worker)
        if worker.nanny:
            # the nanny's own memory monitor (restart at 95%) reads the RSS too
            try:
                async with worker.rpc(worker.nanny) as nanny:
                    await nanny.plugin_add(plugin=pickle.dumps(_NannyMemory()),
                                           name=_NannyMemory.name)
            except (OSError, ValueError) as e:     # the nanny is closing, say
                logger.warning("dedupshm: could not reach the nanny at %s (%s): its memory "
                               "monitor counts shared pages", worker.nanny, e)

    def _setup(self, worker: Any) -> None:
        global _host
        if _host is None:
            name = store_name(host_identity(), worker.scheduler.address)
            _host = _Host(name, self.directory, self.capacity, self.min_nbytes)
        _install_serializers()
        _host.workers += 1
        self._host = _host
        # our peers learn which store we use from the connection handshake
        for args in (worker.connection_args, worker.rpc.connection_args):
            over = dict(args.get("handshake_overrides") or {})
            over[_HANDSHAKE_KEY] = _host.token
            args["handshake_overrides"] = over
        data = worker.memory_manager.data
        if not isinstance(data, _SharedData):
            data = _SharedData(data, _host)
            worker.memory_manager.data = data
            worker.state.data = data
        ex = worker.executors.get("default")
        if ex is not None and not isinstance(ex, _SharingExecutor):
            worker.executors["default"] = _SharingExecutor(ex, _host)
        self._get_process_memory = worker.monitor.get_process_memory
        worker.monitor.get_process_memory = private_memory

    def teardown(self, worker: Any) -> None:
        global _host
        host: Optional[_Host] = getattr(self, "_host", None)
        if host is None:
            return
        self._host = None
        data = worker.memory_manager.data
        if isinstance(data, _SharedData):
            data.shared.clear()
        worker.monitor.get_process_memory = self._get_process_memory
        ex = worker.executors.get("default")
        if isinstance(ex, _SharingExecutor):
            worker.executors["default"] = ex.inner
        host.workers -= 1
        if host.workers == 0:
            if _host is host:
                _host = None
            _hoststore.leave(host.store)
