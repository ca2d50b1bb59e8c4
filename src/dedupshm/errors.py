"""The exceptions dedupshm raises.

Every library condition is a :class:`DedupShmError`; classes also inherit
the built-in a caller would naturally catch (``MemoryError`` for a full
store).  Argument errors are plain ``ValueError``/``TypeError``, a missing
object is ``KeyError``, and failed system calls are ``OSError`` subclasses
(``FileNotFoundError``, ``PermissionError``).
"""


class DedupShmError(Exception):
    """Base class of dedupshm's own errors."""


class StoreFullError(DedupShmError, MemoryError):
    """The store's capacity, or the memory behind its directory, is used up.

    The operation that raised it changed nothing."""


class CorruptStoreError(DedupShmError):
    """The store's files fail a consistency check (or are not a store)."""


class IncompatibleStoreError(CorruptStoreError):
    """The store was made by an incompatible version of dedupshm."""


class StoreClosedError(DedupShmError, ValueError):
    """The store was closed in this process."""


class StoreLimitError(DedupShmError):
    """A fixed-size table of the store (attached clients) is full."""
