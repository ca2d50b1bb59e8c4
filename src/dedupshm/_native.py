"""The one module that talks to the compiled core (``dedupshm._core``).

:class:`Core` is this process's attachment to one store: the C handle,
the table of references this process holds (one shared handle per object,
counted here), and the making of views.  Everything else in the package
goes through it.  The GIL is released in every C call (cffi API mode).
"""
import errno
import os
import threading
import weakref

from . import errors
from ._core import ffi, lib

_ERRORS = {
    lib.DS_ENOTFOUND: KeyError,
    lib.DS_EFULL: errors.StoreFullError,
    lib.DS_ECORRUPT: errors.CorruptStoreError,
    lib.DS_EVERSION: errors.IncompatibleStoreError,
    lib.DS_ELIMIT: errors.StoreLimitError,
    lib.DS_EINVAL: ValueError,
    lib.DS_ESTATE: errors.DedupShmError,
}

SMALL_MAX = lib.DS_SMALL_MAX
MAX_KEY = lib.DS_MAX_KEY
PAGE_SIZE = lib.DS_PAGE_SIZE


def strerror(rc):
    return ffi.string(lib.ds_strerror(rc)).decode()


def check(rc, what=""):
    """Raise the exception for a C return code (0: nothing)."""
    if rc == 0:
        return
    msg = f"{what}: {strerror(rc)}" if what else strerror(rc)
    if rc > 0:
        raise OSError(rc, msg)
    raise _ERRORS.get(rc, errors.DedupShmError)(msg)


def merger_wp_mode():
    """How the merger write-protects pages it merges: "userfaultfd" (kernel
    writes wait too) or "mprotect" (the fallback; see csrc/merger.c)."""
    return ffi.string(lib.ds_merger_wp_mode()).decode()


def hash_impl():
    """Name of the fingerprint kernel in use ("avx2" or "scalar")."""
    return ffi.string(lib.ds_hash_impl()).decode()


def holder_view(holder, nbytes):
    """A writable memoryview over a mapping owned by ``holder``."""
    return memoryview(ffi.buffer(holder, nbytes))


_live_cores = weakref.WeakSet()


def _after_fork_in_child():
    for core in list(_live_cores):
        core._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Scratch(threading.local):
    """Per-thread output cells for C calls (saves allocating them per call)."""

    def __init__(self):
        self.obj = ffi.new("uint32_t *")
        self.gen = ffi.new("uint64_t *")
        self.h = ffi.new("uint32_t *")
        self.vi = ffi.new("ds_viewinfo *")


_scratch = _Scratch()


class Core:
    """One process's attachment to a store.  Thread-safe.

    Lives while any Store, ObjectRef or view of it does; then the
    attachment is closed and this process's remaining references are
    released (weakref.finalize)."""

    def __init__(self, index_path, pool_path, create, capacity, warm_bytes, transit_ttl):
        out = ffi.new("ds_store **")
        rc = lib.ds_open(os.fsencode(index_path), os.fsencode(pool_path), int(create),
                         capacity, warm_bytes, transit_ttl, out)
        if rc == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "no such store", index_path)
        if rc == errno.EACCES or rc == errno.EPERM:
            raise PermissionError(rc, "store belongs to another user", index_path)
        check(rc, index_path)
        self._s = out[0]
        self.index_path = index_path
        self.pool_path = pool_path
        self.ino = os.stat(index_path).st_ino
        uuid = ffi.new("uint8_t[16]")
        lib.ds_uuid(self._s, uuid)
        self.uuid = bytes(ffi.buffer(uuid, 16))
        self._held = {}                   # (obj, gen) -> [handle, count]
        self._lock = threading.RLock()
        self._finalizer = weakref.finalize(self, lib.ds_close, self._s)
        _live_cores.add(self)

    # ---- references ----------------------------------------------------
    def _after_fork(self):
        """Child of fork(): become a client of our own and re-take every
        reference the parent held on our behalf (refs and views we
        inherited)."""
        self._lock = threading.RLock()
        check(lib.ds_after_fork(self._s), "after fork")
        h = ffi.new("uint32_t *")
        for (obj, gen), entry in list(self._held.items()):
            if lib.ds_acquire(self._s, obj, gen, h) == 0:
                entry[0] = h[0]
            else:
                del self._held[(obj, gen)]

    def hold(self, obj, gen, handle):
        """Register a fresh shared handle (from put/acquire/claim) with one count."""
        with self._lock:
            entry = self._held.get((obj, gen))
            if entry is None:
                self._held[(obj, gen)] = [handle, 1]
                return
            entry[1] += 1
        lib.ds_release(self._s, handle)       # we had one already

    def pin(self, obj, gen):
        """Take one more local count on (obj, gen); acquire a shared handle
        if this process holds none.  KeyError if the object is gone."""
        with self._lock:
            entry = self._held.get((obj, gen))
            if entry is not None:
                entry[1] += 1
                return
            h = _scratch.h
            check(lib.ds_acquire(self._s, obj, gen, h), "object")
            self._held[(obj, gen)] = [h[0], 1]

    def unpin(self, obj, gen):
        with self._lock:
            entry = self._held.get((obj, gen))
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._held[(obj, gen)]
        if self._finalizer.alive:
            lib.ds_release(self._s, entry[0])

    def transit(self, obj, gen):
        tok = ffi.new("uint64_t *")
        rc = lib.ds_transit(self._s, obj, gen, tok)
        return tok[0] if rc == 0 else None

    def claim(self, token, obj, gen):
        """Take over the reference a pickled ObjectRef carried; if it was
        claimed already, take a new one.  Returns False if the object is
        gone."""
        h = ffi.new("uint32_t *")
        if token is not None and lib.ds_claim(self._s, token, obj, gen, h) == 0:
            self.hold(obj, gen, h[0])
            return True
        try:
            self.pin(obj, gen)
            return True
        except KeyError:
            return False

    # ---- values ----------------------------------------------------------
    def put(self, key, desc, bufs, nodedup):
        n = len(bufs)
        iov = ffi.new("ds_iov[]", max(n, 1))
        keep = [ffi.from_buffer("char[]", b) for b in bufs]   # alive during the call
        for i, p in enumerate(keep):
            iov[i].base = p
            iov[i].len = len(p)
        sc = _scratch
        obj, gen, h = sc.obj, sc.gen, sc.h
        rc = lib.ds_put(self._s, key if key is not None else ffi.NULL,
                        len(key) if key is not None else 0,
                        desc, len(desc), iov, n, lib.DS_NODEDUP if nodedup else 0,
                        obj, gen, h)
        check(rc, "put")
        self.hold(obj[0], gen[0], h[0])
        return obj[0], gen[0]

    def create(self, key, nbytes):
        """Begin a writable object.  Returns (obj, gen, holder, address);
        the holder owns the mapping (unmapped when it is collected)."""
        obj = ffi.new("uint32_t *")
        gen = ffi.new("uint64_t *")
        data = ffi.new("uint8_t **")
        check(lib.ds_create(self._s, key, len(key), nbytes, obj, gen, data), "create")
        npages = (nbytes + PAGE_SIZE - 1) // PAGE_SIZE
        state = {"pinned": False}
        o, g = obj[0], gen[0]

        def release(p, core=self, state=state, length=npages * PAGE_SIZE):
            lib.ds_unmap(p, length)
            if state["pinned"]:
                core.unpin(o, g)

        holder = ffi.gc(data[0], release, size=npages * PAGE_SIZE)
        return o, g, holder, state

    def commit(self, obj, gen, desc, holder, state):
        h = ffi.new("uint32_t *")
        check(lib.ds_commit(self._s, obj, gen, desc, len(desc), holder, h), "commit")
        self.hold(obj, gen, h[0])
        with self._lock:
            self._held[(obj, gen)][1] += 1      # one count for the holder
            state["pinned"] = True
        self.unpin(obj, gen)                    # put's own count: caller has no ref

    def abort(self, obj, gen, holder):
        lib.ds_abort(self._s, obj, gen, holder)

    def lookup(self, key):
        obj, gen = _scratch.obj, _scratch.gen
        rc = lib.ds_lookup(self._s, key, len(key), obj, gen)
        if rc == lib.DS_ENOTFOUND:
            return None
        check(rc, "lookup")
        return obj[0], gen[0]

    def view(self, obj, gen, writable):
        """Map a pinned object.  Returns (descriptor, [buffer memoryviews]);
        the buffers keep the pin until they are all released."""
        vi = _scratch.vi
        check(lib.ds_view(self._s, obj, gen, int(writable), vi), "view")
        desc = ffi.unpack(ffi.cast("char *", vi.desc), vi.desclen)
        size = vi.size
        map_len = vi.map_len

        if vi.small:
            # a packed small value (<= DS_SMALL_MAX bytes): copying it is
            # cheaper than pinning and mapping, and the copy is as immutable
            raw = ffi.unpack(ffi.cast("char *", vi.data), size)
            base = memoryview(bytearray(raw) if writable else raw)
            self.unpin(obj, gen)
        else:
            def release(p, core=self):
                if map_len:
                    lib.ds_unmap(p, map_len)
                core.unpin(obj, gen)

            holder = ffi.gc(ffi.cast("uint8_t *", vi.data), release, size=map_len)
            base = memoryview(ffi.buffer(holder, size))
            if not writable:
                base = base.toreadonly()
        if vi.nbufs == 1 and vi.bufs[0] == 0 and vi.bufs[1] == size:
            return desc, [base]
        tab = ffi.unpack(vi.bufs, 2 * vi.nbufs)
        return desc, [base[tab[2 * i]: tab[2 * i] + tab[2 * i + 1]] for i in range(vi.nbufs)]

    def delete_key(self, key):
        check(lib.ds_delete_key(self._s, key, len(key)), "delete")

    def delete_obj(self, obj, gen):
        check(lib.ds_delete_obj(self._s, obj, gen), "delete")

    def count(self):
        n = ffi.new("uint64_t *")
        check(lib.ds_count(self._s, n), "count")
        return n[0]

    def keys(self):
        """[(key bytes, logical size)] of every bound key (a snapshot)."""
        needed = ffi.new("uint64_t *")
        size = 1 << 16
        while True:
            buf = ffi.new("uint8_t[]", size)
            rc = lib.ds_keys(self._s, buf, size, needed)
            if rc == errno.ERANGE:
                size = needed[0] + 4096
                continue
            check(rc, "keys")
            raw = bytes(ffi.buffer(buf, needed[0]))
            break
        out, pos = [], 0
        while pos < len(raw):
            n = int.from_bytes(raw[pos:pos + 4], "little")
            size = int.from_bytes(raw[pos + 4:pos + 12], "little")
            out.append((raw[pos + 12:pos + 12 + n], size))
            pos += 12 + n
        return out

    def stats(self):
        st = ffi.new("ds_stats *")
        check(lib.ds_stats_get(self._s, st), "stats")
        return {name: getattr(st, name) for name in dir(st)}

    def check(self):
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

    def gc(self):
        gi = ffi.new("ds_gcinfo *")
        check(lib.ds_gc(self._s, gi), "gc")
        return {name: getattr(gi, name) for name in dir(gi)}

    def clients(self):
        arr = ffi.new("ds_clientinfo[]", 4096)
        n = ffi.new("uint32_t *")
        check(lib.ds_clients(self._s, arr, 4096, n), "clients")
        return [{"slot": arr[i].slot, "pid": arr[i].pid, "handles": arr[i].handles,
                 "merged_pages": arr[i].merged_pages, "attach_time": arr[i].attach_ns / 1e9}
                for i in range(n[0])]

    # ---- mergeable memory ------------------------------------------------
    def mergeable(self, nbytes):
        """Private, zero-filled, page-aligned memory the merger may merge.
        Returns a writable memoryview; the region is given back when the
        last export of it is released or collected."""
        addr = ffi.new("uint8_t **")
        check(lib.ds_mergeable_alloc(self._s, nbytes, addr), "mergeable")

        def release(p, core=self):
            if core._finalizer.alive:
                lib.ds_mergeable_free(core._s, p)

        holder = ffi.gc(addr[0], release, size=nbytes)
        return memoryview(ffi.buffer(holder, nbytes))

    def merge_scan(self, max_pages):
        info = ffi.new("ds_scaninfo *")
        check(lib.ds_merge_scan(self._s, max_pages, info), "merge scan")
        return {name: getattr(info, name) for name in dir(info)}

    def merger_config(self, vma_budget):
        check(lib.ds_merger_config(self._s, vma_budget), "merger config")

    def fingerprint(self, page):
        if len(page) != PAGE_SIZE:
            raise ValueError("a page is 4096 bytes")
        return lib.ds_fingerprint(self._s, ffi.from_buffer("char[]", page))

    def fingerprint_pages(self, buf):
        mv = memoryview(buf).cast("B")
        return lib.ds_fingerprint_pages(self._s, ffi.from_buffer("char[]", mv), mv.nbytes // PAGE_SIZE)
