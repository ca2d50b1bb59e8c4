"""Loading weight files into a store once per machine (shared by
dedupshm.torch.load, dedupshm.safetensors.load_file and dedupshm.numpy.load).

A file is read buffer by buffer (a tensor's storage, an array) straight
into ``store.create`` buffers, one object per buffer -- so every buffer
starts on a page and equal pages of different files (a fine-tune and its
base model) are stored once.  When every buffer is in, a *manifest* is put
under a key derived from the file's identity; it lists the buffers' keys
and what the caller needs to rebuild its value (dtypes, shapes, the
structure).  A later load of the same file by any process of the store
finds the manifest and maps the stored buffers without reading the file.

File identity (the manifest's key): kind, real path, device, inode, size,
mtime_ns and ctime_ns.  Content: a hash of the first and last 64 KiB and
of 16 evenly spaced 4 KiB blocks (``verify="sample"``, the default, a few
reads), or of the whole file (``verify="full"``: one read of the file,
still no allocation).  Rewriting a file in place changes its mtime and
ctime (ctime cannot be set back from user space), so a changed file is
missed only if something rewrote it with identical size within the same
timestamp tick *and* identical sampled bytes; ``verify="full"`` closes
that gap at the cost of reading the file.

Crash safety: a buffer being filled is private memory of the loader (the
store has nothing of it before its commit), so a loader killed mid-buffer
leaves nothing.  Buffers already committed are keyed under the loader's
client identity; the next loader of the file deletes those of loaders
that died (and a loader that fails -- a truncated or corrupt file --
deletes its own before raising).  The manifest is put last: a load is
visible to others whole or not at all.  Loaders of one file take turns
through :func:`dedupshm.server.shared_load`'s marker protocol: one reads,
the others wait and map.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from . import _attach
from .errors import DedupShmError
from .server import shared_load

if TYPE_CHECKING:
    from .store import Store

#: A file's identity: [kind, real path, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns]
Ident = list[Union[str, int]]
#: A file's path, as the loaders take it (they os.fsdecode it)
PathArg = Union[str, bytes, os.PathLike[str], os.PathLike[bytes]]
#: A file's path, as forget takes it (matched against the str real paths
#: recorded in the manifests)
StrPath = Union[str, os.PathLike[str]]

PREFIX = "dedupshm.weights/"
SAMPLE_EDGE = 64 << 10
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK = 4096
_VERIFY = ("sample", "full")
_FORMAT = 1


class WeightsFileError(DedupShmError, ValueError):
    """The file is truncated, corrupt or not in the expected format."""


def store_of(store: Union[Store, str]) -> Store:
    """An open Store, from a Store or a store name."""
    if isinstance(store, str):
        return _attach.attached_store(store, None)
    return _attach.check_store(store)


def _ident(kind: str, path: str, st: os.stat_result) -> Ident:
    return [kind, os.path.realpath(path), st.st_dev, st.st_ino, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns]


def manifest_key(ident: Ident) -> str:
    h = hashlib.blake2b(repr(ident).encode("utf-8", "surrogatepass"), digest_size=20)
    return PREFIX + h.hexdigest()


def _pread_all(fd: int, n: int, off: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = os.pread(fd, n - len(out), off + len(out))
        if not b:
            break
        out += b
    return bytes(out)


def content_hash(fd: int, size: int, verify: str) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    h.update(verify.encode())
    if verify == "full":
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        off = 0
        while off < size:
            n = os.preadv(fd, [mv], off)
            if n <= 0:
                break
            h.update(mv[:n])
            off += n
        return h.digest()
    h.update(_pread_all(fd, SAMPLE_EDGE, 0))
    h.update(_pread_all(fd, SAMPLE_EDGE, max(size - SAMPLE_EDGE, 0)))
    for i in range(SAMPLE_BLOCKS):
        h.update(_pread_all(fd, SAMPLE_BLOCK, size * i // SAMPLE_BLOCKS))
    return h.digest()


class Writer:
    """Puts a loader's buffers into the store, one object each, under keys
    named after the loader; forgets (deletes) them all if the load fails."""

    def __init__(self, store: Store, mkey: str, me: str) -> None:
        self.store = store
        self.base = f"{mkey}/{me}/"
        self.keys: list[str] = []
        self.buffers: list[memoryview] = []

    def buffer(self, nbytes: int, fill: Callable[[memoryview], None]) -> int:
        """A new stored buffer of ``nbytes`` bytes that ``fill(memoryview)``
        fills in place; returns its index.  The buffer is committed (and
        deduplicated) when ``fill`` returns, and discarded if it raises."""
        key = f"{self.base}{len(self.keys)}"
        with self.store.create(key, nbytes) as buf:
            if nbytes:
                fill(buf)
        self.keys.append(key)
        self.buffers.append(buf)
        return len(self.keys) - 1

    def discard(self) -> None:
        for k in self.keys:
            try:
                self.store.delete(k)
            except (KeyError, DedupShmError):
                pass
        self.keys, self.buffers = [], []


def _delete_orphans(store: Store, mkey: str) -> None:
    """Delete buffers of loaders of this file that died or lost a race
    (those the manifest lists, if there is one, are kept)."""
    core = store._c()
    prefix = mkey + "/"
    try:
        m = store.get(mkey)
        keep = set(m["keys"]) if isinstance(m, dict) else set()
    except KeyError:
        keep = set()
    me = core.identity().decode()
    for k in store.keys():
        if not isinstance(k, str) or not k.startswith(prefix) or k in keep:
            continue
        owner = k[len(prefix):].split("/", 1)[0]
        if owner == me or core.identity_alive(owner.encode()):
            continue
        try:
            store.delete(k)
        except KeyError:
            pass


def _map(store: Store, manifest: dict[str, Any], writable: bool) -> list[memoryview]:
    out: list[memoryview] = []
    for k in manifest["keys"]:
        b = store.get(k, writable=writable)
        if not isinstance(b, memoryview):
            raise KeyError(k)
        out.append(b)
    return out


def load(store: Store, path: str, kind: str, read: Callable[[io.FileIO, Writer], object], *,
         verify: str = "sample", writable: bool = True) -> tuple[Any, list[memoryview], bool]:
    """(meta, [memoryview per buffer], from_store) for the file at
    ``path``: mapped from the store if a process of the store loaded this
    file before, else ``read(f, writer)`` -> meta, with f the file opened
    unbuffered (``read`` puts each buffer with ``writer.buffer``).
    ``read`` raises WeightsFileError (or OSError) for a bad file; nothing
    it put stays in the store then."""
    if verify not in _VERIFY:
        raise ValueError(f"verify must be one of {_VERIFY}, not {verify!r}")
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        ident = _ident(kind, path, st)
        mkey = manifest_key(ident)
        digest = content_hash(f.fileno(), st.st_size, verify)
        me = store._c().identity().decode()
        mine: dict[str, Writer] = {}

        def loader() -> dict[str, Any]:
            _delete_orphans(store, mkey)
            w = Writer(store, mkey, me)
            try:
                f.seek(0)
                meta = read(f, w)
            except BaseException:
                w.discard()
                raise
            mine["w"] = w
            return {"v": _FORMAT, "ident": ident, "hash": digest, "verify": verify,
                    "keys": w.keys, "meta": meta, "owner": me}

        for _ in range(8):
            try:
                m = shared_load(store, mkey, loader)
            except KeyError:
                continue
            if not isinstance(m, dict) or m.get("v") != _FORMAT:
                raise DedupShmError(f"{mkey!r} in the store is not a weights manifest")
            w = mine.pop("w", None)
            if m["owner"] == me and w is not None and m["keys"] == w.keys:
                bufs = w.buffers if writable else [b.toreadonly() for b in w.buffers]
                return m["meta"], bufs, False
            if w is not None:               # another loader's manifest won: drop ours
                w.discard()
            if m["ident"] == ident and m["hash"] == digest and m["verify"] == verify:
                try:
                    return m["meta"], _map(store, m, writable), True
                except KeyError:
                    pass                    # deleted meanwhile: load again
            # stale (content changed under the same identity, or another
            # verify mode) or incomplete: forget it and load again
            for k in [mkey] + list(m.get("keys", ())):
                try:
                    store.delete(k)
                except KeyError:
                    pass
        raise DedupShmError(f"{path}: could not load into the store (manifest kept changing)")


def forget(store: Store, path: Optional[StrPath] = None) -> int:
    """Delete what the store holds of weight files: of the file at ``path``
    (every identity it was loaded under: any kind, any version), or of all
    files when ``path`` is None.  Returns the number of keys deleted.
    Processes that map them keep their memory until they let go."""
    keys = [k for k in store.keys() if isinstance(k, str) and k.startswith(PREFIX)]
    if path is not None:
        real = os.path.realpath(path)
        mkeys = set()
        for k in keys:
            if "/" in k[len(PREFIX):]:
                continue
            try:
                m = store.get(k)
            except KeyError:
                continue
            if isinstance(m, dict) and m.get("ident", [None, None])[1] == real:
                mkeys.add(k)
        keys = [k for k in keys if k in mkeys or k.rsplit("/", 2)[0] in mkeys]
    n = 0
    for k in keys:
        try:
            store.delete(k)
            n += 1
        except KeyError:
            pass
    return n
