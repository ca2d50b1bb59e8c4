"""The one module that talks to the compiled core (``dedupshm._core``).

:class:`Core` is this process's attachment to one store: the C handle,
the table of references this process holds (one shared handle per object,
counted here), and the making of views.  Everything else in the package
goes through it.  The GIL is released in every C call (cffi API mode).
"""
from __future__ import annotations

import errno
import functools
import itertools
import os
import stat
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

from ._typing import Buffer

from . import errors
from ._core import ffi, lib

_ERRORS: dict[int, Callable[[str], Exception]] = {
    lib.DS_ENOTFOUND: KeyError,
    lib.DS_EFULL: errors.StoreFullError,
    lib.DS_ECORRUPT: errors.CorruptStoreError,
    lib.DS_EVERSION: errors.IncompatibleStoreError,
    lib.DS_ELIMIT: errors.StoreLimitError,
    lib.DS_EINVAL: ValueError,
    lib.DS_ESTATE: errors.DedupShmError,
    lib.DS_ECLOSED: errors.StoreClosedError,
}

SMALL_MAX = lib.DS_SMALL_MAX
MAX_KEY = lib.DS_MAX_KEY
PAGE_SIZE = lib.DS_PAGE_SIZE


def strerror(rc: int) -> str:
    return str(ffi.string(lib.ds_strerror(rc)).decode())


def check(rc: int, what: str = "") -> None:
    """Raise the exception for a C return code (0: nothing)."""
    if rc == 0:
        return
    msg = f"{what}: {strerror(rc)}" if what else strerror(rc)
    if rc > 0:
        raise OSError(rc, msg)
    raise _ERRORS.get(rc, errors.DedupShmError)(msg)


def merger_wp_mode() -> str:
    """How the merger write-protects pages it merges: "userfaultfd" (kernel
    writes wait too) or "mprotect" (the fallback; see csrc/merger.c)."""
    return str(ffi.string(lib.ds_merger_wp_mode()).decode())


def hash_impl() -> str:
    """Name of the fingerprint kernel in use ("avx2" or "scalar")."""
    return str(ffi.string(lib.ds_hash_impl()).decode())


def _untrusted_file(*paths: str) -> str:
    """The first of ``paths`` that is not a regular file of ours, mode 0600."""
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return p
    return paths[0]


def _untrusted_reason(path: str) -> str:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "permission denied"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (refusing to follow or adopt it)"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this user"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets others in (a store's files are 0600)"
    return "permission denied"


def _view_cell() -> Any:
    """An empty view cell; collected, the C core releases what it holds."""
    return ffi.gc(ffi.new("ds_viewinfo *"), lib.ds_view_drop)


def _owner_of(vi: Any) -> Any:
    """A pointer to vi's data whose collection releases the view (and which
    keeps the cell alive till then), with no Python code in between."""
    return ffi.gc(ffi.cast("uint8_t *", vi.data), functools.partial(lib.ds_view_drop_at, vi),
                  size=vi.map_len)


class Core:
    """One process's attachment to a store.  Thread-safe and fork-safe.

    The references this process holds live in the C core (csrc/refs.c),
    which also makes a forked child a client of its own, holding all of
    them, before fork() returns.  Python owns references through *cells*
    (``ds_ref`` for an ObjectRef, ``ds_viewinfo`` for a view or a create
    buffer) allocated before the C call that fills them; releasing a cell
    is idempotent.  So a KeyboardInterrupt landing anywhere leaves every
    reference owned by a live Python object, or released.

    Lives while any Store, ObjectRef or view of it does; then the
    attachment is closed (weakref.finalize).  Cells that outlive the close
    keep what they hold until they are released."""

    def __init__(self, index_path: str, pool_path: str, create: bool, capacity: int,
                 warm_bytes: int, transit_ttl: int) -> None:
        # the cell closes the handle when collected: an interrupt between
        # ds_open and the finalizer below cannot leak the attachment
        out = ffi.gc(ffi.new("ds_store **"), lib.ds_close_at)
        rc = lib.ds_open(os.fsencode(index_path), os.fsencode(pool_path), int(create),
                         capacity, warm_bytes, transit_ttl, out)
        if rc == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "no such store", index_path)
        if rc == errno.EACCES or rc == errno.EPERM:
            bad = _untrusted_file(index_path, pool_path)
            raise PermissionError(rc, f"refusing the store's file: {_untrusted_reason(bad)}", bad)
        if rc == lib.DS_ECORRUPT and create:
            raise errors.CorruptStoreError(
                f"{index_path}: exists and is not a dedupshm store (refusing to overwrite it)")
        check(rc, index_path)
        self._s = out[0]
        self.index_path = index_path
        self.pool_path = pool_path
        self.ino = os.stat(index_path).st_ino
        uuid = ffi.new("uint8_t[16]")
        lib.ds_uuid(self._s, uuid)
        self.uuid = bytes(uuid)
        self._cell = out
        self._finalizer = weakref.finalize(self, lib.ds_close_at, out)

    # ---- references ----------------------------------------------------
    @staticmethod
    def new_ref() -> Any:
        """An empty reference cell (filled by put/pin/claim).  When it is
        collected, the C core releases what it holds: no Python code runs
        in between, so no KeyboardInterrupt can come in the way."""
        return ffi.gc(ffi.new("ds_ref *"), lib.ds_ref_drop)

    def pin(self, obj: int, gen: int, cell: Any) -> None:
        """Fill ``cell`` with one more reference on (obj, gen).  KeyError if
        the object is gone and this process does not hold it."""
        check(lib.ds_ref_pin(self._s, obj, gen, cell), "object")

    def alive(self, obj: int, gen: int) -> bool:
        """True if (obj, gen) is stored, sealed and not deleted."""
        rc = lib.ds_ref_alive(self._s, obj, gen)
        if rc == lib.DS_ENOTFOUND:
            return False
        check(rc, "object")
        return True

    def transit(self, obj: int, gen: int) -> Optional[int]:
        tok = ffi.new("uint64_t *")
        rc = lib.ds_transit(self._s, obj, gen, tok)
        return int(tok[0]) if rc == 0 else None

    def claim(self, token: Optional[int], obj: int, gen: int, cell: Any) -> bool:
        """Take over the reference a pickled ObjectRef carried -- or pin the
        object anew -- into ``cell``.  False if the object is gone."""
        rc = lib.ds_ref_claim(self._s, token or 0, obj, gen, cell)
        if rc == lib.DS_ENOTFOUND:
            return False
        check(rc, "object")
        return True

    # ---- values ----------------------------------------------------------
    def put(self, key: Optional[bytes], desc: bytes, bufs: Sequence[Buffer], nodedup: bool,
            cell: Any) -> None:
        """Store a value; ``cell`` receives the caller's reference."""
        n = len(bufs)
        iov = ffi.new("ds_iov[]", max(n, 1))
        keep = [ffi.from_buffer("char[]", b) for b in bufs]   # alive during the call
        for i, p in enumerate(keep):
            iov[i].base = p
            iov[i].len = len(p)
        rc = lib.ds_put_ref(self._s, key if key is not None else ffi.NULL,
                            len(key) if key is not None else 0,
                            desc, len(desc), iov, n, lib.DS_NODEDUP if nodedup else 0, cell)
        check(rc, "put")

    def put_key(self, key: bytes, desc: bytes, buf: Any) -> None:
        """Store one buffer under key, taking no reference."""
        data = buf if type(buf) is bytes else ffi.from_buffer("char[]", buf)
        check(lib.ds_put_key(self._s, key, len(key), desc, len(desc), data, len(data), 0),
              "put")

    def create(self, key: bytes, nbytes: int) -> tuple[Any, memoryview]:
        """Begin a writable object.  Returns (cell, memoryview of the
        zero-filled buffer); the buffer keeps the cell alive."""
        vi = _view_cell()
        check(lib.ds_create_open(self._s, key, len(key), nbytes, vi), "create")
        return vi, memoryview(ffi.buffer(_owner_of(vi), nbytes))

    def commit(self, vi: Any, desc: bytes) -> None:
        check(lib.ds_create_commit(self._s, vi, desc, len(desc)), "commit")

    def abort(self, vi: Any) -> None:
        lib.ds_create_abort(self._s, vi)

    def lookup(self, key: bytes) -> Optional[tuple[int, int]]:
        obj, gen = ffi.new("uint32_t *"), ffi.new("uint64_t *")
        rc = lib.ds_lookup(self._s, key, len(key), obj, gen)
        if rc == lib.DS_ENOTFOUND:
            return None
        check(rc, "lookup")
        return int(obj[0]), int(gen[0])

    def view(self, obj: int, gen: int, writable: bool,
             key: Optional[bytes] = None) -> tuple[bytes, list[memoryview]]:
        """Map (obj, gen) -- or the object bound to ``key`` -- and return
        (descriptor, [buffer memoryviews]); the buffers own the view, which
        is released with the last of them.  KeyError if it is gone."""
        vi = _view_cell()
        if key is not None:
            check(lib.ds_view_key(self._s, key, len(key), int(writable), vi), "view")
        else:
            check(lib.ds_view_open(self._s, obj, gen, int(writable), vi), "view")
        desc: bytes = ffi.unpack(ffi.cast("char *", vi.desc), vi.desclen)
        size: int = vi.size
        tab: list[int] = ffi.unpack(vi.bufs, 2 * vi.nbufs)     # read while pinned
        if vi.small:
            # a packed small value (<= DS_SMALL_MAX bytes): copied while
            # pinned -- cheaper than mapping, and as immutable
            raw = ffi.unpack(ffi.cast("char *", vi.data), size)
            lib.ds_view_close(self._s, vi)
            base = memoryview(bytearray(raw) if writable else raw)
        else:
            base = memoryview(ffi.buffer(_owner_of(vi), size))
            if not writable:
                base = base.toreadonly()
        if len(tab) == 2 and tab[0] == 0 and tab[1] == size:
            return desc, [base]
        return desc, [base[tab[2 * i]: tab[2 * i] + tab[2 * i + 1]] for i in range(len(tab) // 2)]

    def delete_key(self, key: bytes) -> None:
        check(lib.ds_delete_key(self._s, key, len(key)), "delete")

    def delete_obj(self, obj: int, gen: int) -> None:
        check(lib.ds_delete_obj(self._s, obj, gen), "delete")

    def count(self) -> int:
        n = ffi.new("uint64_t *")
        check(lib.ds_count(self._s, n), "count")
        return int(n[0])

    def key_batches(self, keycap: int = 1 << 18,
                    maxn: int = 8192) -> Iterator[tuple[list[bytes], list[int]]]:
        """Yield ([key bytes], [logical size]), one bounded batch of the
        store's keys at a time; the lock is held only inside each batch.
        A key bound for the whole walk comes exactly once."""
        cursor = ffi.new("uint64_t *")
        used, count = ffi.new("uint64_t *"), ffi.new("uint32_t *")
        keys = ffi.new("uint8_t[]", keycap)
        lens, sizes = ffi.new("uint32_t[]", maxn), ffi.new("uint64_t[]", maxn)
        while cursor[0] < lib.DS_KEYS_END:
            rc = lib.ds_keys_next(self._s, cursor, keys, keycap, lens, sizes, maxn,
                                  used, count)
            if rc == errno.ERANGE:               # one bucket needs more room
                keycap, maxn = max(keycap, used[0] * 2), max(maxn, count[0] * 2)
                keys = ffi.new("uint8_t[]", keycap)
                lens, sizes = ffi.new("uint32_t[]", maxn), ffi.new("uint64_t[]", maxn)
                continue
            check(rc, "keys")
            n = count[0]
            if not n:
                continue
            raw = ffi.unpack(ffi.cast("char *", keys), used[0])
            ends = list(itertools.accumulate(ffi.unpack(lens, n)))
            yield ([raw[a:b] for a, b in zip([0] + ends, ends)], ffi.unpack(sizes, n))

    def stats(self) -> dict[str, Any]:
        st = ffi.new("ds_stats *")
        check(lib.ds_stats_get(self._s, st), "stats")
        return {name: getattr(st, name) for name in dir(st)}

    def check(self) -> tuple[list[str], dict[str, int]]:
        """Full consistency check: (list of problems, info dict)."""
        info = ffi.new("ds_checkinfo *")
        size = 1 << 20
        buf = ffi.new("char[]", size)
        check(lib.ds_check(self._s, buf, size, info), "check")
        text = ffi.string(buf).decode(errors="replace")
        errs = [line for line in text.split("\n") if line]
        if info.errors > len(errs):
            errs.append(f"... and {info.errors - len(errs)} more")
        return errs, {"objects": info.objects, "pages": info.pages, "bytes_checked": info.bytes_checked}

    def gc(self) -> dict[str, Any]:
        gi = ffi.new("ds_gcinfo *")
        check(lib.ds_gc(self._s, gi), "gc")
        return {name: getattr(gi, name) for name in dir(gi)}

    def identity(self) -> bytes:
        """This process's client identity in the store, as bytes."""
        slot, ns = ffi.new("uint32_t *"), ffi.new("uint64_t *")
        lib.ds_client_self(self._s, slot, ns)
        return f"{slot[0]}:{ns[0]}".encode()

    def identity_alive(self, ident: Buffer) -> bool:
        """Is the client named by identity() still attached and alive?
        (By its slot lock: true across PID namespaces.)"""
        try:
            slot, ns = (int(x) for x in bytes(ident).decode().split(":"))
        except (ValueError, UnicodeDecodeError):
            return False
        if not (0 <= slot < 1 << 32 and 0 <= ns < 1 << 64):
            return False
        return bool(lib.ds_client_alive(self._s, slot, ns))

    def clients(self) -> list[dict[str, Any]]:
        arr = ffi.new("ds_clientinfo[]", 4096)
        n = ffi.new("uint32_t *")
        check(lib.ds_clients(self._s, arr, 4096, n), "clients")
        return [{"slot": arr[i].slot, "pid": arr[i].pid, "handles": arr[i].handles,
                 "merged_pages": arr[i].merged_pages, "attach_time": arr[i].attach_ns / 1e9}
                for i in range(n[0])]

    # ---- mergeable memory ------------------------------------------------
    def mergeable(self, nbytes: int) -> memoryview:
        """Private, zero-filled, page-aligned memory the merger may merge.
        Returns a writable memoryview; the region is given back when the
        last export of it is released or collected."""
        addr = ffi.new("uint8_t **")
        check(lib.ds_mergeable_alloc(self._s, nbytes, addr), "mergeable")
        owner = ffi.gc(addr[0], functools.partial(lib.ds_mergeable_free, self._s), size=nbytes)
        return memoryview(ffi.buffer(owner, nbytes))

    def decay(self, decay_ms: int) -> bool:
        """One bounded step of returning warm pages idle for decay_ms to the
        kernel (csrc/pool.c: ds_decay), resuming where the last step of this
        process stopped.  False once the handle is closed."""
        cells = self.__dict__.get("_decay_cells")
        if cells is None:
            cells = self._decay_cells = (ffi.new("uint32_t *"), ffi.new("uint64_t *"),
                                         ffi.new("uint64_t *"))
        return bool(lib.ds_decay(self._s, decay_ms, *cells) == 0)

    def merge_scan(self, max_pages: int) -> dict[str, Any]:
        info = ffi.new("ds_scaninfo *")
        check(lib.ds_merge_scan(self._s, max_pages, info), "merge scan")
        return {name: getattr(info, name) for name in dir(info)}

    def merger_config(self, vma_budget: int) -> None:
        check(lib.ds_merger_config(self._s, vma_budget), "merger config")

    def fingerprint(self, page: bytes | bytearray | memoryview) -> int:
        if len(page) != PAGE_SIZE:
            raise ValueError("a page is 4096 bytes")
        return int(lib.ds_fingerprint(self._s, ffi.from_buffer("char[]", page)))

    def fingerprint_pages(self, buf: Buffer) -> int:
        mv = memoryview(buf).cast("B")
        return int(lib.ds_fingerprint_pages(self._s, ffi.from_buffer("char[]", mv),
                                            mv.nbytes // PAGE_SIZE))
