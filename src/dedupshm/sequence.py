"""SharedSequence: a read-only list of Python objects in shared memory.

A list of a million small Python objects costs every process that reads it
its own copy, sooner or later: reading an object writes its reference
count, and the kernel copies the page written (pytorch #13246: DataLoader
workers' memory grows with the dataset).  A SharedSequence stores the
items serialized once -- each item pickled, all of them in one buffer plus
an array of offsets, both in a dedupshm store -- and unpickles an item when
it is accessed.  Reading never writes the shared pages, so they stay shared
by every process; the objects an access returns are the caller's own.

    ref = store.put_sequence(items)          # or put_sequence(store, items)
    seq = store.get(ref)                     # SharedSequence, zero-copy
    seq[3], seq[-1], seq[10:20], len(seq), list(seq)

It pickles as a reference: handing it to another process (a spawned
DataLoader worker, a pool task) sends a few hundred bytes, not the data.
"""
from __future__ import annotations

import collections.abc
import io
import os
import pickle
from typing import TYPE_CHECKING, Any, Final, Iterable, Iterator, Optional

from . import _attach

if TYPE_CHECKING:
    from ._typing import Buffer
    from .store import Key, ObjectRef, Store

__all__ = ["SharedSequence", "put_sequence"]

_OFFSETS_FORMAT: Final = "q"        # int64 offsets, n + 1 of them

# The ObjectRef of each stored payload, by nonce, for the processes that
# know it (the putter, and whoever unpickled the sequence) lets
# store.get()'s result pickle as that reference.  The registry is part of
# the one attach cache (dedupshm._attach).


class _Payload:
    """What put_sequence stores: pickles as the rebuild of a SharedSequence
    with the offsets and the item bytes as out-of-band buffers (so they
    land in the store's pages and come back as views)."""

    def __init__(self, offsets: memoryview, data: memoryview, n: int, name: str,
                 directory: str, nonce: bytes) -> None:
        self.offsets, self.data, self.n = offsets, data, n
        self.name, self.directory, self.nonce = name, directory, nonce

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if protocol < 5:
            raise pickle.PicklingError("a sequence payload needs pickle protocol 5")
        return (_rebuild, (pickle.PickleBuffer(self.offsets), pickle.PickleBuffer(self.data),
                           self.n, self.name, self.directory, self.nonce))


def _as_view(b: Buffer) -> memoryview:
    mv = b if isinstance(b, memoryview) else memoryview(b)
    return mv.toreadonly() if not mv.readonly else mv


def _rebuild(offsets: Any, data: Buffer, n: int, name: str, directory: str,
             nonce: bytes) -> SharedSequence:
    offsets = _as_view(offsets).cast("B").cast(_OFFSETS_FORMAT)
    if len(offsets) != n + 1:
        raise ValueError(f"corrupt sequence: {len(offsets)} offsets for {n} items")
    ref = _attach.known_sequence(nonce)
    return SharedSequence(offsets, _as_view(data).cast("B"), n, name, directory, nonce,
                          ref.__copy__() if ref is not None else None)


class SharedSequence(collections.abc.Sequence[Any]):
    """A read-only sequence of Python objects stored once in a dedupshm
    store (see the module docstring).

    Behaves like a list for reading: ``len``, indexing (negative too),
    slicing (returns a list), iteration, ``in``, ``index``, ``count``.
    Each access unpickles the item afresh: mutating what you got changes
    nothing stored.  Made by :func:`put_sequence` / ``store.put_sequence``
    and returned by ``store.get`` of its reference."""

    __slots__ = ("_offsets", "_data", "_n", "_name", "_directory", "_nonce", "_ref",
                 "__weakref__")

    def __init__(self, offsets: memoryview, data: memoryview, n: int, name: str, directory: str,
                 nonce: bytes, ref: Optional[ObjectRef] = None) -> None:
        self._offsets = offsets
        self._data = data
        self._n = n
        self._name = name
        self._directory = directory
        self._nonce = nonce
        self._ref = ref

    def __len__(self) -> int:
        return self._n

    def _item(self, i: int) -> Any:
        o = self._offsets
        return pickle.loads(self._data[o[i]:o[i + 1]])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(self._n))]
        try:
            i = index.__index__()
        except AttributeError:
            raise TypeError(f"sequence indices must be integers or slices, "
                            f"not {type(index).__name__}") from None
        n = self._n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("sequence index out of range")
        return self._item(i)

    def __iter__(self) -> Iterator[Any]:
        o, d, loads = self._offsets, self._data, pickle.loads
        start = o[0]
        for i in range(1, self._n + 1):
            end = o[i]
            yield loads(d[start:end])
            start = end

    def __repr__(self) -> str:
        return f"<dedupshm.SharedSequence of {self._n} items, {self.nbytes} bytes in {self._name!r}>"

    @property
    def nbytes(self) -> int:
        """Bytes of serialized items (the offsets take 8 more per item)."""
        return self._data.nbytes

    @property
    def ref(self) -> ObjectRef:
        """An ObjectRef that keeps this sequence stored (made on first use
        if this sequence came from a plain ``store.get``; storing it again
        shares every page with the stored copy)."""
        if self._ref is None:
            store = _attach.attached_store(self._name, self._directory)
            payload = _Payload(self._offsets.cast("B"), self._data, self._n, self._name,
                               self._directory, self._nonce)
            self._ref = store.put(payload)
            _remember(self._nonce, self._ref)
        return self._ref

    def __reduce__(self) -> tuple[Any, ...]:
        return (_from_ref, (self._name, self._directory, self.ref))

    def __copy__(self) -> SharedSequence:
        return self

    def __deepcopy__(self, memo: Any) -> SharedSequence:
        return self


_remember = _attach.remember_sequence


def _from_ref(name: str, directory: str, ref: ObjectRef) -> SharedSequence:
    store = _attach.attached_store(name, directory)
    seq = store.get(ref)
    if not isinstance(seq, SharedSequence):
        raise TypeError(f"{ref!r} is not a stored sequence")
    if seq._ref is None:
        seq._ref = ref
        _remember(seq._nonce, ref)
    return seq


def put_sequence(store: Store, iterable: Iterable[Any], key: Optional[Key] = None) -> ObjectRef:
    """Store the items of ``iterable`` as one SharedSequence and return its
    ObjectRef (with ``key``, also bind the key to it).  ``store.get`` of the
    ref or key returns the SharedSequence.  Items must be picklable; each
    is pickled once, here."""
    buf = io.BytesIO()
    offsets = [0]
    dumps, write, append = pickle.dumps, buf.write, offsets.append
    pos = 0
    proto = pickle.HIGHEST_PROTOCOL
    for item in iterable:
        try:
            b = dumps(item, proto)
        except Exception as e:  # noqa: BLE001 - any pickling failure is the caller's item
            raise TypeError(f"item {len(offsets) - 1} of the sequence cannot be pickled: "
                            f"{e}") from e
        pos += write(b)
        append(pos)
    import array
    offs = array.array(_OFFSETS_FORMAT, offsets)
    del offsets
    data = buf.getbuffer()
    nonce = os.urandom(16)
    payload = _Payload(memoryview(offs).cast("B"), data, len(offs) - 1, store.name,
                       store.directory, nonce)
    ref = store.put(payload, key=key)
    _remember(nonce, ref)
    return ref
