"""Per-page KV cache: keys, entries and the memory / disk / tiered stores."""

from __future__ import annotations

from minirerank_core.cache.store import (
    CacheEntry,
    CacheKey,
    CacheStore,
    DiskStore,
    MemoryStore,
    TieredStore,
    read_entry,
)

__all__ = ["CacheEntry", "CacheKey", "CacheStore", "DiskStore", "MemoryStore", "TieredStore", "read_entry"]
