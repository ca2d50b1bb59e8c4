"""dedupshm: a deduplicating shared-memory object store for Python processes.

    >>> import dedupshm, numpy as np
    >>> with dedupshm.Store("demo", create=True) as store:
    ...     ref = store.put(np.arange(10))
    ...     store.get(ref)                  # zero-copy, read-only

Identical 4 KiB pages are stored once across every value and process of a
store.  See README.md and docs/ARCHITECTURE.md.
"""
from .errors import (CorruptStoreError, DedupShmError, IncompatibleStoreError,
                     StoreClosedError, StoreFullError, StoreLimitError)
from .store import ObjectRef, Store, parse_size

__all__ = [
    "Store", "ObjectRef", "parse_size",
    "DedupShmError", "StoreFullError", "CorruptStoreError", "IncompatibleStoreError",
    "StoreClosedError", "StoreLimitError",
]
__version__ = "0.1.0"
