"""The Store: values in shared memory, identical pages stored once."""
from __future__ import annotations

import contextlib
import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from . import _attach, _decay, serialize
from ._native import MAX_KEY, Core
from .errors import StoreClosedError, StoreFullError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ._typing import Buffer
    from .merger import Merger

#: A key: str or bytes.
Key = Union[str, bytes]

DEFAULT_DIRECTORY = "/dev/shm"
#: Share of the directory's free space a new store may use by default.
DEFAULT_CAPACITY_SHARE = 0.5
#: Freed pages kept faulted in for reuse, by default (per store): at least
#: 256 MiB (one large value can be freed and put again without a page
#: fault or a hole punch), or an eighth of the capacity for big stores, at
#: most the capacity.  It is a cap, not a reservation: warm pages go back
#: to the kernel once idle for the decay time (``decay_s``, _decay.py).
DEFAULT_WARM_MIN = 256 << 20
DEFAULT_WARM_SHARE = 1 / 8


def default_warm_bytes(capacity: int) -> int:
    return min(capacity, max(DEFAULT_WARM_MIN, int(capacity * DEFAULT_WARM_SHARE)))
#: Seconds a pickled ObjectRef keeps its object alive if never unpickled.
DEFAULT_TRANSIT_TTL = 3600
GC_INTERVAL = 2.0

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*\Z", re.I)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(value: Union[int, str], what: str = "size") -> int:
    """An int, or a string such as "512MiB", "2GiB", "1.5GB", "4096"."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int or a string like '512MiB'")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(f"{what} {value!r} is not a size like '512MiB' or '2GiB'")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    else:
        raise TypeError(f"{what} must be an int or a string like '512MiB'")
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return n


def store_paths(name: str, directory: Optional[str] = None) -> tuple[str, str]:
    """The two files of store ``name``: (index, pool)."""
    check_name(name)
    d = directory or DEFAULT_DIRECTORY
    return (os.path.join(d, f"dedupshm.{name}.index"), os.path.join(d, f"dedupshm.{name}.pool"))


def check_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"store name must be a str, not {type(name).__name__}")
    if not _NAME_RE.match(name):
        raise ValueError(f"store name {name!r} must match [A-Za-z0-9._-]{{1,64}}")
    if name in (".", ".."):
        raise ValueError(f"store name {name!r} is not allowed")


def encode_key(key: object) -> bytes:
    """Keys are str or bytes; stored with a one-byte type tag."""
    if isinstance(key, str):
        b = b"s" + key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes):
        b = b"b" + bytes(key)
    else:
        raise TypeError(f"keys must be str or bytes, not {type(key).__name__}")
    if len(b) > MAX_KEY:
        raise ValueError(f"key is {len(b) - 1} bytes; the limit is {MAX_KEY - 1}")
    return b


def decode_key(b: bytes) -> Key:
    return b[1:].decode("utf-8", "surrogatepass") if b[:1] == b"s" else bytes(b[1:])


# One attachment per store per process, shared by Store objects and refs:
# the attach cache (and every other process-wide registry) is in _attach.
def _core_for(name: str, directory: Optional[str], create: bool, capacity: int,
              warm_bytes: int, transit_ttl: int) -> Core:
    index, pool = store_paths(name, directory)
    return _attach.core(index, pool, create, capacity, warm_bytes, transit_ttl)


def _put_retrying(core: Any, put: Callable[..., None], *args: Any) -> None:
    """put(*args); on StoreFullError run gc (dead processes may hold
    space) and try once more."""
    try:
        put(*args)
    except StoreFullError:
        core.gc()
        put(*args)


class ObjectRef:
    """A reference to a stored object.  Small, hashable, picklable.

    While any ObjectRef to an object exists in any process -- or is in
    flight inside a pickle -- the object stays in the store.  A pickled
    ref carries a reference of its own, taken over by the first process
    that unpickles it (or dropped after the store's transit TTL).  A child
    of fork() holds every ref it inherited."""

    __slots__ = ("_core", "_cell", "__weakref__")

    def __init__(self, core: Union[Core, _DeadCore], cell: Any) -> None:
        # the cell exists before the C call that fills it, and its collection
        # releases what it holds (Core.new_ref): nothing is ever unowned
        self._core = core
        self._cell = cell

    @property
    def _obj(self) -> int:
        return int(self._cell.obj)

    @property
    def _gen(self) -> int:
        return int(self._cell.gen)

    @property
    def _live(self) -> bool:
        return bool(self._cell.held)

    @property
    def id(self) -> tuple[int, int]:
        """(object slot, generation): unique within its store."""
        return (self._cell.obj, self._cell.gen)

    def __hash__(self) -> int:
        return hash((self._core.uuid, self._cell.obj, self._cell.gen))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ObjectRef) and other._core.uuid == self._core.uuid
                and other._cell.obj == self._cell.obj and other._cell.gen == self._cell.gen)

    def __repr__(self) -> str:
        name = os.path.basename(self._core.index_path)[len("dedupshm."):-len(".index")]
        return f"<ObjectRef {name}:{self._cell.obj}.{self._cell.gen}>"

    def __copy__(self) -> ObjectRef:
        # (a dangling ref's _DeadCore cannot pin: copying one raises AttributeError)
        return _local_ref(self._core, self._cell.obj, self._cell.gen)  # type: ignore[arg-type]

    def __deepcopy__(self, memo: Any) -> ObjectRef:
        return self.__copy__()

    def __reduce__(self) -> tuple[Any, ...]:
        obj, gen = self._cell.obj, self._cell.gen
        token = self._core.transit(obj, gen) if self._cell.held else None
        d, base = os.path.split(self._core.index_path)
        name = base[len("dedupshm."):-len(".index")]
        return (_rebuild_ref, (d, name, self._core.uuid, obj, gen, token))


def _local_ref(core: Core, obj: int, gen: int) -> ObjectRef:
    """A new ObjectRef holding (obj, gen); a dead one if it is gone."""
    ref = ObjectRef(core, core.new_ref())
    try:
        core.pin(obj, gen, ref._cell)
    except KeyError:
        ref._cell.obj, ref._cell.gen = obj, gen
    return ref


def _rebuild_ref(directory: str, name: str, uuid: bytes, obj: int, gen: int,
                 token: Optional[int]) -> ObjectRef:
    try:
        core = _core_for(name, directory, False, 0, 0, 0)
    except FileNotFoundError:
        core = None
    if core is None or core.uuid != uuid:
        # the store is gone (or was re-created): a dangling reference
        ref = ObjectRef(_DeadCore(directory, name, uuid), Core.new_ref())
    else:
        ref = ObjectRef(core, core.new_ref())
        if core.claim(token, obj, gen, ref._cell):
            return ref
    ref._cell.obj, ref._cell.gen = obj, gen
    return ref


class _DeadCore:
    """Stands in for the store of a reference whose store no longer exists."""

    def __init__(self, directory: str, name: str, uuid: bytes) -> None:
        self.index_path = store_paths(name, directory)[0]
        self.uuid = uuid

    def transit(self, obj: int, gen: int) -> Optional[int]:
        return None


def _attach_store(name: str, directory: str) -> Store:
    return Store(name, directory=directory)


class CheckReport:
    """What :meth:`Store.check` found: ``errors`` (list of str, empty when
    healthy), ``objects``, ``pages``, ``bytes_checked``."""

    def __init__(self, errors: list[str], objects: int = 0, pages: int = 0,
                 bytes_checked: int = 0) -> None:
        self.errors = errors
        self.objects = objects
        self.pages = pages
        self.bytes_checked = bytes_checked

    @property
    def ok(self) -> bool:
        return not self.errors

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        state = "ok" if self.ok else f"{len(self.errors)} errors"
        return (f"<CheckReport {state}: {self.objects} objects, {self.pages} pages, "
                f"{self.bytes_checked} bytes re-hashed>")


class Store:
    """A deduplicating shared-memory object store.

    ``Store(name, create=True)`` creates the store (or attaches if it
    exists); ``Store(name)`` attaches to an existing one and raises
    FileNotFoundError if there is none.  Every process attaches directly;
    there is no server.

    ``capacity`` bounds the physical bytes of object data (int or
    "512MiB"); by default half the free space of ``directory`` when the
    store is created.  Freed pages stay faulted in ("warm") for reuse, up
    to ``warm_bytes`` (default: max(256 MiB, capacity / 8), at most the
    capacity; the rest goes back to the OS at once), and are returned to
    the OS by a background thread once unused for ``decay_s`` seconds
    (default 10, or the environment's DEDUPSHM_DECAY_MS).  Page dedup is a
    timing side channel between the processes of a store: pass
    ``dedup=False`` to :meth:`put` for values that must not share pages.
    """

    def __init__(self, name: str, *, create: bool = False, capacity: Union[int, str, None] = None,
                 directory: Optional[str] = None, warm_bytes: Union[int, str, None] = None,
                 transit_ttl: Optional[int] = None, merger: bool = False,
                 decay_s: Optional[float] = None) -> None:
        check_name(name)
        decay_ms = _decay.decay_ms_of(decay_s)
        directory = directory or DEFAULT_DIRECTORY
        if create:
            if capacity is None:
                st = os.statvfs(directory)
                capacity = max(int(st.f_bavail * st.f_frsize * DEFAULT_CAPACITY_SHARE), 1 << 20)
            capacity = parse_size(capacity, "capacity")
            warm = default_warm_bytes(capacity) if warm_bytes is None else warm_bytes
            warm = 0 if warm == 0 else parse_size(warm, "warm_bytes")
            ttl = DEFAULT_TRANSIT_TTL if transit_ttl is None else int(transit_ttl)
            if ttl < 0:
                raise ValueError("transit_ttl must be >= 0")
        else:
            capacity, warm, ttl = 0, 0, 0
        self.name = name
        self.directory = directory
        self._core: Optional[Core] = None
        self._core = _core_for(name, directory, create, capacity, warm, ttl)
        _decay.register(self._core, decay_ms)
        self._next_gc = 0.0
        self._maybe_gc()
        self._merger: Optional[Merger] = None
        if merger:
            self.merger.start()

    # ---- lifecycle -------------------------------------------------------
    def close(self) -> None:
        """Let go of the store in this object (stopping its merger thread).
        Views, ObjectRefs and mergeable memory still alive keep this
        process attached until they are released."""
        try:
            if self._merger is not None:
                self._merger.stop()
        finally:
            self._core = None

    @property
    def closed(self) -> bool:
        return self._core is None

    def unlink(self) -> None:
        """Remove the store's files.  Attached processes keep working until
        they close; new attaches fail with FileNotFoundError."""
        for p in store_paths(self.name, self.directory):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach_store, (self.name, self.directory))

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<dedupshm.Store {self.name!r} in {self.directory} ({state})>"

    def _c(self) -> Core:
        core = self._core
        if core is None:
            raise StoreClosedError(f"store {self.name!r} is closed")
        return core

    def _maybe_gc(self) -> None:
        now = time.monotonic()
        if now >= self._next_gc:
            self._next_gc = now + GC_INTERVAL
            self._c().gc()

    # ---- values ----------------------------------------------------------
    def put(self, value: Any, *, key: Optional[Key] = None, dedup: bool = True) -> ObjectRef:
        """Copy ``value`` into the store, seal it and return its ObjectRef.

        With ``key``, bind the key to it (replacing an older value).
        Identical pages are shared with everything else in the store unless
        ``dedup`` is False.  Raises StoreFullError (store unchanged) when
        the new pages do not fit."""
        core = self._c()
        kb = encode_key(key) if key is not None else None
        desc, bufs = serialize.encode(value)
        self._maybe_gc()
        ref = ObjectRef(core, core.new_ref())     # owns the reference from the start
        _put_retrying(core, core.put, kb, desc, bufs, not dedup, ref._cell)
        return ref

    def _own_ref(self, core: Core, ref: ObjectRef) -> tuple[int, int]:
        if ref._core.uuid != core.uuid:
            raise ValueError(f"{ref!r} belongs to another store")
        return ref._cell.obj, ref._cell.gen

    def get(self, ref_or_key: Union[ObjectRef, Key], *, writable: bool = False) -> Any:
        """The stored value, zero-copy.

        numpy arrays come back as read-only arrays over shared memory,
        bytes-like values as read-only memoryviews, anything else rebuilt
        with pickle protocol 5 (its large buffers stay in shared memory).
        ``writable=True`` gives a private copy-on-write view instead:
        writes stay in this process and cost memory only for pages written.
        The object's memory stays valid while the returned value (or any
        view of it) is alive -- even if the object is deleted meanwhile, and
        in a child of fork() that inherited it.  KeyError if the object was
        deleted before the call."""
        core = self._c()
        try:
            if isinstance(ref_or_key, ObjectRef):
                obj, gen = self._own_ref(core, ref_or_key)
                desc, bufs = core.view(obj, gen, writable)
            else:
                desc, bufs = core.view(0, 0, writable, key=encode_key(ref_or_key))
        except KeyError:
            raise KeyError(ref_or_key) from None
        return serialize.decode(desc, bufs, writable=writable)

    def put_sequence(self, iterable: Iterable[Any], *,
                     key: Optional[Key] = None) -> ObjectRef:
        """Store a read-only sequence of picklable objects, serialized once;
        ``get`` returns it as a :class:`dedupshm.SharedSequence` that reads
        items without writing shared pages (no refcount traffic)."""
        from .sequence import put_sequence
        return put_sequence(self, iterable, key=key)

    def ref(self, key: Key) -> ObjectRef:
        """An ObjectRef to the value bound to ``key`` (KeyError if none)."""
        core = self._c()
        kb = encode_key(key)
        ref = ObjectRef(core, core.new_ref())
        for _ in range(100):
            found = core.lookup(kb)
            if found is None:
                break
            try:
                core.pin(*found, ref._cell)
                return ref
            except KeyError:
                continue                    # replaced meanwhile: look again
        raise KeyError(key)

    @contextlib.contextmanager
    def create(self, key: Key, nbytes: int) -> Iterator[memoryview]:
        """``with store.create(key, nbytes) as buf:`` fill a writable
        memoryview in place; it is sealed and bound to ``key`` when the
        block exits normally, discarded if it raises.  After the block,
        ``buf`` is a private copy-on-write view of what was stored."""
        core = self._c()
        kb = encode_key(key)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError("nbytes must be an int")
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        if nbytes == 0:
            yield memoryview(bytearray(0))
            self.put(b"", key=key)
            return
        cell, buf = core.create(kb, nbytes)
        try:
            yield buf
        except BaseException:
            core.abort(cell)
            raise
        core.commit(cell, serialize.BYTES_DESC)

    def delete(self, ref_or_key: Union[ObjectRef, Key]) -> None:
        """Remove a value: unbind its key and make it unreachable.  Readers
        that hold it keep their bytes; memory returns when they let go."""
        core = self._c()
        _decay.kick()
        if isinstance(ref_or_key, ObjectRef):
            if ref_or_key._core.uuid != core.uuid:
                raise ValueError(f"{ref_or_key!r} belongs to another store")
            try:
                core.delete_obj(ref_or_key._obj, ref_or_key._gen)
            except KeyError:
                raise KeyError(ref_or_key) from None
        else:
            try:
                core.delete_key(encode_key(ref_or_key))
            except KeyError:
                raise KeyError(ref_or_key) from None

    # ---- mapping protocol -------------------------------------------------
    def __setitem__(self, key: Key, value: Any) -> None:
        """``store[key] = value``: put and bind, taking no reference (the
        binding keeps the value); a bytes value goes in without a copy on
        the Python side."""
        core = self._c()
        kb = encode_key(key)                # None is not a key here
        bufs: Sequence[Any]
        if type(value) is bytes:
            desc, bufs = serialize.BYTES_DESC, (value,)
        else:
            desc, bufs = serialize.encode(value)
        self._maybe_gc()
        if len(bufs) != 1:
            self.put(value, key=key)
            return
        _put_retrying(core, core.put_key, kb, desc, bufs[0])

    def __getitem__(self, key: Union[ObjectRef, Key]) -> Any:
        return self.get(key)

    def __delitem__(self, key: Union[ObjectRef, Key]) -> None:
        self.delete(key)

    def __contains__(self, key: object) -> bool:
        core = self._c()
        if isinstance(key, ObjectRef):
            return core.alive(*self._own_ref(core, key))
        return core.lookup(encode_key(key)) is not None

    def __len__(self) -> int:
        return self._c().count()

    def scan(self) -> Iterator[tuple[Key, int]]:
        """Iterate over (key, logical size in bytes) of the bound keys in
        bounded batches: the store is locked only while a batch is read,
        and memory stays constant however many keys there are.  A key
        bound for the whole walk comes exactly once; one bound or unbound
        during it may or may not."""
        for keys, sizes in self._key_batches():
            yield from zip(keys, sizes)

    def _key_batches(self) -> Iterator[tuple[list[Key], list[int]]]:
        for raw, sizes in self._c().key_batches():
            # decode_key, inlined: a walk of a million keys calls it a million times
            yield [k[1:].decode("utf-8", "surrogatepass") if k[0] == 115 else k[1:]
                   for k in raw], sizes

    def keys(self) -> list[Key]:
        """A list of the bound keys (see :meth:`scan` for what a walk sees)."""
        out: list[Key] = []
        for keys, _ in self._key_batches():
            out.extend(keys)
        return out

    def items_sizes(self) -> list[tuple[Key, int]]:
        """A list of (key, logical size in bytes) (see :meth:`scan`)."""
        out: list[tuple[Key, int]] = []
        for keys, sizes in self._key_batches():
            out.extend(zip(keys, sizes))
        return out

    def __iter__(self) -> Iterator[Key]:
        return (k for k, _ in self.scan())

    # ---- mergeable memory -------------------------------------------------
    def mergeable(self, nbytes: int) -> memoryview:
        """Writable, zero-filled, page-aligned memory owned by this process
        (a memoryview), which the merger dedups against the store and the
        mergeable memory of other processes, copy-on-write: what this
        process reads never changes under it, and its writes stay its own.
        Freed when the view (and every export of it) is released or
        garbage collected."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError("nbytes must be an int")
        if nbytes <= 0:
            raise ValueError("nbytes must be > 0")
        return self._c().mergeable(nbytes)

    def mergeable_array(self, shape: Union[int, Iterable[int]],
                        dtype: npt.DTypeLike = float) -> np.ndarray[Any, Any]:
        """A writable numpy array (zeros) on mergeable memory."""
        import numpy as np
        dt = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        count = 1
        for d in shape:
            count *= d
        buf = self.mergeable(max(count * dt.itemsize, 1))
        return np.frombuffer(buf, dtype=dt, count=count).reshape(shape)

    @property
    def merger(self) -> Merger:
        """This process's merger for the store (see dedupshm.merger.Merger)."""
        if self._merger is None:
            from .merger import Merger
            self._merger = Merger(self)
        return self._merger

    # ---- housekeeping -------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters of the whole store (all processes), as a dict."""
        s = self._c().stats()
        phys, logical = s["physical_bytes"], s["logical_bytes"]
        s["dedup_ratio"] = (logical / phys) if phys else (float("inf") if logical else 1.0)
        s["merger_cpu_seconds"] = s.pop("merger_cpu_ns") / 1e9
        # freed pages still faulted in (decaying); not part of physical_bytes
        s["warm_bytes"] = s["pages_free_warm"] * 4096
        return s

    def gc(self) -> dict[str, Any]:
        """Reclaim what dead processes left: their references, pins and
        half-written objects, and pickled references past their TTL.  Runs
        by itself too; never needed for correctness."""
        return self._c().gc()

    def check(self) -> CheckReport:
        """Check every invariant of the store (reference counts, free and used
        pages, the content index, the bytes of stored pages against their
        fingerprints, the counters).  Returns a :class:`CheckReport`; its
        ``errors`` list is empty for a healthy store.  Problems it can
        describe are reported, not raised."""
        errors, info = self._c().check()
        return CheckReport(errors, **info)

    def clients(self) -> list[dict[str, Any]]:
        """Attached processes: [{'slot', 'pid', 'handles', 'merged_pages', 'attach_time'}]."""
        return self._c().clients()

    def _fingerprint(self, page: bytes | bytearray | memoryview) -> int:
        return self._c().fingerprint(page)

    def _fingerprint_pages(self, buf: Buffer) -> int:
        return self._c().fingerprint_pages(buf)
