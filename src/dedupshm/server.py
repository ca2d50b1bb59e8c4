"""Pre-fork servers: workers that hold the same large data, once.

Every worker of a gunicorn/uWSGI-style server usually loads the same model
weights or lookup tables, so N workers hold N copies.  Two ways to hold one:

* :func:`shared_load` -- the data goes into the store once, under a key:
  the first worker to get there runs the loader and puts the value; the
  others wait for it and map it zero-copy (read-only).  Works with and
  without ``--preload``, across restarts of workers and across servers
  that share the store.
* :func:`load_mergeable` -- each worker loads its own private, writable
  copy into mergeable memory, and the store's merger (a background thread
  per process) folds the identical pages of all workers together,
  copy-on-write.  For data a worker must be able to write, or code that
  wants its own copy.

Recipes for gunicorn are in docs/INTEGRATIONS.md.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from .errors import DedupShmError

if TYPE_CHECKING:
    import numpy as np

    from .store import Key, Store

__all__ = ["shared_load", "load_mergeable", "mergeable_copy"]


def _marker_key(key: Key) -> Key:
    if isinstance(key, str):
        return "\0dedupshm.loading\0" + key
    return b"\0dedupshm.loading\0" + bytes(key)


_MISSING = object()


def _read(store: Store, key: Key) -> Any:
    try:
        return store.get(key)
    except KeyError:
        return _MISSING


def _owner(store: Store, marker: Key) -> Optional[bytes]:
    v = _read(store, marker)
    return None if v is _MISSING else bytes(v)


def shared_load(store: Store, key: Key, loader: Callable[[], Any], *, timeout: float = 600.0,
                poll: float = 0.02) -> Any:
    """The value stored under ``key``; if there is none, ``loader()``'s
    value, stored under ``key`` for everyone.

    Meant for processes that all need the same large, read-only value
    (workers of a pre-fork server): one of them loads it, the others wait
    (polling, at most ``timeout`` seconds) and map it zero-copy.  Lock-free:
    a loader announces itself with a small marker value naming its client
    slot; a waiter whose loader died (or raised) loads in its place.  When
    two processes race, both may load: the last put wins the key, and since
    equal pages are stored once, memory holds a single copy anyway -- so
    ``loader`` must be deterministic.  Returns what ``store.get(key)``
    returns: numpy arrays read-only over shared memory, bytes as read-only
    memoryviews, other picklable values rebuilt (their large buffers
    zero-copy).  Raises TimeoutError, or what ``loader`` raised."""
    v = _read(store, key)
    if v is not _MISSING:
        return v
    marker = _marker_key(key)
    core = store._c()
    me = core.identity()        # alive while this process is attached: no pid, no /proc
    deadline = time.monotonic() + timeout
    while True:
        v = _read(store, key)
        if v is not _MISSING:
            return v
        owner = _owner(store, marker)
        if owner is None or (owner != me and not core.identity_alive(owner)):
            store.put(me, key=marker)           # announce: I load
            if _owner(store, marker) == me:
                break                           # nobody announced after us
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key!r}: the process loading it did not finish "
                               f"within {timeout} s")
        time.sleep(poll)
    try:
        value = loader()
        if key not in store:                    # check-then-put: if two raced, the last put wins
            store.put(value, key=key)
        del value
    finally:
        try:
            if _owner(store, marker) == me:
                store.delete(marker)
        except (KeyError, DedupShmError):
            pass
    return store.get(key)


def mergeable_copy(store: Store, array: Any) -> np.ndarray[Any, Any]:
    """A private, writable copy of a numpy array in mergeable memory (see
    ``Store.mergeable``): the merger folds its pages with identical pages
    of other processes and of the store."""
    import numpy as np
    array = np.asarray(array)
    out = store.mergeable_array(array.shape, array.dtype)
    out[...] = array
    return out


def load_mergeable(store: Store, loader: Callable[[], Any], *, start_merger: bool = True) -> Any:
    """``loader()``'s numpy array (or dict/list/tuple of arrays), copied
    into mergeable memory, and the store's merger started in this process.
    Each worker holds a writable copy of its own; the merger makes the
    identical pages of all workers one physical page, copy-on-write,
    within a few scan periods (``store.merger.start`` tunes the pace)."""
    value = loader()
    out = _to_mergeable(store, value)
    del value
    if start_merger and not store.merger.running:
        store.merger.start()
    return out


def _to_mergeable(store: Store, v: Any) -> Any:
    import numpy as np
    if isinstance(v, np.ndarray):
        return mergeable_copy(store, v)
    if isinstance(v, dict):
        return {k: _to_mergeable(store, x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_to_mergeable(store, x) for x in v)
    raise TypeError(f"load_mergeable needs numpy arrays (or dicts/lists of them), "
                    f"not {type(v).__name__}")
