"""Crash-safe file primitives for the on-disk index: durable writes, atomic switches, a writer lock.

The pattern everywhere: write new files somewhere nobody reads yet, fsync them, then make them visible with
one atomic rename (os.replace / os.rename), then fsync the directory so the rename itself survives a crash.
A process killed at any point leaves either the old state or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; elsewhere writers are not serialised across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def fsync_dir(path: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON and fsync it (the caller makes it visible atomically)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(canonical_json(obj))
        f.flush()
        os.fsync(f.fileno())


def replace_json(path: Path, obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as JSON: readers see the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_json(tmp, obj)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock of the index directory for one writer (blocks while another process writes)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
