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
from .store import CheckReport, ObjectRef, Store, parse_size
from .sequence import SharedSequence, put_sequence
from . import merger  # noqa: F401  (dedupshm.merger.wp_mode() etc.)

__all__ = [
    "Store", "ObjectRef", "CheckReport", "SharedSequence", "put_sequence", "parse_size",
    "DedupShmError", "StoreFullError", "CorruptStoreError", "IncompatibleStoreError",
    "StoreClosedError", "StoreLimitError",
]
__version__ = "0.1.0"
