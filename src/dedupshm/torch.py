"""PyTorch integration: shared sample caches and batch transport.

Importable only where torch is installed (``import dedupshm`` never
imports torch).

* :class:`CachedDataset` wraps a map-style dataset: the first process that
  needs sample ``i`` (any DataLoader worker, any epoch) decodes it and puts
  it into the store; every later access, in any process, maps the stored
  copy.  Identical samples are stored once (page dedup).
* :class:`StoreCollate` is a ``collate_fn`` that sends each batch from the
  worker to the main process through the store (only references go
  through the worker's result queue; identical batches share pages).
* :func:`put_tensor` / :func:`get_tensor` store and map single tensors.

Tensors that come out of the store are zero-copy views of its shared pages
through a private copy-on-write mapping: torch has no read-only tensors
(``torch.from_numpy`` of a read-only array warns, and so does
``torch.frombuffer`` of a read-only buffer), so we map the pages
``writable=True``: reads share the physical pages with every other
process, and a write gives the writing process a private copy of the pages
it writes -- the stored value never changes.

A dataset that is a big list of Python objects belongs in a
:class:`dedupshm.SharedSequence` (``store.put_sequence(items)``), which
works as a map-style dataset as it is.
"""
from __future__ import annotations

import uuid
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
import torch.utils.data

from . import _attach
from .pool import check_min_nbytes, pack

if TYPE_CHECKING:
    import numpy as np

    from .pool import _Packed

    from .store import Key, ObjectRef, Store

__all__ = ["CachedDataset", "StoreCollate", "put_tensor", "get_tensor",
           "tensor_to_array", "array_to_tensor"]

# dtypes numpy cannot hold: stored as same-width integers, viewed back
_VIA_INT: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _VIA_INT[getattr(torch, _name)] = torch.uint8


def tensor_to_array(t: torch.Tensor) -> tuple[Optional[np.ndarray[Any, Any]], Any]:
    """(contiguous numpy array with t's bytes, meta) for a dense CPU tensor;
    (None, None) for tensors that cannot be stored as plain bytes
    (other devices, sparse, quantized, ...)."""
    if t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
        return None, None
    d = t.detach()
    if not d.is_contiguous():
        d = d.contiguous()
    if d.is_conj() or d.is_neg():
        d = d.resolve_conj().resolve_neg()
    via = _VIA_INT.get(d.dtype)
    try:
        arr = (d.view(via) if via is not None else d).numpy()
    except (TypeError, RuntimeError):
        return None, None
    return arr, (str(t.dtype).rsplit(".", 1)[-1], bool(t.requires_grad))


def array_to_tensor(arr: np.ndarray[Any, Any], meta: Any) -> torch.Tensor:
    """The tensor over ``arr``'s memory (zero-copy) with the dtype and
    requires_grad recorded in meta.  A read-only array is copied (torch
    has no read-only tensors); get arrays with ``writable=True`` to stay
    zero-copy."""
    if not arr.flags.writeable:
        arr = arr.copy()
    t = torch.from_numpy(arr)
    dtype_name, requires_grad = meta
    dtype = getattr(torch, dtype_name)
    if dtype in _VIA_INT:
        t = t.view(dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


class _TensorBox:
    """A tensor inside a stored value: pickles as its numpy bytes (an
    out-of-band buffer, so the store maps it) and rebuilds as a tensor."""

    __slots__ = ("arr", "meta")

    def __init__(self, arr: np.ndarray[Any, Any], meta: Any) -> None:
        self.arr, self.meta = arr, meta

    def __reduce__(self) -> tuple[Any, ...]:
        return (array_to_tensor, (self.arr, self.meta))


def _box(obj: Any, depth: int = 0) -> Any:
    """obj with its CPU tensors replaced by _TensorBox (dicts, lists,
    tuples and namedtuples are walked)."""
    if isinstance(obj, torch.Tensor):
        arr, meta = tensor_to_array(obj)
        return obj if arr is None else _TensorBox(arr, meta)
    if depth > 32:
        return obj
    t = type(obj)
    if t is dict:
        return {k: _box(v, depth + 1) for k, v in obj.items()}
    if t is list:
        return [_box(v, depth + 1) for v in obj]
    if t is tuple:
        return tuple(_box(v, depth + 1) for v in obj)
    if isinstance(obj, tuple) and hasattr(t, "_make"):
        return t._make(_box(v, depth + 1) for v in obj)
    return obj


def put_tensor(store: Store, tensor: Any, *, key: Optional[Key] = None) -> ObjectRef:
    """Store a tensor (any structure of tensors, too); returns its ObjectRef."""
    return store.put(_box(tensor), key=key)


def get_tensor(store: Store, ref_or_key: Union[ObjectRef, Key]) -> Any:
    """The stored tensor(s), zero-copy over a copy-on-write mapping."""
    return store.get(ref_or_key, writable=True)


def _store_of(store: Union[Store, str]) -> Store:
    if isinstance(store, str):
        return _attach.attached_store(store, None)
    return _attach.check_store(store)


class CachedDataset(torch.utils.data.Dataset[Any]):
    """A map-style dataset whose samples are decoded once and shared.

    ``CachedDataset(dataset, store, prefix=None)``: ``ds[i]`` returns the
    sample stored under key ``f"{prefix}/{i}"``, computing ``dataset[i]``
    and storing it first if no process has yet.  DataLoader workers and
    later epochs reuse the stored copy; identical samples share pages.
    The prefix defaults to a fresh one per wrapper (so two wrappers never
    mix); pass a stable prefix to reuse a cache across runs while the store
    lives.  Tensors come back zero-copy (copy-on-write, see the module
    docstring).  If the store is full, samples are returned uncached
    (warning once).  The cache lives until :meth:`clear` or the store's
    end."""

    def __init__(self, dataset: Any, store: Union[Store, str], *,
                 prefix: Optional[str] = None) -> None:
        self.dataset = dataset
        store = _store_of(store)
        self._sid = _attach.store_id(store)
        self._store: Optional[Store] = store
        self.prefix = prefix if prefix is not None else f"dedupshm.cache/{uuid.uuid4().hex}"
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_store"] = None
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)

    @property
    def store(self) -> Store:
        if self._store is None or self._store.closed:
            self._store = _attach.attached_store(*self._sid, keep=True)
        return self._store

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, index: int) -> str:
        return f"{self.prefix}/{index}"

    def __getitem__(self, index: int) -> Any:
        store = self.store
        key = self.key(index)
        try:
            return store.get(key, writable=True)
        except KeyError:
            pass
        sample = self.dataset[index]
        try:
            store.put(_box(sample), key=key)
        except MemoryError as e:          # StoreFullError
            if not self._warned:
                self._warned = True
                warnings.warn(f"dedupshm cache {self.prefix!r}: {e}; serving uncached samples",
                              RuntimeWarning, stacklevel=2)
            return sample
        del sample
        return store.get(key, writable=True)

    def cached(self) -> int:
        """Number of samples in the cache."""
        p = self.prefix + "/"
        return sum(1 for k in self.store.keys() if isinstance(k, str) and k.startswith(p))

    def clear(self) -> None:
        """Delete every cached sample of this prefix."""
        p = self.prefix + "/"
        store = self.store
        for k in store.keys():
            if isinstance(k, str) and k.startswith(p):
                try:
                    del store[k]
                except KeyError:
                    pass


class _StoreBatch:
    """A batch packed into the store in a worker; unpickles as the batch."""

    __slots__ = ("packed",)

    def __init__(self, packed: _Packed) -> None:
        self.packed = packed

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpack_batch, (self.packed,))


def _unpack_batch(packed: _Packed) -> Any:
    return packed.value(False)


class StoreCollate:
    """``collate_fn`` for DataLoader: collates with ``collate_fn`` (default
    ``torch.utils.data.default_collate``) and, in a worker, sends the
    tensors (and arrays/buffers) of at least ``min_nbytes`` through the
    store.  The main process receives ordinary batches whose tensors map
    the store's pages (copy-on-write).  In the main process itself
    (``num_workers=0``) it only collates."""

    def __init__(self, store: Union[Store, str], collate_fn: Optional[Callable[[Any], Any]] = None,
                 *, min_nbytes: int = 64 << 10) -> None:
        store = _store_of(store)
        self._sid = _attach.store_id(store)
        self._min = check_min_nbytes(min_nbytes)
        self.collate_fn = collate_fn

    def __call__(self, batch: Any) -> Any:
        fn = self.collate_fn or torch.utils.data.default_collate
        out = fn(batch)
        if torch.utils.data.get_worker_info() is None:
            return out
        store = _attach.attached_store(*self._sid, keep=True)
        return _StoreBatch(pack(out, store, self._min))

