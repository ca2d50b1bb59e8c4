"""This process's attachments to stores: the one attach cache.

Every process-wide registry of the Python layer lives here, under one lock:

* ``core``: one :class:`~dedupshm._native.Core` per store file per process
  (weakly held: the attachment closes when no Store, ref or view uses it);
* ``attached_store``: a Store object per (name, directory) for code that
  receives a store by name (pool messages, pickled sequences, the torch
  integration); pool workers keep theirs (``keep=True``), others hold it
  weakly;
* ``known_sequence`` / ``remember_sequence``: the ObjectRef of each stored
  SharedSequence this process knows (by nonce).

Fork: the lock is taken before ``fork()`` and released after it in the
parent; the child gets a fresh lock.  So a fork landing while another
thread attaches never leaves the child with a lock nobody will release, and
the child sees the registries in a consistent state.  Nothing here may call
``fork()`` while holding the lock (nothing does).
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Optional

from ._native import PAGE_SIZE, Core

if TYPE_CHECKING:
    from .store import ObjectRef, Store

#: The C core addresses pages with 32 bits: the largest capacity it accepts.
MAX_CAPACITY_PAGES = 0xFFFFFFF0
MAX_CAPACITY = MAX_CAPACITY_PAGES * PAGE_SIZE

_lock = threading.RLock()
# index path -> weakref to Core
_cores: dict[str, weakref.ref[Core]] = {}
# (name, directory) -> Store
_stores: weakref.WeakValueDictionary[tuple[str, Optional[str]], Store] = weakref.WeakValueDictionary()
# stores a pool worker keeps attached
_kept: dict[tuple[str, Optional[str]], Store] = {}
# nonce -> ObjectRef of a SharedSequence
_sequences: weakref.WeakValueDictionary[Any, ObjectRef] = weakref.WeakValueDictionary()


def _before_fork() -> None:
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def lock() -> threading.RLock:
    """The registry lock (for tests and for code that must see one state)."""
    return _lock


# ---------------------------------------------------------------- attachments

def _human(n: float) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} B"


def check_capacity(capacity: int, directory: str) -> None:
    """ValueError naming the limit if ``capacity`` (bytes) is more than a
    store can hold."""
    if capacity > MAX_CAPACITY:
        try:
            st = os.statvfs(directory)
            room = f"; {directory} holds {_human(st.f_blocks * st.f_frsize)}"
        except OSError:
            room = ""
        raise ValueError(f"capacity {_human(capacity)} ({capacity:,} bytes) is more than a "
                         f"store can hold: the limit is {_human(MAX_CAPACITY)} "
                         f"({MAX_CAPACITY_PAGES:#x} pages of {PAGE_SIZE} bytes){room}")


def core(index: str, pool: str, create: bool, capacity: int, warm_bytes: int,
         transit_ttl: int) -> Core:
    """This process's Core for the store whose files are (index, pool):
    the attachment it has, or a new one."""
    if create:
        check_capacity(capacity, os.path.dirname(index) or ".")
    with _lock:
        ref = _cores.get(index)
        c = ref() if ref is not None else None
        if c is not None:
            try:
                if os.stat(index).st_ino == c.ino:
                    if not os.access(index, os.R_OK | os.W_OK):   # e.g. after setuid
                        raise PermissionError(13, "store belongs to another user", index)
                    return c
            except FileNotFoundError:
                if not create:
                    raise FileNotFoundError(2, "no such store", index) from None
        c = Core(index, pool, create, capacity, warm_bytes, transit_ttl)
        _cores[index] = weakref.ref(c)
        return c


# ---------------------------------------------------------------- Store objects by name

def store_id(store: Store) -> tuple[str, str]:
    """(name, directory): how a store travels to other processes."""
    return (store.name, store.directory)


def _is_current(s: Store) -> bool:
    """Whether Store s is attached to the store its name has now (not to
    one that was unlinked and created anew under the same name)."""
    from .store import store_paths
    try:
        ino = os.stat(store_paths(s.name, s.directory)[0]).st_ino
    except OSError:
        return True          # unlinked: the attachment still serves its refs
    try:
        return s._c().ino == ino
    except Exception:  # noqa: BLE001 - closed meanwhile
        return False


def attached_store(name: str, directory: Optional[str], keep: bool = False) -> Store:
    """This process's Store object for (name, directory).  Attaching once
    per use would be wasteful; keeping every store attached forever would
    pin the memory of unlinked stores, so only ``keep=True`` (pool
    workers) holds on; other users hold their own Store object."""
    key = (name, directory)
    with _lock:
        s = _stores.get(key)
        if s is None or s.closed or not _is_current(s):
            from .store import Store
            s = Store(name, directory=directory)
            _stores[key] = s
        if keep:
            _kept[key] = s
        return s


def check_store(store: Any) -> Store:
    """``store`` if it is an open Store (TypeError, StoreClosedError
    otherwise); it becomes this process's Store object for its name if
    there is none."""
    from .store import Store
    if not isinstance(store, Store):
        raise TypeError(f"store must be a dedupshm.Store, not {type(store).__name__}")
    store._c()              # StoreClosedError if closed
    key = store_id(store)
    with _lock:
        cur = _stores.get(key)
        if cur is None or cur.closed or not _is_current(cur):
            _stores[key] = store
    return store


# ---------------------------------------------------------------- stored sequences

def known_sequence(nonce: Any) -> Optional[ObjectRef]:
    """The ObjectRef this process knows for the sequence ``nonce``, or None."""
    with _lock:
        return _sequences.get(nonce)


def remember_sequence(nonce: Any, ref: ObjectRef) -> None:
    with _lock:
        if _sequences.get(nonce) is None:
            _sequences[nonce] = ref
