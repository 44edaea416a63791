"""Per-page KV cache stores: in-memory LRU, on-disk safetensors files, and a tier of both.

A cache entry is only ever returned for the exact key it was written for. Anything doubtful
(truncated, corrupt, written for another key or format) is logged, removed and reported as a miss,
so the caller recomputes. No pickle anywhere: tensors go through safetensors, metadata through JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from safetensors.torch import load as load_safetensors, save as save_safetensors
import torch

from minirerank_core.errors import CacheCorruptError, CacheDiskWarning, ConfigError
from minirerank_core.fileio import TMP_SUFFIX, canonical_json, format_tag, write_bytes

logger = logging.getLogger("minirerank.cache")

FORMAT = format_tag("kv", 2)  # 2: the checksum covers the header metadata too
_SUFFIX = ".safetensors"
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_ENTRY_OVERHEAD = 128  # bookkeeping bytes charged per entry, so empty entries still count against the bound
_MAX_HEADER = 100 * 1024 * 1024  # a larger safetensors header can only be corruption


@dataclass(frozen=True, eq=False)
class CacheKey:
    """Identity of one page's KV cache: page content x model x KV-changing settings.

    ``settings`` is shallow-copied at construction; do not mutate nested values afterwards.
    """

    image_hash: str
    model_fingerprint: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.image_hash, str) or not self.image_hash:
            raise ConfigError(f"CacheKey.image_hash must be a non-empty str, got {self.image_hash!r}")
        if not isinstance(self.model_fingerprint, str) or not self.model_fingerprint:
            raise ConfigError(f"CacheKey.model_fingerprint must be a non-empty str, got {self.model_fingerprint!r}")
        if not isinstance(self.settings, Mapping):
            raise ConfigError(f"CacheKey.settings must be a mapping, got {type(self.settings).__name__}")
        if not all(isinstance(k, str) for k in self.settings):
            raise ConfigError("CacheKey.settings keys must be str (JSON would silently turn 1 into '1')")
        # A plain dict (not a mappingproxy) keeps keys picklable for worker processes.
        object.__setattr__(self, "settings", dict(self.settings))
        try:
            _ = self._canonical
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"CacheKey.settings must be JSON-serialisable with str keys and finite numbers: {exc}") from exc

    @property
    def _canonical(self) -> str:
        """Canonical JSON of the three fields: the on-disk "key" header and the digest input."""
        return canonical_json(
            {"image_hash": self.image_hash, "model_fingerprint": self.model_fingerprint, "settings": self.settings}
        )

    @property
    def digest(self) -> str:
        """sha256 hex of the canonical JSON of the three fields; names the entry on disk."""
        return hashlib.sha256(self._canonical.encode("ascii")).hexdigest()

    # Equality and hash follow the digest (the generated hash would fail on the settings dict).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheKey) and self._canonical == other._canonical

    def __hash__(self) -> int:
        return hash(self._canonical)


@dataclass
class CacheEntry:
    """Cached tensors for one page plus small JSON metadata. Treat as read-only once stored."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not name or name.startswith("__"):
                raise ValueError(f"CacheEntry tensor names must be non-empty str not starting with '__', got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"CacheEntry tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")

    @property
    def nbytes(self) -> int:
        return _ENTRY_OVERHEAD + sum(t.numel() * t.element_size() for t in self.tensors.values())


@runtime_checkable
class CacheStore(Protocol):
    def get(self, key: CacheKey) -> CacheEntry | None: ...
    def put(self, key: CacheKey, entry: CacheEntry) -> None: ...
    def __contains__(self, key: CacheKey) -> bool: ...
    def delete(self, key: CacheKey) -> None: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...


# --------------------------------------------------------------------------- memory


class MemoryStore:
    """Thread-safe LRU bounded by total entry bytes. Returned entries are shared, not copied."""

    def __init__(self, max_bytes: int = 2 * 1024**3) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"MemoryStore.max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[CacheEntry, int]] = OrderedDict()  # digest -> (entry, nbytes)
        self._nbytes = 0
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, "evictions": 0}

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def get(self, key: CacheKey) -> CacheEntry | None:
        with self._lock:
            item = self._entries.get(key.digest)
            if item is None:
                self.stats["misses"] += 1
                return None
            self._entries.move_to_end(key.digest)
            self.stats["hits"] += 1
            return item[0]

    def put(self, key: CacheKey, entry: CacheEntry) -> None:
        size = entry.nbytes  # computed once: the bound must not drift if the caller mutates the entry
        with self._lock:
            self._pop(key.digest)  # a replaced (or now oversize) value must not linger
            if size > self.max_bytes:
                return  # cannot fit even alone; storing it would evict everything for nothing
            self._entries[key.digest] = (entry, size)
            self._nbytes += size
            while self._nbytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._nbytes -= evicted
                self.stats["evictions"] += 1

    def __contains__(self, key: object) -> bool:  # no recency refresh, no stats
        with self._lock:
            return isinstance(key, CacheKey) and key.digest in self._entries

    def delete(self, key: CacheKey) -> None:
        with self._lock:
            self._pop(key.digest)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _pop(self, digest: str) -> None:
        old = self._entries.pop(digest, None)
        if old is not None:
            self._nbytes -= old[1]


# --------------------------------------------------------------------------- disk


def _checksum(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> str:
    """blake2b over the header metadata (format, key, meta) and the name, dtype, shape and raw bytes of each
    tensor in sorted-name order.

    The metadata is covered so an edited field (say ``next_position``) is caught, not scored; names, dtypes and
    shapes so a header bit flip that keeps byte sizes (F32 -> I32) is caught.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(canonical_json({k: header[k] for k in ("format", "key", "meta")}).encode("ascii"))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(canonical_json([name, str(t.dtype), list(t.shape)]).encode("ascii"))
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # byte view works for every dtype incl. bfloat16
    return h.hexdigest()


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with private storage (safetensors refuses tensors that share memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def _parse_entry(data: bytes, where: str) -> tuple[dict[str, Any], CacheEntry]:
    """Validate and decode a whole safetensors file held in memory; raise CacheCorruptError on any doubt."""
    if len(data) < 8:
        raise CacheCorruptError(f"{where}: truncated cache file ({len(data)} bytes, no safetensors header)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > _MAX_HEADER or 8 + header_len > len(data):
        raise CacheCorruptError(f"{where}: truncated cache file (header declares {header_len} bytes, file has {len(data)})")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        meta_strs = header.pop("__metadata__", None)
        if not isinstance(meta_strs, dict):
            raise ValueError("no __metadata__")
        data_len = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(f"{where}: unreadable cache header ({exc})") from exc
    if 8 + header_len + data_len != len(data):
        raise CacheCorruptError(
            f"{where}: truncated cache file (expected {8 + header_len + data_len} bytes, file has {len(data)})"
        )
    if meta_strs.get("format") != FORMAT:
        raise CacheCorruptError(f"{where}: cache format {meta_strs.get('format')!r}, expected {FORMAT!r}")
    try:
        fields = json.loads(meta_strs["key"])
        meta = json.loads(meta_strs["meta"])
        checksum = meta_strs["checksum"]
        if not isinstance(fields, dict) or not isinstance(meta, dict) or not isinstance(checksum, str):
            raise ValueError("key/meta/checksum have the wrong JSON types")
        tensors = load_safetensors(data)  # copies out of `data`: no mmap, no pickle
    except Exception as exc:  # safetensors raises its own error types; all mean "corrupt"
        raise CacheCorruptError(f"{where}: corrupt cache file ({type(exc).__name__}: {exc})") from exc
    if _checksum(tensors, meta_strs) != checksum:
        raise CacheCorruptError(f"{where}: checksum mismatch, the file was corrupted or edited")
    return fields, CacheEntry(tensors=tensors, meta=meta)


def encode_entry(key: CacheKey, entry: CacheEntry) -> bytes:
    """The bytes of one cache file: safetensors with the format tag, key, meta and checksum in its header. Every
    store (DiskStore, FsspecStore) writes exactly these bytes, so a file can move between them."""
    tensors = _prepare(entry.tensors)
    try:
        meta_json = canonical_json(entry.meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"CacheEntry.meta must be JSON-serialisable: {exc}") from exc
    metadata = {"format": FORMAT, "key": key._canonical, "meta": meta_json}
    metadata["checksum"] = _checksum(tensors, metadata)
    return save_safetensors(tensors, metadata=metadata)


def decode_entry(data: bytes, key: CacheKey, where: str) -> CacheEntry:
    """The entry in ``data`` if it is a valid cache file written for ``key``; else CacheCorruptError."""
    fields, entry = _parse_entry(data, where)
    if fields != json.loads(key._canonical):
        raise CacheCorruptError(f"{where}: stale cache file written for another key {fields!r}")
    return entry


def entry_name(key: CacheKey) -> str:
    """Where an entry lives below a store's root: ``<digest[:2]>/<digest>.safetensors`` (content addressed)."""
    digest = key.digest
    return f"{digest[:2]}/{digest}{_SUFFIX}"


def is_entry_name(shard: str, name: str) -> bool:
    """Whether ``shard/name`` is an entry file this layout owns."""
    stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else ""
    return bool(_DIGEST_RE.fullmatch(stem)) and stem[:2] == shard


def is_temp_entry_name(name: str) -> bool:
    """Whether ``name`` is the temporary file of an entry's writer (``.<digest>.<...>.tmp``)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX) and bool(_DIGEST_RE.fullmatch(name[1:65]))


def read_entry(path: str | Path) -> tuple[dict[str, Any], CacheEntry]:
    """Read one cache file fully into memory and validate it.

    Returns (key fields dict usable as ``CacheKey(**fields)``, entry). Raises CacheCorruptError for a
    truncated/corrupt/foreign file; FileNotFoundError propagates (a missing file is not corruption).
    """
    with open(path, "rb") as f:
        data = f.read()
    return _parse_entry(data, str(path))


class DiskStore:
    """One safetensors file per entry under ``root/<digest[:2]>/<digest>.safetensors``.

    Writes are atomic (temp file + fsync + os.replace), so readers see a complete old or new file.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards stats only; the filesystem gives the atomicity
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, "corrupt": 0, "writes": 0}

    def path_for(self, key: CacheKey) -> Path:
        digest = key.digest
        return self.root / digest[:2] / f"{digest}{_SUFFIX}"

    def get(self, key: CacheKey) -> CacheEntry | None:
        path = self.path_for(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            self._count("misses")
            return None
        except OSError as exc:
            return self._reject(path, None, f"unreadable cache file ({exc})")
        try:
            entry = decode_entry(data, key, str(path))
        except CacheCorruptError as exc:
            return self._reject(path, st, str(exc))
        self._count("hits")
        return entry

    def put(self, key: CacheKey, entry: CacheEntry) -> None:
        data = encode_entry(key, entry)
        final = self.path_for(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(final, data)  # atomic: temp file in the shard, fsync, rename; no debris on failure
        self._count("writes")

    def __contains__(self, key: object) -> bool:
        """Cheap check: file exists with a plausible header for this key. get() still verifies the checksum."""
        if not isinstance(key, CacheKey):
            return False
        try:
            with open(self.path_for(key), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > _MAX_HEADER or 8 + header_len > size:
                    return False
                header = json.loads(f.read(header_len).decode("utf-8"))
            meta = header["__metadata__"]
            return meta["format"] == FORMAT and json.loads(meta["key"]) == json.loads(key._canonical)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def delete(self, key: CacheKey) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every entry and temp file this store owns; other files under root are left alone."""
        # Shard directories stay: removing one could race a concurrent put() that just created it.
        for path in self._owned_files():
            path.unlink(missing_ok=True)

    def sweep(self, max_age_s: float = 3600.0) -> int:
        """Delete temp files left by killed writers that are older than ``max_age_s``; return how many.

        Keep ``max_age_s`` above the longest write: a younger temp file may belong to a live writer.
        """
        cutoff = time.time() - max_age_s
        removed = 0
        for path in self._owned_files():
            if not path.name.endswith(TMP_SUFFIX):
                continue
            try:
                if path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # its writer finished (renamed) or another sweeper got it
        return removed

    def __len__(self) -> int:
        return sum(1 for p in self._owned_files() if p.name.endswith(_SUFFIX))

    def _owned_files(self) -> list[Path]:
        """Final files (<digest>.safetensors in their shard) and temp files (.<digest>.*.tmp)."""
        out: list[Path] = []
        for shard in self.root.iterdir():
            if not _is_shard(shard):
                continue
            try:
                names = list(shard.iterdir())
            except FileNotFoundError:
                continue  # removed by someone else meanwhile
            for p in names:
                if is_entry_name(shard.name, p.name) or is_temp_entry_name(p.name):
                    out.append(p)
        return out

    def _reject(self, path: Path, seen: os.stat_result | None, reason: str) -> None:
        """Log, delete the bad file (unless a writer already replaced it), count a miss."""
        logger.warning("discarding cache file: %s", reason)
        try:
            now = os.stat(path)
            # Only delete the very file we judged; a fresh atomic replace since then is left alone.
            if seen is None or (now.st_ino, now.st_dev, now.st_mtime_ns) == (seen.st_ino, seen.st_dev, seen.st_mtime_ns):
                path.unlink()
        except OSError:
            pass
        with self._lock:
            self.stats["corrupt"] += 1
            self.stats["misses"] += 1
        return None

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1


def _is_shard(path: Path) -> bool:
    return len(path.name) == 2 and all(c in "0123456789abcdef" for c in path.name) and path.is_dir()



# --------------------------------------------------------------------------- tiered


def _warn_disk(message: str) -> None:
    import warnings

    logger.warning("minirerank: %s", message)
    warnings.warn(f"minirerank: {message}", CacheDiskWarning, stacklevel=4)


class CacheRemoteWarning(CacheDiskWarning):
    """The shared (fsspec) page cache cannot be written; pages stay in the local tiers."""


class TieredStore:
    """Memory in front of (optional) disk in front of an (optional) shared remote store (FsspecStore).

    get() asks memory, then disk, then remote, and copies a hit into the tiers in front of it; put() writes the
    remote first (so other machines see the page), then disk and memory. The disk and the remote are accelerators,
    never requirements: when one cannot be written (full, read-only, offline) the entry is kept in the other tiers,
    one warning (CacheDiskWarning, or its subclass CacheRemoteWarning) says so, and later puts stop trying that tier
    (reads still use it).
    """

    def __init__(self, memory: MemoryStore, disk: DiskStore | None = None, remote: CacheStore | None = None) -> None:
        self.memory = memory
        self.disk = disk
        self.remote = remote
        self.disk_writable = disk is not None
        self.remote_writable = remote is not None

    @classmethod
    def with_disk(cls, memory: MemoryStore, root: str | Path | None, *, remote: CacheStore | None = None) -> TieredStore:
        """A tier over ``root`` (None: memory only); a root that cannot be created falls back to memory."""
        if root is None:
            return cls(memory, remote=remote)
        try:
            return cls(memory, DiskStore(root), remote)
        except OSError as exc:
            _warn_disk(f"the page cache directory {root} cannot be used ({exc}); caching in memory only")
            return cls(memory, remote=remote)

    def get(self, key: CacheKey) -> CacheEntry | None:
        entry = self.memory.get(key)
        if entry is None and self.disk is not None:
            entry = self.disk.get(key)
            if entry is not None:
                self.memory.put(key, entry)
        if entry is None and self.remote is not None:
            entry = self.remote.get(key)
            if entry is not None:
                self._put_disk(key, entry)
                self.memory.put(key, entry)
        return entry

    def put(self, key: CacheKey, entry: CacheEntry) -> None:
        if self.remote is not None and self.remote_writable:
            try:
                self.remote.put(key, entry)
            except OSError as exc:
                self.remote_writable = False
                logger.warning("minirerank: cannot write the shared page cache %s (%s)", self.remote, exc)
                import warnings

                warnings.warn(f"minirerank: cannot write the shared page cache {self.remote} ({exc}); keeping pages in "
                              "the local tiers from now on", CacheRemoteWarning, stacklevel=3)
        self._put_disk(key, entry)
        self.memory.put(key, entry)

    def _put_disk(self, key: CacheKey, entry: CacheEntry) -> None:
        if self.disk is not None and self.disk_writable:
            try:
                self.disk.put(key, entry)
            except OSError as exc:
                self.disk_writable = False
                _warn_disk(f"cannot write the page cache under {self.disk.root} ({exc}); keeping pages in memory "
                           "from now on")

    def __contains__(self, key: object) -> bool:
        return (key in self.memory or (self.disk is not None and key in self.disk)
                or (self.remote is not None and key in self.remote))

    def delete(self, key: CacheKey) -> None:
        self.memory.delete(key)
        if self.disk is not None:
            self.disk.delete(key)
        if self.remote is not None:
            self.remote.delete(key)

    def clear(self) -> None:
        self.memory.clear()
        if self.disk is not None:
            self.disk.clear()
        if self.remote is not None:
            self.remote.clear()

    def __len__(self) -> int:
        """Entries in the remote (a superset of the local tiers after put), else on disk, else in memory."""
        if self.remote is not None:
            return len(self.remote)
        return len(self.disk) if self.disk is not None else len(self.memory)
