"""Stores shared by the processes of an engine (Dask workers of a host, a
joblib caller and its workers): who creates them, who removes them.

A store of this kind is created by its first user and removed by its last:
each user, when it leaves, removes the files if no other live process is
attached (``Store.clients()`` after ``gc()``, which forgets dead processes).
Creation, attachment and that check run under one lock -- an exclusive
``flock`` on the store directory itself, so no extra file is needed and a
holder killed at any point releases it -- so a process cannot attach to a
store while the last user is removing it.  A user that was SIGKILLed never
gets to remove anything: the next process that sets up a store of the same
engine on the host removes every store of that engine with no live process
attached (:func:`reclaim`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any, Container, Iterator, Optional

from .store import DEFAULT_DIRECTORY, Store


@contextlib.contextmanager
def directory_lock(directory: Optional[str] = None) -> Iterator[None]:
    """Exclusive lock, across processes, on the store directory."""
    fd = os.open(directory or DEFAULT_DIRECTORY, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                # releases the lock


def others_attached(store: Store) -> bool:
    """Whether a live process other than this one is attached to ``store``."""
    store.gc()                      # forgets processes that died
    me = os.getpid()
    return any(c["pid"] != me for c in store.clients())


def stores_of(prefix: str, directory: Optional[str] = None) -> list[str]:
    """Names of the stores in ``directory`` whose name starts with ``prefix``."""
    directory = directory or DEFAULT_DIRECTORY
    head, tail = f"dedupshm.{prefix}", ".index"
    try:
        listing = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(f[len("dedupshm."):-len(tail)] for f in listing
                  if f.startswith(head) and f.endswith(tail))


def reclaim(prefix: str, directory: Optional[str] = None,
            skip: Container[str] = ()) -> list[str]:
    """Remove the stores named ``prefix...`` that no live process is attached
    to (left by users that were killed).  Call with :func:`directory_lock`
    held.  Returns the names removed."""
    removed: list[str] = []
    for name in stores_of(prefix, directory):
        if name in skip:
            continue
        try:
            s = Store(name, directory=directory)
        except Exception:  # noqa: BLE001 - not ours, half created, or gone meanwhile
            continue
        try:
            if not others_attached(s):
                s.unlink()
                removed.append(name)
        finally:
            s.close()
    return removed


def open_shared(name: str, prefix: str, directory: Optional[str] = None,
                **create_kw: Any) -> Store:
    """Create or attach the store ``name`` (reclaiming what crashed users of
    ``prefix`` left behind first)."""
    with directory_lock(directory):
        reclaim(prefix, directory, skip=(name,))
        return Store(name, create=True, directory=directory, **create_kw)


def leave(store: Store) -> bool:
    """This process is done with ``store``: remove its files if no other live
    process is attached, and close it.  Returns whether the files were removed."""
    removed = False
    with directory_lock(store.directory):
        try:
            if not store.closed and not others_attached(store):
                store.unlink()
                removed = True
        finally:
            store.close()
    return removed
