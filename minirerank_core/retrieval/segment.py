"""Segment: an immutable block of pages -- their vectors, patch layout, ids, metadata and FAISS index.

An index is a list of segments (like an LSM tree): `add` writes a new segment, `delete` only records
tombstones, `compact` rewrites live pages into one segment. Segment files never change once written, so a
reader can memory-map them while a writer works next to it.

On disk, one directory per segment:
    vectors.npy        (N, D) float32 or float16 (AnnConfig.vector_dtype), every vector of every page, page after page
    page_offsets.npy   (n+1,) int64, page i owns vectors[page_offsets[i]:page_offsets[i+1]]
    patch_rows.npy     (P,) int32, row (within its page) of each image patch, row-major over the page grid
    patch_offsets.npy  (n+1,) int64, page i's patches are patch_rows[patch_offsets[i]:patch_offsets[i+1]]
    grids.npy          (n, 2) int32, (h, w) patch grid per page
    pages.json         ids, content hashes, metadata
    ann.faiss          the FAISS index over vectors.npy rows (absent for exact "flat" segments)
    segment.json       written last: kind, counts, size and sha256 of every file above

Building a segment larger than RAM (an index bound to a directory, 100k+ pages of ~1,000 vectors): past
``memory_bytes`` of vectors, :class:`SegmentBuilder` writes them straight into the new segment's ``vectors.npy``
inside its staging directory ``.tmp-<name>`` (flock-ed ``.building`` file: a sweep by another process leaves a
live build alone), and FAISS is trained and filled from that memory map. Merges stream the same way.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ..errors import DiskFullError, IndexStateError
from ..fileio import file_digest, fsync_dir, fsync_file, write_json
from . import ann
from .embedding import PageEmbedding
from .maxsim import gather_pages, maxsim_scores

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

SEGMENT_FORMAT = "minirerank-segment/1"
_ARRAYS = ("vectors", "page_offsets", "patch_rows", "patch_offsets", "grids")
_MMAPPED = ("vectors", "patch_rows")  # the per-vector arrays; offsets and grids are per page (small)
BUILDING = ".building"  # lock file of a staging directory whose build is in progress
_MERGE_BLOCK_ROWS = 1 << 18  # vectors copied per step of a streamed merge (128 MB at D=128 float32)


def _disk_full(exc: Exception, where: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, numpy's short-write message, or a FAISS write error
    with (almost) no space left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "requested and" in text and "written" in text:
        return True
    try:
        return isinstance(exc, (OSError, RuntimeError)) and shutil.disk_usage(where).free < (1 << 20)
    except OSError:
        return False


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    return out


@dataclass(eq=False)
class Segment:
    name: str
    kind: str  # resolved index kind: "flat", "hnsw", "ivf" or "ivfpq"
    vectors: np.ndarray
    page_offsets: np.ndarray
    patch_rows: np.ndarray
    patch_offsets: np.ndarray
    grids: np.ndarray
    ids: list[str]
    hashes: list[str | None]
    metadata: list[dict[str, Any]]
    index: faiss.Index | None = None
    # Set when the vectors were spilled into the staging directory this segment's write() completes.
    staged: Path | None = field(default=None, repr=False)
    _stage_lock: int | None = field(default=None, repr=False)

    @property
    def n_pages(self) -> int:
        return len(self.ids)

    @property
    def n_vectors(self) -> int:
        return int(self.page_offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    # --- building -------------------------------------------------------------------------------------
    @classmethod
    def from_embeddings(
        cls, name: str, pages: Iterable[PageEmbedding], metadata: Iterable[dict[str, Any]], config: ann.AnnConfig,
        *, stage_in: Path | None = None, memory_bytes: int | None = None,
    ) -> Segment:
        """A segment of ``pages`` (consumed once, so a generator keeps only one page in memory at a time when the
        vectors spill: see :class:`SegmentBuilder`)."""
        builder = SegmentBuilder(name, config, stage_in=stage_in, memory_bytes=memory_bytes)
        try:
            for p, meta in zip(pages, metadata):
                builder.add(
                    p.vectors.numpy(), p.patch_rows.numpy(), p.grid, p.page_id, p.content_hash, meta
                )
            return builder.finish()
        except BaseException:
            builder.abort()
            raise

    @classmethod
    def merge(
        cls, name: str, parts: Sequence[tuple[Segment, np.ndarray]], config: ann.AnnConfig,
        *, stage_in: Path | None = None, memory_bytes: int | None = None,
    ) -> Segment:
        """One segment holding pages ``keep`` (sorted local numbers) of each (segment, keep) part, in order. Vectors
        are copied a block of pages at a time (from memory maps: the merged segment never needs to fit in RAM)."""
        builder = SegmentBuilder(name, config, stage_in=stage_in, memory_bytes=memory_bytes)
        try:
            for seg, keep in parts:
                keep = np.asarray(keep, dtype=np.int64)
                ends = np.cumsum(seg.page_offsets[keep + 1] - seg.page_offsets[keep])
                start = 0
                while start < len(keep):
                    # whole pages, about _MERGE_BLOCK_ROWS vectors per block (at least one page)
                    done = ends[start - 1] if start else 0
                    stop = max(start + 1, int(np.searchsorted(ends, done + _MERGE_BLOCK_ROWS, side="right")))
                    block = keep[start:stop]
                    v, voff = gather_pages(seg.vectors, seg.page_offsets, block)
                    r, roff = gather_pages(seg.patch_rows, seg.patch_offsets, block)
                    builder.add_block(v, np.diff(voff), r, np.diff(roff), seg.grids[block],
                                      [seg.ids[i] for i in block], [seg.hashes[i] for i in block],
                                      [seg.metadata[i] for i in block])
                    start = stop
            if builder.n_pages == 0:
                raise ValueError("merge of no live pages")
            return builder.finish()
        except BaseException:
            builder.abort()
            raise

    def discard(self) -> None:
        """Remove this segment's staging directory if it was never written (a failed commit)."""
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)
            self.staged = None
        self._release()

    def _release(self) -> None:
        if self._stage_lock is not None:
            os.close(self._stage_lock)  # closing the descriptor releases the flock
            self._stage_lock = None

    # --- reading pages --------------------------------------------------------------------------------
    def embedding(self, i: int) -> PageEmbedding:
        lo, hi = int(self.page_offsets[i]), int(self.page_offsets[i + 1])
        plo, phi = int(self.patch_offsets[i]), int(self.patch_offsets[i + 1])
        return PageEmbedding(
            self.ids[i],
            torch.from_numpy(np.array(self.vectors[lo:hi], dtype=np.float32)),
            torch.from_numpy(np.asarray(self.patch_rows[plo:phi]).astype(np.int64)),
            (int(self.grids[i, 0]), int(self.grids[i, 1])),
            self.hashes[i],
            dict(self.metadata[i]),
        )

    # --- search ---------------------------------------------------------------------------------------
    def candidates(self, query: np.ndarray, k_prime: int, params: ann.SearchParams,
                   *, approx: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Sorted local page numbers owning one of the ``k_prime`` nearest vectors of some query token; with
        ``approx`` also each page's approximate MaxSim read off the ANN results (see SearchParams.rescore)."""
        assert self.index is not None
        sims, rows = ann.nearest(self.index, query, k_prime, params)
        found = rows >= 0
        owner = np.searchsorted(self.page_offsets, rows[found], side="right") - 1
        pages = np.unique(owner)
        if not approx:
            return pages
        # A page none of whose vectors made token t's list has no vector closer than the list's last one
        # (up to ANN error): that similarity stands in for its unknown maximum (XTR's imputation).
        fill = np.where(found.any(axis=1), np.where(found, sims, np.inf).min(axis=1), 0.0).astype(np.float32)
        best = np.repeat(fill[:, None], len(pages), axis=1)
        np.maximum.at(best, (np.nonzero(found)[0], np.searchsorted(pages, owner)), sims[found].astype(np.float32))
        return pages, best.sum(axis=0)

    def scores(self, query: np.ndarray, pages: np.ndarray | None = None) -> np.ndarray:
        """Exact MaxSim of ``query`` against ``pages`` (sorted local numbers), or every page when None."""
        if pages is None:
            return maxsim_scores(query, self.vectors, self.page_offsets)
        if len(pages) == 0:
            return np.empty(0, dtype=np.float32)
        vectors, offsets = gather_pages(self.vectors, self.page_offsets, pages)
        return maxsim_scores(query, vectors, offsets)

    # --- persistence ----------------------------------------------------------------------------------
    def write(self, parent: Path) -> None:
        """Write to ``parent/name`` atomically: into a hidden temp directory first, renamed when complete. A
        failed write removes the temp directory (a full disk raises DiskFullError) and changes nothing."""
        final = parent / self.name
        tmp = parent / f".tmp-{self.name}"
        staged = self.staged is not None and self.staged.resolve() == tmp.resolve()
        if not staged and tmp.exists():
            shutil.rmtree(tmp)
        try:
            self._write_files(tmp, staged)
            (tmp / BUILDING).unlink(missing_ok=True)
            os.rename(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, Exception) and _disk_full(exc, parent):
                raise DiskFullError(f"no space left on the device while writing index segment {self.name} under "
                                    f"{parent}; free some space and retry (the index is unchanged)") from exc
            raise
        finally:
            if staged:
                self.staged = None
                self._release()
        fsync_dir(parent)

    def _write_files(self, tmp: Path, staged: bool = False) -> None:
        if not staged:
            tmp.mkdir()
        files: dict[str, str] = {}
        for key in _ARRAYS:
            fname = f"{key}.npy"
            if not (staged and key == "vectors"):  # a staged segment's vectors are in place already
                np.save(tmp / fname, np.asarray(getattr(self, key)), allow_pickle=False)
            files[fname] = ""
        write_json(tmp / "pages.json", {"ids": self.ids, "content_hashes": self.hashes, "metadata": self.metadata})
        files["pages.json"] = ""
        if self.index is not None:
            faiss.write_index(self.index, str(tmp / "ann.faiss"))
            files["ann.faiss"] = ""
        for fname in files:
            fsync_file(tmp / fname)
            files[fname] = file_digest(tmp / fname)
        info = {
            "format": SEGMENT_FORMAT,
            "name": self.name,
            "kind": self.kind,
            "dim": self.dim,
            "vector_dtype": str(self.vectors.dtype),
            "n_pages": self.n_pages,
            "n_vectors": self.n_vectors,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": d} for f, d in files.items()},
        }
        write_json(tmp / "segment.json", info)
        fsync_dir(tmp)

    @classmethod
    def read(cls, path: Path, *, mmap: bool = True, verify: bool = False) -> Segment:
        """Open a segment directory; IndexStateError if anything is missing, truncated or inconsistent."""
        try:
            info = json.loads((path / "segment.json").read_text(encoding="utf-8"))
            if info.get("format") != SEGMENT_FORMAT:
                raise IndexStateError(f"{path}: unknown segment format {info.get('format')!r}")
            for fname, f in info["files"].items():
                size = (path / fname).stat().st_size
                if size != f["bytes"]:
                    raise IndexStateError(f"{path / fname}: {size} bytes, expected {f['bytes']} (truncated?)")
                if verify and file_digest(path / fname) != f["sha256"]:
                    raise IndexStateError(f"{path / fname}: checksum mismatch (file corrupted)")
            arrays = {
                k: np.load(path / f"{k}.npy", mmap_mode="r" if mmap and k in _MMAPPED else None, allow_pickle=False)
                for k in _ARRAYS
            }
            pages = json.loads((path / "pages.json").read_text(encoding="utf-8"))
            index = None
            if "ann.faiss" in info["files"]:
                flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
                index = faiss.read_index(str(path / "ann.faiss"), flags)
        except IndexStateError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise IndexStateError(f"{path}: cannot read index segment ({exc})") from exc
        seg = cls(
            info["name"], info["kind"], arrays["vectors"], arrays["page_offsets"], arrays["patch_rows"],
            arrays["patch_offsets"], arrays["grids"], pages["ids"], pages["content_hashes"], pages["metadata"], index,
        )
        seg._check(info)
        return seg

    def _check(self, info: dict[str, Any]) -> None:
        n, nv = info["n_pages"], info["n_vectors"]
        ok = (
            len(self.ids) == len(self.hashes) == len(self.metadata) == n
            and self.page_offsets.shape == (n + 1,)
            and self.patch_offsets.shape == (n + 1,)
            and self.grids.shape == (n, 2)
            and self.vectors.shape == (nv, info["dim"])
            and self.vectors.dtype in (np.float32, np.float16)
            and int(self.page_offsets[-1]) == nv
            and int(self.patch_offsets[-1]) == len(self.patch_rows)
            and (self.index is None or self.index.ntotal == nv)
        )
        if not ok:
            raise IndexStateError(f"segment {self.name}: files disagree with each other (corrupt segment)")


class SegmentBuilder:
    """Collects the pages of one new segment. Vectors stay in RAM up to ``memory_bytes``; past that, given a
    staging parent (the index directory), they are appended to ``<stage_in>/.tmp-<name>/vectors.npy`` as they
    come, so the build holds one block of vectors at a time, however large the segment."""

    def __init__(self, name: str, config: ann.AnnConfig, *, stage_in: Path | None = None,
                 memory_bytes: int | None = None) -> None:
        self.name, self.config = name, config
        self.dtype = np.dtype(config.vector_dtype)
        self.stage_in = stage_in
        self.memory_bytes = memory_bytes
        self.dim: int | None = None
        self._ram: list[np.ndarray] = []
        self._ram_bytes = 0
        self._spill: _NpyAppender | None = None
        self._stage: Path | None = None
        self._lock: int | None = None
        self._vlens: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._plens: list[np.ndarray] = []
        self._grids: list[np.ndarray] = []
        self.ids: list[str] = []
        self.hashes: list[str | None] = []
        self.metadata: list[dict[str, Any]] = []

    @property
    def n_pages(self) -> int:
        return len(self.ids)

    def add(self, vectors: np.ndarray, patch_rows: np.ndarray, grid: tuple[int, int], page_id: str,
            content_hash: str | None, metadata: dict[str, Any]) -> None:
        self.add_block(vectors, np.asarray([len(vectors)]), patch_rows, np.asarray([len(patch_rows)]),
                       np.asarray([grid]), [page_id], [content_hash], [metadata])

    def add_block(self, vectors: np.ndarray, vlens: np.ndarray, patch_rows: np.ndarray, plens: np.ndarray,
                  grids: np.ndarray, ids: list[str], hashes: list[str | None], metadata: list[dict[str, Any]]) -> None:
        """Pages ``ids``, their vectors concatenated (page i owns ``vlens[i]`` rows), likewise their patch rows."""
        self.dim = self.dim or int(vectors.shape[1])
        nbytes = int(np.prod(vectors.shape)) * self.dtype.itemsize
        if self._spill is None and self.stage_in is not None and self.memory_bytes is not None \
                and self._ram_bytes + nbytes > self.memory_bytes:
            self._start_spill()
        if self._spill is not None:
            self._write(np.ascontiguousarray(vectors, dtype=self.dtype))
        else:
            self._ram.append(np.array(vectors, dtype=self.dtype))  # a copy: the caller may reuse its buffers
            self._ram_bytes += nbytes
        self._vlens.append(np.asarray(vlens, dtype=np.int64))
        self._rows.append(np.asarray(patch_rows, dtype=np.int32))
        self._plens.append(np.asarray(plens, dtype=np.int64))
        self._grids.append(np.asarray(grids, dtype=np.int32).reshape(-1, 2))
        self.ids += ids
        self.hashes += hashes
        self.metadata += metadata

    def _start_spill(self) -> None:
        stage = self.stage_in / f".tmp-{self.name}"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
        self._stage = stage
        self._lock = _lock_building(stage)
        self._spill = _NpyAppender(stage / "vectors.npy", self.dim, self.dtype)
        for block in self._ram:
            self._write(block)
        self._ram, self._ram_bytes = [], 0

    def _write(self, block: np.ndarray | None) -> None:
        """Append ``block`` to the spilled vectors (None: finish the file); a full disk is a DiskFullError."""
        try:
            self._spill.append(block) if block is not None else self._spill.close()
        except OSError as exc:
            if _disk_full(exc, self._stage):
                raise DiskFullError(f"no space left on the device while writing index segment {self.name} under "
                                    f"{self.stage_in}; free some space and retry (the index is unchanged)") from exc
            raise

    def finish(self) -> Segment:
        if not self.ids:
            raise ValueError("a segment needs at least one page")
        if self._spill is not None:
            self._write(None)
            vectors = np.load(self._stage / "vectors.npy", mmap_mode="r", allow_pickle=False)
        else:
            vectors = self._ram[0] if len(self._ram) == 1 else np.concatenate(self._ram)
        kind = ann.resolve_type(self.config, len(vectors))
        seg = Segment(
            self.name, kind, vectors, _offsets(np.concatenate(self._vlens)), np.concatenate(self._rows),
            _offsets(np.concatenate(self._plens)), np.concatenate(self._grids), self.ids, self.hashes,
            self.metadata, None, self._stage, self._lock,
        )
        self._stage = self._lock = None  # the segment owns them now
        try:
            seg.index = ann.build(kind, vectors, self.config)
        except BaseException:
            seg.discard()
            raise
        return seg

    def abort(self) -> None:
        if self._spill is not None:
            self._spill.abandon()
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _lock_building(stage: Path) -> int | None:
    """Hold an exclusive flock on ``stage/.building`` for as long as the descriptor is open (the process alive)."""
    fd = os.open(stage / BUILDING, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def build_in_progress(stage: Path) -> bool:
    """Whether a live process is building into staging directory ``stage`` (its ``.building`` lock is held)."""
    if fcntl is None or not (stage / BUILDING).exists():
        return False
    try:
        fd = os.open(stage / BUILDING, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class _NpyAppender:
    """An ``.npy`` file written row block by row block, its row count unknown until :meth:`close`: the header is
    a fixed 128 bytes rewritten in place at the end (numpy reads any space-padded header)."""

    HEADER = 128

    def __init__(self, path: Path, dim: int, dtype: np.dtype) -> None:
        self.path, self.dim, self.dtype = path, dim, np.dtype(dtype)
        self.rows = 0
        self._f = open(path, "wb")
        self._f.write(b"\0" * self.HEADER)

    def append(self, block: np.ndarray) -> None:
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"vectors of dim {block.shape[-1]} in a segment of dim {self.dim}")
        self._f.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += len(block)

    def close(self) -> None:
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.rows, self.dim)}
        text = repr(d).encode("latin1")
        room = self.HEADER - 10 - 1  # magic (6) + version (2) + length (2), newline
        if len(text) > room:  # cannot happen below 10^40 rows
            raise ValueError("npy header too long")
        self._f.seek(0)
        self._f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", self.HEADER - 10) + text.ljust(room) + b"\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abandon(self) -> None:
        if not self._f.closed:
            self._f.close()
