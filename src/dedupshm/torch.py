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
* :func:`share_module` moves a module's parameters and buffers onto store
  memory in place; :func:`load` loads a checkpoint into the store once per
  machine (see dedupshm._weights); every process maps the same pages.

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

import ctypes
import ctypes.util
import io
import os
import pickle
import uuid
import warnings
from typing import IO, TYPE_CHECKING, Any, Callable, Optional, Sequence, TypeVar, Union, cast

import numpy as np
import torch
import torch.utils.data

from . import _attach, _weights
from .pool import check_min_nbytes, pack

if TYPE_CHECKING:
    from ._weights import PathArg, StrPath
    from .pool import _Packed
    from .store import Key, ObjectRef, Store

__all__ = ["CachedDataset", "StoreCollate", "put_tensor", "get_tensor",
           "tensor_to_array", "array_to_tensor", "share_module", "load", "forget"]

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



# ---------------------------------------------------------------- weights

def _u8(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over an untyped storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))


def _storage_over(buf: memoryview) -> torch.UntypedStorage:
    """An untyped storage over a memoryview (which it keeps alive)."""
    if len(buf) == 0:
        # torch's stubs leave the storage constructor unannotated
        return cast(Callable[[int], torch.UntypedStorage], torch.UntypedStorage)(0)
    return torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()


def _tensor_on(storage: torch.UntypedStorage, dtype: torch.dtype,
               offset: Union[int, torch.SymInt], shape: Sequence[int],
               stride: Sequence[int]) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(storage, offset, tuple(shape), tuple(stride))


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps large freed
    chunks below its dynamic mmap threshold in the heap)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


_M = TypeVar("_M", bound=torch.nn.Module)


def share_module(module: _M, store: Union[Store, str], *, dedup: bool = True) -> _M:
    """Move every parameter and buffer of a CPU ``torch.nn.Module`` onto
    store memory, in place, and return the module.

    The module, its submodules and their Parameter and buffer objects stay
    the same objects (only their ``.data`` changes), so ``state_dict()``,
    ``forward``, optimizers and hooks keep working; tensors that share a
    storage (tied weights, views) share the new one the same way.  Each
    storage is put into the store page-aligned, with dedup (unless
    ``dedup=False``): the same weights shared by other processes, and
    equal pages of other models, are stored once.  The process's own copy
    is freed storage by storage, so the extra memory while sharing is one
    storage at most.  The tensors are then private copy-on-write mappings
    of the stored pages: reads share them, a write (training, an in-place
    update) gives the writing process a private copy of the pages it
    writes; the stored value never changes.

    Raises TypeError for a parameter or buffer that is not a dense CPU
    tensor (before anything is moved)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"share_module needs a torch.nn.Module, not {type(module).__name__}")
    store = _store_of(store)
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}  # storage -> tensors over it, in order
    seen: set[int] = set()
    for mname, m in module.named_modules(remove_duplicate=False):
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                if t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
                    raise TypeError(f"{mname + '.' if mname else ''}{name}: share_module needs "
                                    f"dense CPU tensors, not {t.device.type}/{t.layout}"
                                    f"{' quantized' if t.is_quantized else ''}")
                st = t.untyped_storage()
                groups.setdefault((st.data_ptr(), st.nbytes()), []).append(t)
    for (_, nbytes), tensors in groups.items():
        if nbytes == 0:
            continue
        old = tensors[0].untyped_storage()
        ref = store.put(memoryview(_u8(old).numpy()), dedup=dedup)
        new = _storage_over(store.get(ref, writable=True))
        del ref, old
        for t in tensors:
            t.data = _tensor_on(new, t.dtype, t.storage_offset(), t.shape, t.stride())
    groups.clear()
    _trim_heap()
    return module


_MAP_CPU = (None, "cpu")


class _Pickler(pickle.Pickler):
    """Pickles a loaded checkpoint's structure with every tensor replaced
    by a reference to its storage, which it puts into the store."""

    def __init__(self, file: IO[bytes], writer: Union[_weights.Writer, _PutWriter]) -> None:
        super().__init__(file, protocol=5)
        self.writer = writer
        self.storages: dict[tuple[int, int], int] = {}

    def persistent_id(self, obj: object) -> Optional[tuple[Any, ...]]:
        if not isinstance(obj, torch.Tensor):
            return None
        if obj.device.type != "cpu" or obj.layout != torch.strided or obj.is_quantized:
            return None             # pickled by value (rare: sparse, quantized)
        st = obj.untyped_storage()
        k = (st.data_ptr(), st.nbytes())
        idx = self.storages.get(k)
        if idx is None:
            src = _u8(st).numpy()

            def fill(buf: memoryview) -> None:
                # numpy's copy, not torch's: torch's parallel copy hangs in
                # a child forked after the parent ran torch threads
                np.frombuffer(buf, dtype=np.uint8)[:] = src

            idx = self.storages[k] = self.writer.buffer(st.nbytes(), fill)
            del src
        return ("t", idx, str(obj.dtype).rsplit(".", 1)[-1], obj.storage_offset(),
                tuple(obj.shape), tuple(obj.stride()), bool(obj.requires_grad),
                isinstance(obj, torch.nn.Parameter))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], storages: Sequence[torch.UntypedStorage]) -> None:
        super().__init__(file)
        self.storages = storages

    def persistent_load(self, pid: object) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 8 and pid[0] == "t"):
            raise pickle.UnpicklingError(f"bad tensor reference {pid!r}")
        _, idx, dtype, offset, shape, stride, requires_grad, is_param = pid
        t = _tensor_on(self.storages[idx], getattr(torch, dtype), offset, shape, stride)
        if is_param:
            return torch.nn.Parameter(t, requires_grad=requires_grad)
        if requires_grad:
            t.requires_grad_(True)
        return t


_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError,
                IndexError, AttributeError, TypeError, OSError)


class _PutWriter:
    """Puts each buffer as an object of its own without a key (for a
    file-like checkpoint: nothing to recognise it by later); the mapping
    returned keeps it alive."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.buffers: list[memoryview] = []

    def buffer(self, nbytes: int, fill: Callable[[memoryview], None]) -> int:
        tmp = bytearray(nbytes)
        fill(memoryview(tmp))
        ref = self.store.put(tmp)
        del tmp
        self.buffers.append(self.store.get(ref, writable=True))
        return len(self.buffers) - 1


def _read_checkpoint(path: str, kw: dict[str, Any]
                     ) -> Callable[[io.FileIO, _weights.Writer], dict[str, object]]:
    def read(f: io.FileIO, writer: _weights.Writer) -> dict[str, object]:
        # torch opens the file again: by /proc/self/fd, the very file we opened
        src = f"/proc/self/fd/{f.fileno()}"
        zipped = os.pread(f.fileno(), 4, 0) == b"PK\x03\x04"
        try:
            # a zip checkpoint (torch >= 1.6) is mapped, not read: one
            # storage at a time is copied into the store; a legacy one is
            # loaded whole first
            obj = torch.load(src, mmap=zipped, **kw)
        except _LOAD_ERRORS as e:
            raise _weights.WeightsFileError(
                f"{path}: not a loadable torch checkpoint: {type(e).__name__}: {e}") from e
        out = io.BytesIO()
        p = _Pickler(out, writer)
        try:
            p.dump(obj)
        except pickle.PicklingError as e:
            raise _weights.WeightsFileError(f"{path}: cannot hold its content: {e}") from e
        del obj, p
        return {"pickle": out.getvalue()}
    return read


def load(f: Union[PathArg, IO[bytes]], store: Union[Store, str], *, verify: str = "sample",
         **kw: Any) -> Any:
    """Like ``torch.load(f, **kw)`` for a checkpoint (a state_dict, or any
    structure of tensors), with every CPU tensor backed by the store.

    The first process of the store to load a file reads it tensor by
    tensor straight into the store (``torch.load(mmap=True)`` under the
    hood, so peak memory is the store's copy plus one storage in flight)
    and records a manifest; any later load of the same file (same real
    path, size, mtime, ctime, inode and sampled content -- see
    dedupshm._weights; ``verify="full"`` hashes the whole file instead) by
    any process maps the stored tensors without reading the file.  Equal
    pages of different checkpoints (fine-tunes of one base model) are
    stored once.  Tensors are private copy-on-write mappings, like
    :func:`share_module`'s; storages shared in the checkpoint (tied
    weights) stay shared.

    ``f`` is a path; ``weights_only`` defaults to True as in torch, other
    keywords go to ``torch.load``.  ``map_location`` may only be CPU (move
    tensors after loading).  A truncated or corrupt file raises
    ``WeightsFileError`` (a ValueError) and leaves nothing in the store.
    A file-like ``f`` is loaded whole with ``torch.load`` and its storages
    put into the store one by one, page-aligned (no manifest: there is no
    file to recognise later).  Storages of at most 2 KiB are packed in the
    store's index and come back as private copies."""
    store = _store_of(store)
    ml = kw.pop("map_location", None)
    if not (ml in _MAP_CPU or (isinstance(ml, torch.device) and ml.type == "cpu")):
        raise ValueError("dedupshm.torch.load returns CPU tensors on store memory; "
                         "pass map_location=None or 'cpu' and move them after loading")
    kw.pop("mmap", None)
    kw.setdefault("weights_only", True)
    kw["map_location"] = "cpu"
    if not isinstance(f, (str, bytes, os.PathLike)):
        obj = torch.load(f, **kw)
        w = _PutWriter(store)
        out = io.BytesIO()
        _Pickler(out, w).dump(obj)
        del obj
        storages = [_storage_over(b) for b in w.buffers]
        return _Unpickler(io.BytesIO(out.getvalue()), storages).load()
    path = os.fsdecode(f)
    meta, bufs, _ = _weights.load(store, path, "torch", _read_checkpoint(path, kw),
                                  verify=verify, writable=True)
    storages = [_storage_over(b) for b in bufs]
    return _Unpickler(io.BytesIO(meta["pickle"]), storages).load()


def forget(path: Optional[StrPath], store: Union[Store, str]) -> int:
    """Delete what ``store`` holds of weight files loaded from ``path``
    (all versions; None: of every file).  Returns the number of keys
    deleted; processes that map them keep their memory until they let go."""
    return _weights.forget(_store_of(store), path)
