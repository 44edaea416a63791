"""Per-page KV cache: keys, entries and the memory / disk / remote (fsspec) / tiered stores."""

from __future__ import annotations

from minirerank_core.cache.remote import FsspecStore, open_store
from minirerank_core.cache.store import (
    CacheDiskWarning,
    CacheEntry,
    CacheKey,
    CacheRemoteWarning,
    CacheStore,
    DiskStore,
    MemoryStore,
    TieredStore,
    read_entry,
)

__all__ = ["CacheDiskWarning", "CacheEntry", "CacheKey", "CacheRemoteWarning", "CacheStore", "DiskStore", "FsspecStore",
           "MemoryStore", "TieredStore", "open_store", "read_entry"]
