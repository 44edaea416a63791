"""Segment: an immutable block of pages -- their vectors, patch layout, ids, metadata and FAISS index.

An index is a list of segments (like an LSM tree): `add` writes a new segment, `delete` only records
tombstones, `compact` rewrites live pages into one segment. Segment files never change once written, so a
reader can memory-map them while a writer works next to it.

On disk, one directory per segment:
    vectors.npy        (N, D) float32, every vector of every page, page after page
    page_offsets.npy   (n+1,) int64, page i owns vectors[page_offsets[i]:page_offsets[i+1]]
    patch_rows.npy     (P,) int32, row (within its page) of each image patch, row-major over the page grid
    patch_offsets.npy  (n+1,) int64, page i's patches are patch_rows[patch_offsets[i]:patch_offsets[i+1]]
    grids.npy          (n, 2) int32, (h, w) patch grid per page
    pages.json         ids, content hashes, metadata
    ann.faiss          the FAISS index over vectors.npy rows (absent for exact "flat" segments)
    segment.json       written last: kind, counts, size and sha256 of every file above
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ..errors import IndexStateError
from . import ann
from .embedding import PageEmbedding
from .maxsim import gather_pages, maxsim_scores
from .storage import file_digest, fsync_dir, fsync_file, write_json

SEGMENT_FORMAT = "minirerank-segment/1"
_ARRAYS = ("vectors", "page_offsets", "patch_rows", "patch_offsets", "grids")


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
        cls, name: str, pages: Sequence[PageEmbedding], metadata: Sequence[dict[str, Any]], config: ann.AnnConfig
    ) -> Segment:
        vectors = torch.cat([p.vectors for p in pages]).numpy()
        patch_rows = torch.cat([p.patch_rows for p in pages]).to(torch.int32).numpy()
        return cls._build(
            name,
            vectors,
            _offsets([p.vectors.shape[0] for p in pages]),
            patch_rows,
            _offsets([p.patch_rows.numel() for p in pages]),
            np.asarray([p.grid for p in pages], dtype=np.int32).reshape(-1, 2),
            [p.page_id for p in pages],
            [p.content_hash for p in pages],
            list(metadata),
            config,
        )

    @classmethod
    def merge(cls, name: str, parts: Sequence[tuple[Segment, np.ndarray]], config: ann.AnnConfig) -> Segment:
        """One segment holding pages ``keep`` (sorted local numbers) of each (segment, keep) part, in order."""
        vecs, vlens, rows, plens, grids, ids, hashes, meta = [], [], [], [], [], [], [], []
        for seg, keep in parts:
            if len(keep) == 0:
                continue
            v, _ = gather_pages(seg.vectors, seg.page_offsets, keep)
            r, _ = gather_pages(seg.patch_rows, seg.patch_offsets, keep)
            vecs.append(v)
            rows.append(r.astype(np.int32))
            vlens.append(seg.page_offsets[keep + 1] - seg.page_offsets[keep])
            plens.append(seg.patch_offsets[keep + 1] - seg.patch_offsets[keep])
            grids.append(seg.grids[keep])
            ids += [seg.ids[i] for i in keep]
            hashes += [seg.hashes[i] for i in keep]
            meta += [seg.metadata[i] for i in keep]
        if not ids:
            raise ValueError("merge of no live pages")
        return cls._build(
            name,
            np.concatenate(vecs),
            _offsets(np.concatenate(vlens)),
            np.concatenate(rows),
            _offsets(np.concatenate(plens)),
            np.concatenate(grids),
            ids,
            hashes,
            meta,
            config,
        )

    @classmethod
    def _build(cls, name, vectors, page_offsets, patch_rows, patch_offsets, grids, ids, hashes, metadata, config):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        kind = ann.resolve_type(config, len(vectors))
        return cls(
            name, kind, vectors, page_offsets, patch_rows, patch_offsets, grids, ids, hashes, metadata,
            ann.build(kind, vectors, config),
        )

    # --- reading pages --------------------------------------------------------------------------------
    def embedding(self, i: int) -> PageEmbedding:
        lo, hi = int(self.page_offsets[i]), int(self.page_offsets[i + 1])
        plo, phi = int(self.patch_offsets[i]), int(self.patch_offsets[i + 1])
        return PageEmbedding(
            self.ids[i],
            torch.from_numpy(np.array(self.vectors[lo:hi], dtype=np.float32)),
            torch.from_numpy(self.patch_rows[plo:phi].astype(np.int64)),
            (int(self.grids[i, 0]), int(self.grids[i, 1])),
            self.hashes[i],
            dict(self.metadata[i]),
        )

    # --- search ---------------------------------------------------------------------------------------
    def candidates(self, query: np.ndarray, k_prime: int, params: ann.SearchParams) -> np.ndarray:
        """Sorted local page numbers owning one of the ``k_prime`` nearest vectors of some query token."""
        assert self.index is not None
        rows = ann.nearest(self.index, query, k_prime, params)
        return np.unique(np.searchsorted(self.page_offsets, rows, side="right") - 1)

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
        """Write to ``parent/name`` atomically: into a hidden temp directory first, renamed when complete."""
        final = parent / self.name
        tmp = parent / f".tmp-{self.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files: dict[str, str] = {}
        for key in _ARRAYS:
            fname = f"{key}.npy"
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
            "n_pages": self.n_pages,
            "n_vectors": self.n_vectors,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": d} for f, d in files.items()},
        }
        write_json(tmp / "segment.json", info)
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(parent)

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
                k: np.load(path / f"{k}.npy", mmap_mode="r" if mmap and k == "vectors" else None, allow_pickle=False)
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
            and int(self.page_offsets[-1]) == nv
            and int(self.patch_offsets[-1]) == len(self.patch_rows)
            and (self.index is None or self.index.ntotal == nv)
        )
        if not ok:
            raise IndexStateError(f"segment {self.name}: files disagree with each other (corrupt segment)")
