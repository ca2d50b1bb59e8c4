"""Process pools and queues whose large values travel through a Store.

:class:`Pool` is a drop-in :class:`multiprocessing.pool.Pool` (a
subclass), :class:`ProcessPoolExecutor` a drop-in
:class:`concurrent.futures.ProcessPoolExecutor` (a subclass) and
:class:`Queue` a drop-in :class:`multiprocessing.Queue`, except that every
numpy array, bytes-like object (and CPU torch tensor, when torch is
imported) of at least ``min_nbytes`` (and at least 64 bytes) -- the
argument itself or anywhere inside it: in tuples, lists, dicts, or
attributes of any picklable object -- is put into the store by the sender
and read zero-copy by the receiver.  Only a reference
(about a hundred bytes) goes through the pipe.  Both ways: arguments to
the workers, results back.

    store = dedupshm.Store("job", create=True)
    with dedupshm.pool.Pool(4, store=store) as pool:
        results = pool.map(f, [(big, i) for i in range(100)])   # big stored once

What the receiver gets:

* numpy arrays: read-only arrays over the store's shared memory
  (``writable=True``: private copy-on-write arrays, still zero-copy until
  written);
* ``bytes``/``bytearray``/``memoryview``: a read-only ``memoryview``
  (``bytes(mv)`` makes a copy);
* torch tensors: tensors over a private copy-on-write mapping of the shared
  pages (torch has no read-only tensors).

Identical values are stored once: the same object passed to many tasks of
one call is put once, and equal content put by different tasks or workers
shares pages (the store dedups).  What a pool or queue puts is freed when
no longer referenced: the sender's reference is dropped as soon as the
message is built; the message carries its own reference (see
:class:`dedupshm.ObjectRef`), which the receiver takes over; the receiver's
value keeps the memory alive until it is released.  A message that is
never received (a worker killed, a queue never drained) keeps its values
until the store's ``transit_ttl`` (default 1 h) runs out and ``gc()``
runs.  Tasks that wait in a pool's queue longer than ``transit_ttl`` fail
with KeyError: give the store a longer ``transit_ttl`` for such pools.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import io
import multiprocessing
import multiprocessing.pool
import pickle
import sys
import threading
import weakref
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.reduction import ForkingPickler
from types import ModuleType
from typing import (IO, TYPE_CHECKING, Any, Callable, Generator, Iterable, Iterator, Mapping,
                    NoReturn, Optional, Union, cast)

import numpy as np

from . import _attach

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

    from .store import ObjectRef, Store

__all__ = ["Pool", "ProcessPoolExecutor", "Queue", "pack", "DEFAULT_MIN_NBYTES"]

#: Values of at least this many bytes travel through the store by default.
DEFAULT_MIN_NBYTES = 1 << 20

# Values under this many bytes always travel inline, whatever min_nbytes
# says: a reference is bigger than they are, and the ObjectRef inside a
# reference pickles a 16-byte store id, which must not itself be diverted
# into the store (that would recurse without end).
_INLINE_BELOW = 64

# ---------------------------------------------------------------- stores
# Store objects by name (what a message carries) come from the one attach
# cache, dedupshm._attach: fork-safe, shared with sequence and torch.
_attached = _attach.attached_store
_store_id = _attach.store_id


# ---------------------------------------------------------------- packing

def _torch() -> Optional[ModuleType]:
    return sys.modules.get("torch")


def _classify(obj: Any) -> tuple[Optional[str], int]:
    """("nd" | "b" | "t", nbytes) for a value that may travel by reference,
    else (None, 0)."""
    t = type(obj)
    if t is np.ndarray:
        if obj.dtype.hasobject:
            return None, 0
        return "nd", obj.nbytes
    if t is bytes or t is bytearray:
        return "b", len(obj)
    if t is memoryview:
        return "b", obj.nbytes
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        return "t", obj.numel() * obj.element_size()
    return None, 0


class _Packer:
    """Packs values for one call: large buffers are put into the store
    (each object once per packer, remembered by identity while it lives)."""

    _LRU_STRONG = 4     # bytes-likes cannot be weakly referenced

    def __init__(self, store: Store, min_nbytes: int) -> None:
        self.store = store
        self.min_nbytes = min_nbytes
        self.sid = _store_id(store)
        self._weak: dict[int, tuple[weakref.ref[Any], ObjectRef]] = {}                               # id -> (weakref, ObjectRef)
        self._strong: collections.OrderedDict[int, tuple[Any, ObjectRef]] = collections.OrderedDict()      # id -> (obj, ObjectRef)

    def _remember(self, obj: Any, ref: ObjectRef) -> None:
        try:
            wr = weakref.ref(obj, lambda _, i=id(obj), d=self._weak: d.pop(i, None))  # type: ignore[misc]
        except TypeError:
            self._strong[id(obj)] = (obj, ref)
            while len(self._strong) > self._LRU_STRONG:
                self._strong.popitem(last=False)
            return
        self._weak[id(obj)] = (wr, ref)

    def _recall(self, obj: Any) -> Optional[ObjectRef]:
        e = self._weak.get(id(obj))
        if e is not None and e[0]() is obj:
            return e[1]
        e = self._strong.get(id(obj))
        if e is not None and e[0] is obj:
            self._strong.move_to_end(id(obj))
            return e[1]
        return None

    def persistent_id(self, obj: Any) -> Optional[tuple[Any, ...]]:
        kind, n = _classify(obj)
        if kind is None or n < self.min_nbytes or n < _INLINE_BELOW:
            return None
        ref = self._recall(obj)
        meta = None
        if kind == "t":
            from .torch import tensor_to_array
            arr, meta = tensor_to_array(obj)
            if arr is None:                 # not a CPU tensor: pickle it normally
                return None
            value = arr
        else:
            value = obj
        if ref is None:
            ref = self.store.put(value)
            self._remember(obj, ref)
        return ("dedupshm", self.sid[0], self.sid[1], ref, kind, meta)

    def pack(self, obj: Any) -> _Packed:
        """A :class:`_Packed` message for obj."""
        f = io.BytesIO()
        p = ForkingPickler(f, pickle.HIGHEST_PROTOCOL)
        p.persistent_id = self.persistent_id  # type: ignore[method-assign]
        p.dump(obj)
        return _Packed(f.getvalue())

    def close(self) -> None:
        self._weak.clear()
        self._strong.clear()


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: IO[bytes], writable: bool) -> None:
        super().__init__(f)
        self._writable = writable

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "dedupshm"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, name, directory, ref, kind, meta = pid
        store = _attached(name, directory)
        if kind == "t":
            from .torch import array_to_tensor
            return array_to_tensor(store.get(ref, writable=True), meta)
        value = store.get(ref, writable=self._writable)
        if kind == "b" and not isinstance(value, memoryview):
            value = memoryview(value)
        return value


class _Packed:
    """A pickled value whose large buffers are in a store.  ``value()``
    unpacks it (once: later calls return the same object).  No lock of its
    own (one held by another thread at fork would stay held in the child):
    threads racing on the first call may both unpack, the first to finish
    is kept."""

    __slots__ = ("data", "_value")
    _UNSET = object()

    def __init__(self, data: Optional[bytes]) -> None:
        self.data = data
        self._value: Any = self._UNSET

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Packed, (self.data,))

    def _take(self, writable: bool = False) -> Any:
        """The value, not kept here: a worker's argument must be let go of
        as soon as its task is done, before the result goes back (the
        worker loop keeps the message alive until the next task)."""
        data, self.data = self.data, None
        if data is None:
            raise ValueError("this message was unpacked already")
        return _Unpickler(io.BytesIO(data), writable).load()

    def value(self, writable: bool = False) -> Any:
        v = self._value
        if v is not self._UNSET:
            return v
        data = self.data
        if data is not None:
            v = _Unpickler(io.BytesIO(data), writable).load()
            with _attach.lock():
                if self._value is self._UNSET:
                    self._value = v
                    self.data = None
        v = self._value
        if v is self._UNSET:
            raise ValueError("this message was unpacked already")
        return v


def pack(obj: Any, store: Store, min_nbytes: int = DEFAULT_MIN_NBYTES) -> _Packed:
    """Pack ``obj`` for sending: large buffers go into ``store``.  Send the
    result through any pipe or queue; the receiver calls ``.value()``."""
    p = _Packer(store, min_nbytes)
    try:
        return p.pack(obj)
    finally:
        p.close()


# ---------------------------------------------------------------- the worker side

class _Task:
    """The function a worker runs: unpacks its argument, calls the user's
    function, packs the result.  Picklable (the store travels by name).
    ``encoding_error``: a result that cannot be pickled raises
    multiprocessing's MaybeEncodingError (what a Pool's worker reports),
    else the pickling error itself (what an executor's worker reports)."""

    __slots__ = ("func", "name", "directory", "min_nbytes", "writable", "mode", "encoding_error")

    def __init__(self, func: Callable[..., Any], store: Store, min_nbytes: int, writable: bool,
                 mode: str, encoding_error: bool = False) -> None:
        self.func = func
        self.name, self.directory = _store_id(store)
        self.min_nbytes = min_nbytes
        self.writable = writable
        self.mode = mode               # "one": f(x), "star": f(*x), "apply": f(*a, **kw)
        self.encoding_error = encoding_error

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.func, self.name, self.directory, self.min_nbytes, self.writable, self.mode,
                self.encoding_error)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (self.func, self.name, self.directory, self.min_nbytes, self.writable, self.mode,
         self.encoding_error) = state

    def __call__(self, packed: Any) -> Any:
        _attached(self.name, self.directory, keep=True)
        arg = packed._take(self.writable) if isinstance(packed, _Packed) else packed
        if self.mode == "one":
            result = self.func(arg)
        elif self.mode == "star":
            result = self.func(*arg)
        else:
            args, kwargs = arg
            del arg
            result = self.func(*args, **kwargs)
            del args, kwargs
        arg = packed = None                 # the argument's values are let go of here
        store = _attached(self.name, self.directory, keep=True)
        if not self.encoding_error:
            packed = pack(result, store, self.min_nbytes)
        else:
            try:
                packed = pack(result, store, self.min_nbytes)
            except Exception as e:  # noqa: BLE001 - reported as multiprocessing does
                # MaybeEncodingError is public in multiprocessing.pool, not in its stub
                raise cast(Any, multiprocessing.pool).MaybeEncodingError(e, result) from None
        del result                          # before the message goes back
        return packed


def _unpacked(v: Any, writable: bool) -> Any:
    return v.value(writable) if isinstance(v, _Packed) else v


def check_min_nbytes(min_nbytes: int) -> int:
    """``min_nbytes`` if it is a valid threshold (an int >= 1)."""
    if isinstance(min_nbytes, bool) or not isinstance(min_nbytes, int):
        raise TypeError("min_nbytes must be an int")
    if min_nbytes < 1:
        raise ValueError("min_nbytes must be >= 1")
    return min_nbytes


_check_min = check_min_nbytes
_check_store = _attach.check_store


# ---------------------------------------------------------------- Pool

class AsyncResult:
    """Like multiprocessing.pool.AsyncResult; ``get()`` returns the unpacked value."""

    def __init__(self, inner: multiprocessing.pool.AsyncResult[Any], writable: bool,
                 many: bool) -> None:
        self._inner = inner
        self._writable = writable
        self._many = many

    def _convert(self, v: Any) -> Any:
        if self._many:
            return [_unpacked(x, self._writable) for x in v]
        return _unpacked(v, self._writable)

    def get(self, timeout: Optional[float] = None) -> Any:
        return self._convert(self._inner.get(timeout))

    def wait(self, timeout: Optional[float] = None) -> None:
        self._inner.wait(timeout)

    def ready(self) -> bool:
        return self._inner.ready()

    def successful(self) -> bool:
        return self._inner.successful()


class _FailedResult:
    """The result of a call whose arguments could not be pickled."""

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc

    def get(self, timeout: Optional[float] = None) -> NoReturn:
        raise self._exc

    def wait(self, timeout: Optional[float] = None) -> None:
        pass

    def ready(self) -> bool:
        return True

    def successful(self) -> bool:
        return False


def _failed(exc: BaseException,
            error_callback: Optional[Callable[[BaseException], object]]) -> _FailedResult:
    if error_callback is not None:
        error_callback(exc)
    return _FailedResult(exc)


class _ResultIterator:
    """Like multiprocessing.pool.IMapIterator; yields unpacked values."""

    def __init__(self, inner: Any, writable: bool) -> None:
        self._inner = inner
        self._writable = writable

    def __iter__(self) -> _ResultIterator:
        return self

    def next(self, timeout: Optional[float] = None) -> Any:
        inner = self._inner
        if hasattr(inner, "next"):
            return _unpacked(inner.next(timeout), self._writable)
        return _unpacked(next(inner), self._writable)    # chunksize > 1: a generator

    __next__ = next


class Pool(multiprocessing.pool.Pool):
    """A :class:`multiprocessing.pool.Pool` whose large arguments and
    results travel through ``store`` (see the module docstring).

    ``Pool(processes=None, initializer=None, initargs=(),
    maxtasksperchild=None, context=None, *, store, min_nbytes=1 MiB,
    writable=False)``.  Values of at least ``min_nbytes`` bytes travel by
    reference; they arrive read-only unless ``writable`` (then
    copy-on-write).  A subclass of multiprocessing's Pool: everything else
    (lifecycle, ``with``, errors, the ResourceWarning of a pool never
    closed) is multiprocessing's.  A result that cannot be pickled raises
    :class:`multiprocessing.pool.MaybeEncodingError`, as there."""

    def __init__(self, processes: Optional[int] = None,
                 initializer: Optional[Callable[..., object]] = None, initargs: Iterable[Any] = (),
                 maxtasksperchild: Optional[int] = None, context: Any = None, *, store: Store,
                 min_nbytes: int = DEFAULT_MIN_NBYTES, writable: bool = False) -> None:
        self._state = multiprocessing.pool.INIT     # what __del__ reads if we raise here
        self._ds_store = _check_store(store)
        self._ds_min = _check_min(min_nbytes)
        self._ds_writable = bool(writable)
        super().__init__(processes, initializer, initargs, maxtasksperchild, context)

    if TYPE_CHECKING:
        # multiprocessing.pool.Pool's own (raises ValueError once the pool
        # is not running); its stub leaves it out
        def _check_running(self) -> None: ...

    @property
    def store(self) -> Store:
        return self._ds_store

    def _task(self, func: Callable[..., Any], mode: str) -> _Task:
        return _Task(func, self._ds_store, self._ds_min, self._ds_writable, mode,
                     encoding_error=True)

    def _pack_all(self, iterable: Iterable[Any]) -> Union[list[_Packed], Exception]:
        """The packed messages, or the exception packing raised.  As in
        multiprocessing: a closed pool and an iterable that raises raise
        here; a value that cannot be pickled fails the call's result."""
        self._check_running()           # before anything goes into the store
        items = iterable if hasattr(iterable, "__len__") else list(iterable)
        p = _Packer(self._ds_store, self._ds_min)
        try:
            return [p.pack(x) for x in items]
        except Exception as e:  # noqa: BLE001 - delivered through the result
            return e
        finally:
            p.close()

    def _pack_lazily(self, iterable: Iterable[Any]) -> Generator[_Packed, None, None]:
        p = _Packer(self._ds_store, self._ds_min)
        try:
            for x in iterable:
                yield p.pack(x)
        finally:
            p.close()

    # -- blocking
    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (),
              kwds: Mapping[str, Any] = {}) -> Any:
        return self.apply_async(func, args, kwds).get()

    def map(self, func: Callable[..., Any], iterable: Iterable[Any],
            chunksize: Optional[int] = None) -> list[Any]:
        return list(self.map_async(func, iterable, chunksize).get())

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: Optional[int] = None) -> list[Any]:
        return list(self.starmap_async(func, iterable, chunksize).get())

    # -- asynchronous
    def _callbacks(self, callback: Optional[Callable[[Any], object]],
                   error_callback: Optional[Callable[[BaseException], object]],
                   many: bool) -> Optional[Callable[[Any], None]]:
        if callback is None:
            return None
        writable = self._ds_writable

        def cb(v: Any) -> None:
            try:
                v = [_unpacked(x, writable) for x in v] if many else _unpacked(v, writable)
            except Exception as e:  # noqa: BLE001 - never kill the result handler
                if error_callback is not None:
                    error_callback(e)
                return
            callback(v)
        return cb

    # the *_async methods return our results (unpacked values), not
    # multiprocessing's result classes: the overrides differ from the stub there
    def apply_async(  # type: ignore[override]
            self, func: Callable[..., Any], args: Iterable[Any] = (),
            kwds: Mapping[str, Any] = {}, callback: Optional[Callable[[Any], object]] = None,
            error_callback: Optional[Callable[[BaseException], object]] = None
            ) -> Union[AsyncResult, _FailedResult]:
        packed = self._pack_all([(tuple(args), dict(kwds))])
        if isinstance(packed, Exception):
            return _failed(packed, error_callback)
        r = super().apply_async(self._task(func, "apply"), (packed[0],), {},
                                self._callbacks(callback, error_callback, False), error_callback)
        return AsyncResult(r, self._ds_writable, False)

    def map_async(self, func: Callable[..., Any],  # type: ignore[override]
                  iterable: Iterable[Any], chunksize: Optional[int] = None,
                  callback: Optional[Callable[[Any], object]] = None,
                  error_callback: Optional[Callable[[BaseException], object]] = None
                  ) -> Union[AsyncResult, _FailedResult]:
        return self._store_map_async(func, "one", iterable, chunksize, callback, error_callback)

    def starmap_async(self, func: Callable[..., Any],  # type: ignore[override]
                      iterable: Iterable[Iterable[Any]], chunksize: Optional[int] = None,
                      callback: Optional[Callable[[Any], object]] = None,
                      error_callback: Optional[Callable[[BaseException], object]] = None
                      ) -> Union[AsyncResult, _FailedResult]:
        return self._store_map_async(func, "star", iterable, chunksize, callback, error_callback)

    def _store_map_async(self, func: Callable[..., Any], mode: str, iterable: Iterable[Any],
                   chunksize: Optional[int],
                   callback: Optional[Callable[[Any], object]],
                   error_callback: Optional[Callable[[BaseException], object]]
                   ) -> Union[AsyncResult, _FailedResult]:
        packed = self._pack_all(iterable)
        if isinstance(packed, Exception):
            return _failed(packed, error_callback)
        r = super().map_async(self._task(func, mode), packed, chunksize,
                              self._callbacks(callback, error_callback, True), error_callback)
        return AsyncResult(r, self._ds_writable, True)

    def imap(self, func: Callable[..., Any],  # type: ignore[override]
             iterable: Iterable[Any], chunksize: int = 1) -> _ResultIterator:
        self._check_running()
        it = super().imap(self._task(func, "one"), self._pack_lazily(iterable), chunksize)
        return _ResultIterator(it, self._ds_writable)

    def imap_unordered(self, func: Callable[..., Any],  # type: ignore[override]
                       iterable: Iterable[Any], chunksize: int = 1) -> _ResultIterator:
        self._check_running()
        it = super().imap_unordered(self._task(func, "one"), self._pack_lazily(iterable),
                                    chunksize)
        return _ResultIterator(it, self._ds_writable)


# ---------------------------------------------------------------- ProcessPoolExecutor

class _Future(cf.Future[Any]):
    """The caller's future: the inner future's result, unpacked."""

    def __init__(self, inner: cf.Future[Any], writable: bool) -> None:
        super().__init__()
        self._inner = inner
        self._writable = writable
        inner.add_done_callback(self._copy)

    def cancel(self) -> bool:
        return self._inner.cancel()

    def running(self) -> bool:
        return not self.done() and self._inner.running()

    def _copy(self, f: cf.Future[Any]) -> None:
        if f.cancelled():
            super().cancel()
            return
        if not self.set_running_or_notify_cancel():
            return
        exc = f.exception()
        if exc is not None:
            self.set_exception(exc)
            return
        try:
            v = _unpacked(f.result(), self._writable)
        except BaseException as e:  # noqa: BLE001 - delivered to the caller
            self.set_exception(e)
        else:
            self.set_result(v)


class ProcessPoolExecutor(cf.ProcessPoolExecutor):
    """A :class:`concurrent.futures.ProcessPoolExecutor` whose large
    arguments and results travel through ``store`` (see the module
    docstring).  ``ProcessPoolExecutor(max_workers=None, mp_context=None,
    initializer=None, initargs=(), *, store, min_nbytes=1 MiB,
    writable=False, max_tasks_per_child=None)``.  A subclass of the
    standard executor: shutdown, ``with``, BrokenProcessPool when a worker
    dies are the standard ones.  Within one ``map()`` call the same object
    is put into the store once.

    Arguments are pickled by ``submit()`` itself (into the store and a
    message); one that cannot be pickled fails its future, as in the
    standard executor.  Unlike there, arguments that cannot be *unpickled*
    in the worker, or a result that cannot be unpickled here, fail that
    future alone with the error (the standard executor breaks the whole
    pool: BrokenProcessPool)."""

    def __init__(self, max_workers: Optional[int] = None,
                 mp_context: Optional[BaseContext] = None,
                 initializer: Optional[Callable[..., object]] = None,
                 initargs: tuple[Any, ...] = (), *, store: Store,
                 min_nbytes: int = DEFAULT_MIN_NBYTES, writable: bool = False,
                 **kw: Any) -> None:
        self._ds_store = _check_store(store)
        self._ds_min = _check_min(min_nbytes)
        self._ds_writable = bool(writable)
        self._ds_local = threading.local()       # the packer of a map() call in progress
        super().__init__(max_workers, mp_context, initializer, initargs, **kw)

    @property
    def store(self) -> Store:
        return self._ds_store

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        # refuse before anything goes into the store (the standard checks)
        if self._broken:
            raise BrokenProcessPool(self._broken)
        if self._shutdown_thread:
            raise RuntimeError("cannot schedule new futures after shutdown")
        packer = getattr(self._ds_local, "packer", None)
        try:
            if packer is not None:
                packed = packer.pack((args, kwargs))
            else:
                packed = pack((args, kwargs), self._ds_store, self._ds_min)
        except Exception as e:  # noqa: BLE001 - the standard executor fails the future
            failed: cf.Future[Any] = cf.Future()
            failed.set_exception(e)
            return failed
        task = _Task(fn, self._ds_store, self._ds_min, self._ds_writable, "apply")
        return _Future(super().submit(task, packed), self._ds_writable)

    submit.__doc__ = cf.Executor.submit.__doc__

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], **kw: Any) -> Iterator[Any]:
        # the standard map (chunks, timeout) submits every chunk now,
        # through submit() above: one packer for the whole call
        local = self._ds_local
        local.packer = _Packer(self._ds_store, self._ds_min)
        try:
            return super().map(fn, *iterables, **kw)
        finally:
            local.packer.close()
            local.packer = None


# ---------------------------------------------------------------- Queue

class Queue:
    """A :class:`multiprocessing.Queue` whose large values travel through
    ``store``: ``put`` stores them (in the caller's thread) and sends
    references, ``get`` returns the values zero-copy.  Pass it to child
    processes as you would a multiprocessing queue (as a Process argument
    or through a pool's initargs)."""

    def __init__(self, maxsize: int = 0, *, store: Store, min_nbytes: int = DEFAULT_MIN_NBYTES,
                 writable: bool = False, ctx: Any = None) -> None:
        self._store = _check_store(store)
        self._sid = _store_id(store)
        self._min = _check_min(min_nbytes)
        self._writable = bool(writable)
        self._q = (ctx or multiprocessing.get_context()).Queue(maxsize)

    def __getstate__(self) -> tuple[Any, ...]:
        return (self._q, self._sid, self._min, self._writable)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._q, self._sid, self._min, self._writable = state
        self._store = _attached(*self._sid)

    def put(self, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        self._q.put(pack(obj, self._store, self._min), block, timeout)

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        return _unpacked(self._q.get(block, timeout), self._writable)

    def get_nowait(self) -> Any:
        return self.get(False)

    def qsize(self) -> int:
        return self._q.qsize()

    def empty(self) -> bool:
        return self._q.empty()

    def full(self) -> bool:
        return self._q.full()

    def close(self) -> None:
        self._q.close()

    def join_thread(self) -> None:
        self._q.join_thread()

    def cancel_join_thread(self) -> None:
        self._q.cancel_join_thread()
