"""Crash-safe files, in one place: atomic writes, canonical JSON, format tags, the writer lock.

Every file minirerank writes (page-cache entries, index manifests and segments, settings, the CLI workspace,
training checkpoints, reports of record) goes through here, so each has the same guarantees:

* **Atomic.** Bytes go to a uniquely named temporary file in the target's directory, are fsynced, then made
  visible with one ``os.replace``; the directory is fsynced so the rename survives a crash. A reader sees the
  old file or the new one, never half of one. A failed write removes its temporary file: no debris.
* **One JSON spelling.** :func:`canonical_json` sorts keys and refuses NaN, so a document hashes the same in
  every process and Python version (cache keys depend on it).
* **One style of format tag**: ``"format": "minirerank-<name>/<version>"`` (:func:`format_tag`), checked by
  :func:`read_json`, which names the file in every error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, DiskFullError, MiniRerankError

try:  # POSIX advisory locks; elsewhere writers are not serialised across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TMP_SUFFIX = ".tmp"


def format_tag(name: str, version: int) -> str:
    """The ``format`` value of a minirerank file: ``minirerank-<name>/<version>``."""
    return f"minirerank-{name}/{version}"


def canonical_json(obj: Any, *, indent: int | None = None) -> str:
    """Sorted keys, ASCII, no NaN/inf; compact unless ``indent`` is given (for files people read)."""
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(obj, sort_keys=True, indent=indent, separators=separators, ensure_ascii=True, allow_nan=False)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be fsynced)."""
    if os.name != "posix":  # pragma: no cover
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_path(target: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``target`` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of :func:`temp_path`'s (left behind only by a killed writer)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def storage_error(exc: OSError, what: str) -> MiniRerankError | OSError:
    """A plain error for a failed write: "no space left" said as such (DiskFullError), the rest unchanged."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on the device while writing {what}; free some space and retry "
                             f"(nothing was changed: the previous state is intact)")
    return exc


def write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> Path:
    """Atomically replace ``path`` with ``data``. On any failure the old file (if any) stays and the temporary
    file is removed; a full disk raises :class:`DiskFullError`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())  # data durable before the name points at it
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        err = storage_error(exc, str(path))
        if err is exc:
            raise
        raise err from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str | os.PathLike[str], obj: Any, *, format: str | None = None, durable: bool = True) -> Path:
    """Atomically write ``obj`` as canonical, indented JSON; ``format`` (a :func:`format_tag`) goes first in
    the document as ``"format"``."""
    if format is not None:
        obj = {"format": format, **{k: v for k, v in obj.items() if k != "format"}}
    return write_text(path, canonical_json(obj, indent=1) + "\n", durable=durable)


def read_json(path: str | os.PathLike[str], *, format: str | tuple[str, ...] | None = None,
              error: type[Exception] = ConfigError) -> Any:
    """Read a JSON document; with ``format`` it must be an object whose ``"format"`` is that tag (or one of
    them). Every failure raises ``error`` naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from exc
    if format is not None:
        tags = (format,) if isinstance(format, str) else tuple(format)
        if not isinstance(doc, dict) or doc.get("format") not in tags:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise error(f"{path} is not a {tags[0]} file (format {found!r})")
    return doc


def replace_dir(new: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Swap a fully written directory ``new`` into place at ``final`` (the old one is removed afterwards).

    A crash between the two renames leaves ``final`` missing and ``<final>.old`` holding the previous state,
    which :func:`recover_dir` puts back."""
    new, final = Path(new), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: str | os.PathLike[str]) -> None:
    """Undo a :func:`replace_dir` interrupted between its renames."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.exists():
        os.replace(old, final)


def file_digest(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def writer_lock(directory: str | os.PathLike[str], *, timeout: float | None = None) -> Iterator[None]:
    """Exclusive lock of ``directory`` for one writer process. Blocks while another holds it, or, with
    ``timeout`` (seconds), raises :class:`LockTimeoutError` once that much time has passed."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    import time

    from .errors import LockTimeoutError

    fd = os.open(Path(directory) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeoutError(
                            f"{directory} is being written by another process (waited {timeout:g} s); "
                            "one writer at a time: retry when it has finished"
                        ) from None
                    time.sleep(0.1)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
