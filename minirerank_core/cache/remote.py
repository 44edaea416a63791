"""FsspecStore: the page cache on any fsspec filesystem (S3, GCS, Azure, a shared or local disk, memory).

Entries are the very files DiskStore writes (same bytes, same ``<digest[:2]>/<digest>.safetensors`` layout, same
checksum over data and metadata), and they are **write-once**: the name is the digest of (page content, model,
every KV-changing setting), so any two entries under one name are computed under identical settings and either is
right. Many writers (indexing workers, serving replicas) may share one root without coordination:

* a put of a name that exists is a no-op (one existence check, no read-modify-write, no lock, no manifest);
* two writers racing on one new name each write a complete object: the later one replaces the earlier, which was
  computed under the same settings (the rare race costs bandwidth, never correctness);
* no reader ever sees half an object: object stores (S3, GCS, Azure, memory) make a single-object PUT visible
  whole; on other filesystems (local, NFS, SFTP...) the bytes go to a temporary name in the shard and are moved
  into place.

Readers verify every object (checksum, format, key) and treat anything doubtful as a miss: it is logged, removed,
and recomputed by the caller. A remote that fails (network, permissions) is a logged miss on read and an OSError
on write (TieredStore turns that into one warning and keeps serving from its other tiers). The backend packages
(``s3fs``, ``gcsfs``, ``adlfs``...) are the user's: install the one for your URL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

from minirerank_core.cache.store import (
    CacheEntry,
    CacheKey,
    decode_entry,
    encode_entry,
    entry_name,
    is_entry_name,
    is_temp_entry_name,
)
from minirerank_core.errors import CacheCorruptError, ConfigError
from minirerank_core.fileio import TMP_SUFFIX

logger = logging.getLogger("minirerank.cache")

# Protocols whose single-object write is atomic (the object appears whole or not at all): written in place.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})


def is_url(location: object) -> bool:
    """Whether a cache location names an fsspec filesystem (``s3://bucket/prefix``, ``memory://x``, ``file:///p``)."""
    return isinstance(location, str) and "://" in location


class FsspecStore:
    """Write-once page-cache entries under ``url`` on an fsspec filesystem (see the module docstring).

    ``url``: e.g. ``"s3://bucket/prefix"``; ``storage_options`` go to the backend (credentials, endpoint...). Or
    give a ready ``fs`` (an ``fsspec.AbstractFileSystem``) and ``root`` (a path on it).
    """

    def __init__(self, url: str | None = None, *, fs: Any = None, root: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        if (url is None) == (fs is None):
            raise ConfigError("FsspecStore takes a url, or fs and root (not both)")
        if url is not None:
            import fsspec.core  # imported only when a remote cache is used

            fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        if root is None or not isinstance(root, str):
            raise ConfigError(f"FsspecStore needs a root path on the filesystem, got {root!r}")
        self.fs = fs
        self.root = root.rstrip("/")
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.atomic_put = any(p in ATOMIC_PUT_PROTOCOLS for p in protocols)
        self.url = url or f"{protocols[0]}://{self.root}"
        self._lock = threading.Lock()  # guards stats only
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, "corrupt": 0, "writes": 0, "skipped": 0, "errors": 0}

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"

    def path_for(self, key: CacheKey) -> str:
        return f"{self.root}/{entry_name(key)}"

    # --- reads ---------------------------------------------------------------------------------------------
    def get(self, key: CacheKey) -> CacheEntry | None:
        path = self.path_for(key)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            self._count("misses")
            return None
        except Exception as exc:  # a backend's network / permission errors have backend-specific types
            logger.warning("minirerank: cannot read the page cache object %s (%s: %s); recomputing", path,
                           type(exc).__name__, exc)
            self._count("errors", "misses")
            return None
        try:
            entry = decode_entry(data, key, f"{self.url}:{path}")
        except CacheCorruptError as exc:
            logger.warning("discarding cache object: %s", exc)
            # Removed so the next put rewrites it (puts of an existing name are no-ops). Only a racing writer of a
            # fresh copy can lose its object here, which costs one recompute, never a wrong score.
            with contextlib.suppress(Exception):
                self.fs.rm_file(path)
            self._count("corrupt", "misses")
            return None
        self._count("hits")
        return entry

    def __contains__(self, key: object) -> bool:
        """Whether an object exists under the key's name (one metadata request; get() still verifies it)."""
        if not isinstance(key, CacheKey):
            return False
        try:
            path = self.path_for(key)
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))
        except Exception:
            return False

    # --- writes --------------------------------------------------------------------------------------------
    def put(self, key: CacheKey, entry: CacheEntry) -> None:
        """Store ``entry`` unless an object already exists under its name. Raises OSError when the filesystem
        refuses the write; nothing partial is left under the entry's name either way."""
        data = encode_entry(key, entry)  # before any I/O: a bad entry (TypeError) touches nothing
        final = self.path_for(key)
        try:
            self.fs.invalidate_cache(final)  # a listing cached by the backend must not hide another writer's object
            if self.fs.exists(final):
                self._count("skipped")
                return
            if self.atomic_put:
                self.fs.pipe_file(final, data)
            else:
                self._put_via_temp(final, data)
        except OSError:
            raise
        except Exception as exc:  # backends raise their own types for network or permission failures
            raise OSError(f"cannot write the page cache object {final} ({type(exc).__name__}: {exc})") from exc
        self._count("writes")

    def _put_via_temp(self, final: str, data: bytes) -> None:
        shard, name = final.rsplit("/", 1)
        self.fs.makedirs(shard, exist_ok=True)
        tmp = f"{shard}/.{name[: -len('.safetensors')]}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)  # a rename on local and POSIX-like filesystems: readers see old or new
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise

    def delete(self, key: CacheKey) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path_for(key))

    def clear(self) -> None:
        """Remove every entry and temporary file this layout owns under root (other objects are left alone)."""
        for path in self._owned(temp=True):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def sweep(self, max_age_s: float = 3600.0) -> int:
        """Delete temporary files of killed writers older than ``max_age_s`` (never a live writer's); how many."""
        cutoff = time.time() - max_age_s
        removed = 0
        for path in self._owned(temp=True, entries=False):
            try:
                if self.fs.modified(path).timestamp() <= cutoff:
                    self.fs.rm_file(path)
                    removed += 1
            except (FileNotFoundError, NotImplementedError):
                pass
        return removed

    def __len__(self) -> int:
        return len(self._owned())

    def _owned(self, *, temp: bool = False, entries: bool = True) -> list[str]:
        try:
            self.fs.invalidate_cache(self.root)
            paths = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        out = []
        for p in paths:
            parts = p.rstrip("/").rsplit("/", 2)
            if len(parts) < 2:
                continue
            shard, name = parts[-2], parts[-1]
            if (entries and is_entry_name(shard, name)) or (temp and len(shard) == 2 and is_temp_entry_name(name)):
                out.append(p)
        return out

    def _count(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self.stats[name] += 1


def open_store(location: Any = None, *, memory_bytes: int = 2 * 1024**3, local_dir: str | os.PathLike[str] | None = None,
               storage_options: Mapping[str, Any] | None = None) -> Any:
    """The page-cache tiers for ``location`` (what a reranker's ``cache_dir`` accepts):

    * None: memory only (plus a disk tier at ``local_dir`` if given);
    * a directory path: memory in front of a DiskStore there (as before);
    * an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``az://...``, ``file:///shared/dir``, ``memory://x``):
      memory, then a DiskStore at ``local_dir`` if given, in front of a write-once FsspecStore there;
    * a store object: a TieredStore is used as it is; a DiskStore gets memory in front; any other CacheStore
      (an FsspecStore, your own) becomes the shared tier behind memory (and ``local_dir``).

    A URL whose fsspec backend is not installed raises ConfigError naming it.
    """
    from minirerank_core.cache.store import DiskStore, MemoryStore, TieredStore

    if isinstance(location, TieredStore):
        return location
    memory = MemoryStore(max_bytes=memory_bytes)
    if isinstance(location, DiskStore):
        return TieredStore(memory, location)
    if location is None or isinstance(location, (str, os.PathLike)) and not is_url(location):
        if location is not None and local_dir is not None:
            raise ConfigError("local_dir is the disk tier in front of a remote cache; a local cache_dir already is one")
        return TieredStore.with_disk(memory, location if location is not None else local_dir)
    if is_url(location):
        try:
            remote = FsspecStore(location, storage_options=storage_options)
        except (ImportError, ValueError) as exc:  # fsspec: "Protocol not known" / the backend package is missing
            raise ConfigError(f"cannot open the page cache {location!r}: {exc} (install the fsspec backend for its "
                              "protocol: s3fs for s3://, gcsfs for gs://, adlfs for az://)") from exc
    elif all(callable(getattr(location, m, None)) for m in ("get", "put", "delete", "clear", "__contains__", "__len__")):
        remote = location
    else:
        raise ConfigError(f"cache_dir must be a directory, an fsspec URL or a cache store, got {type(location).__name__}")
    return TieredStore.with_disk(memory, local_dir, remote=remote)


__all__ = ["ATOMIC_PUT_PROTOCOLS", "FsspecStore", "is_url", "open_store"]
