"""PageIndex: a multi-vector page index -- FAISS candidate generation, exact MaxSim ranking, crash-safe on disk.

Search = for each query token, the ``k_prime`` nearest stored vectors (FAISS: exhaustive for "flat"
segments, HNSW / IVF / IVF-PQ otherwise) -> the pages owning them are candidates -> exact MaxSim over each
candidate's stored vectors -> top k. Flat segments skip candidate generation and score every page, so an
all-flat index (small collections) ranks exactly as colpali's ``score_multi_vector``.

On disk (a directory):
    manifest.json  format + version, settings, generation number, live segments and their tombstones
    seg-*/         immutable segments (see segment.py)
Every change writes new files first and then switches ``manifest.json`` with one ``os.replace``; a process
killed at any moment leaves the previous manifest, which only names complete segments. Leftovers of a killed
writer are removed by the next successful write. Writers take an advisory lock on the directory and refuse
to commit over a generation they did not read (IndexStateError: reopen and retry). Readers never lock.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DuplicatePageIdError, IndexStateError, InvalidQueryError
from .ann import AnnConfig, SearchParams
from .embedding import PageEmbedding
from .maxsim import top_k
from .segment import Segment
from .storage import canonical_json, replace_json, writer_lock

FORMAT = "minirerank-page-index"
VERSION = 1
MANIFEST = "manifest.json"

QueryLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]]


@dataclass(frozen=True)
class SearchHit:
    """One first-stage result: exact MaxSim ``score``; ``rank`` starts at 1."""

    page_id: str
    score: float
    rank: int
    metadata: dict[str, Any] = field(default_factory=dict)


class PageIndex:
    """Multi-vector page index. In memory until bound to a directory by :meth:`create`, :meth:`open` or
    :meth:`save`; once bound, every :meth:`add` / :meth:`delete` / :meth:`compact` is durable on return.

    Not safe for concurrent writes from several threads of one process; any number of reader processes may
    :meth:`open` the directory while one writer process changes it.
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        index_type: str | None = None,
        ann: AnnConfig | None = None,
        search_params: SearchParams | None = None,
        max_segments: int = 8,
    ) -> None:
        config = ann or AnnConfig()
        if index_type is not None:
            config = replace(config, index_type=index_type)
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(max_segments, int) or max_segments < 2:
            raise ValueError(f"max_segments must be an int >= 2, got {max_segments!r}")
        self._dim = dim
        self._ann = config
        self.search_params = search_params or SearchParams()
        self._max_segments = max_segments
        self._segments: list[Segment] = []
        self._live: list[np.ndarray] = []  # per segment, bool per page: False = tombstoned
        self._where: dict[str, tuple[int, int]] = {}  # live page id -> (segment number, page number)
        self._path: Path | None = None
        self._generation = 0
        self._mmap = True

    # --- lifecycle ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], dim: int | None = None, **kwargs: Any) -> PageIndex:
        """A new, empty index bound to directory ``path`` (created if needed; must not hold an index)."""
        index = cls(dim, **kwargs)
        index.save(path)
        return index

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap: bool = True,
        verify: bool = False,
        search_params: SearchParams | None = None,
    ) -> PageIndex:
        """Open the index in ``path``. ``mmap``: map vector files instead of reading them (low memory);
        ``verify``: check every file's sha256 (reads everything). IndexStateError if absent or damaged."""
        path = Path(path)
        for attempt in range(3):
            manifest = _read_manifest(path)
            try:
                segments = [Segment.read(path / e["name"], mmap=mmap, verify=verify) for e in manifest["segments"]]
                break
            except IndexStateError:
                # A writer may have compacted away a segment between our reads of manifest and segment.
                if attempt == 2 or _read_manifest(path)["generation"] == manifest["generation"]:
                    raise
        index = cls(
            manifest["dim"],
            ann=AnnConfig.from_dict(manifest["ann"]),
            search_params=search_params or SearchParams(**manifest["search"]),
            max_segments=manifest["max_segments"],
        )
        live = []
        for seg, entry in zip(segments, manifest["segments"]):
            mask = np.ones(seg.n_pages, dtype=bool)
            deleted = np.asarray(entry.get("deleted", []), dtype=np.int64)
            if deleted.size and (deleted.min() < 0 or deleted.max() >= seg.n_pages):
                raise IndexStateError(f"{path / MANIFEST}: tombstone out of range for segment {seg.name}")
            mask[deleted] = False
            live.append(mask)
        index._segments, index._live = segments, live
        index._path, index._generation, index._mmap = path, manifest["generation"], mmap
        index._reindex()
        return index

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this in-memory index to directory ``path`` (new or empty of any index) and bind it there."""
        path = Path(path)
        if self._path is not None:
            if path.resolve() == self._path.resolve():
                return  # already durable
            raise IndexStateError(f"this index is bound to {self._path}; open a new PageIndex to copy it elsewhere")
        path.mkdir(parents=True, exist_ok=True)
        with writer_lock(path):
            if (path / MANIFEST).exists():
                raise IndexStateError(f"{path} already holds an index; use PageIndex.open({str(path)!r})")
            for seg in self._segments:
                seg.write(path)
            self._generation += 1
            replace_json(path / MANIFEST, self._manifest(self._segments, self._live, self._generation))
            _collect_garbage(path, {s.name for s in self._segments})
        self._path = path

    def refresh(self) -> bool:
        """Re-read the directory if another process changed it since; True when something changed."""
        if self._path is None or _read_manifest(self._path)["generation"] == self._generation:
            return False
        fresh = PageIndex.open(self._path, mmap=self._mmap, search_params=self.search_params)
        self.__dict__.update(fresh.__dict__)
        return True

    # --- contents -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, page_id: object) -> bool:
        return page_id in self._where

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def ann_config(self) -> AnnConfig:
        return self._ann

    def page_ids(self) -> list[str]:
        return list(self._where)

    def content_hashes(self) -> dict[str, str]:
        """content hash -> page id of every live page that has a hash (for duplicate detection at ingest)."""
        out: dict[str, str] = {}
        for page_id, (s, i) in self._where.items():
            h = self._segments[s].hashes[i]
            if h is not None:
                out.setdefault(h, page_id)
        return out

    def metadata(self, page_id: str) -> dict[str, Any]:
        s, i = self._locate(page_id)
        return dict(self._segments[s].metadata[i])

    def embedding(self, page_id: str) -> PageEmbedding:
        """The stored embedding of a page (vectors, patch rows, grid): what importance maps are made from."""
        s, i = self._locate(page_id)
        return self._segments[s].embedding(i)

    def stats(self) -> dict[str, Any]:
        """Counts per segment (kind, pages, live pages) and totals; vectors of tombstoned pages included."""
        return {
            "pages": len(self),
            "vectors_stored": sum(s.n_vectors for s in self._segments),
            "segments": [{"name": s.name, "kind": s.kind, "pages": s.n_pages, "live": int(l.sum())}
                         for s, l in zip(self._segments, self._live)],
            "generation": self._generation,
        }

    # --- changes --------------------------------------------------------------------------------------
    def add(
        self, pages: Iterable[PageEmbedding], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> list[str]:
        """Index ``pages``; returns the ids added.

        ``metadata[i]`` (JSON-serialisable) is merged over ``pages[i].metadata``. A page whose id is already
        indexed (or repeated in this call) is skipped when both carry the same ``content_hash`` -- re-adding
        the same page is a no-op -- and raises DuplicatePageIdError otherwise, adding nothing.
        """
        pages = list(pages)
        if metadata is not None:
            metadata = list(metadata)
            if len(metadata) != len(pages):
                raise ValueError(f"metadata has {len(metadata)} entries for {len(pages)} pages")
        dim = self._dim
        new: list[PageEmbedding] = []
        metas: list[dict[str, Any]] = []
        seen: dict[str, str | None] = {}
        for i, page in enumerate(pages):
            if not isinstance(page, PageEmbedding):
                raise TypeError(f"pages[{i}] is a {type(page).__name__}, not a PageEmbedding")
            dim = dim or page.dim
            if page.dim != dim:
                raise ValueError(f"page {page.page_id!r} has dim {page.dim}, the index has dim {dim}")
            if page.page_id in seen or page.page_id in self._where:
                other = seen[page.page_id] if page.page_id in seen else self._hash_of(page.page_id)
                if page.content_hash is not None and page.content_hash == other:
                    continue
                raise DuplicatePageIdError(
                    f"page id {page.page_id!r} is already {'in this call' if page.page_id in seen else 'indexed'} "
                    "with different (or unknown) content; delete it first or give the page another id"
                )
            meta = {**page.metadata, **dict((metadata[i] if metadata is not None else None) or {})}
            try:
                canonical_json(meta)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata of page {page.page_id!r} is not JSON-serialisable ({exc})") from exc
            seen[page.page_id] = page.content_hash
            new.append(page)
            metas.append(meta)
        if not new:
            return []
        seg = Segment.from_embeddings(self._segment_name(), new, metas, self._ann)
        old_dim, self._dim = self._dim, dim  # the manifest written by _commit records the dim
        try:
            self._commit(self._segments + [seg], self._live + [np.ones(seg.n_pages, dtype=bool)], [seg])
        except BaseException:
            self._dim = old_dim
            raise
        self._maybe_merge()
        return [p.page_id for p in new]

    def delete(self, page_ids: Iterable[str], *, missing_ok: bool = False) -> int:
        """Remove pages (tombstones; space comes back at :meth:`compact`). Returns how many were removed.
        Unknown ids raise KeyError unless ``missing_ok``."""
        if isinstance(page_ids, str):
            page_ids = [page_ids]
        ids = list(dict.fromkeys(page_ids))
        missing = [p for p in ids if p not in self._where]
        if missing and not missing_ok:
            raise KeyError(f"not in the index: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        found = [self._where[p] for p in ids if p in self._where]
        if not found:
            return 0
        live = list(self._live)
        for s, i in found:
            if live[s] is self._live[s]:
                live[s] = live[s].copy()
            live[s][i] = False
        keep = [n for n, mask in enumerate(live) if mask.any()]  # fully dead segments just drop out
        self._commit([self._segments[n] for n in keep], [live[n] for n in keep], [])
        return len(found)

    def compact(self) -> None:
        """Rewrite all live pages into one segment: drops tombstoned vectors, rebuilds the ANN structure over
        everything (best recall; costs a full rebuild)."""
        if len(self._segments) <= 1 and all(m.all() for m in self._live):
            return
        self._merge(list(range(len(self._segments))))

    def _maybe_merge(self) -> None:
        # Bound the number of segments (each costs a FAISS search per query): merge the smallest ones.
        if len(self._segments) <= self._max_segments:
            return
        by_size = sorted(range(len(self._segments)), key=lambda n: int(self._live[n].sum()))
        self._merge(sorted(by_size[: len(self._segments) - self._max_segments // 2 + 1]))

    def _merge(self, which: list[int]) -> None:
        parts = [(self._segments[n], np.flatnonzero(self._live[n])) for n in which]
        rest = [n for n in range(len(self._segments)) if n not in set(which)]
        segments = [self._segments[n] for n in rest]
        live = [self._live[n] for n in rest]
        written = []
        if any(len(keep) for _, keep in parts):
            merged = Segment.merge(self._segment_name(), parts, self._ann)
            segments.append(merged)
            live.append(np.ones(merged.n_pages, dtype=bool))
            written.append(merged)
        self._commit(segments, live, written)

    def _commit(self, segments: list[Segment], live: list[np.ndarray], written: list[Segment]) -> None:
        """Make (segments, live) the index's state: durably first when bound, then in memory."""
        generation = self._generation + 1
        if self._path is not None:
            with writer_lock(self._path):
                on_disk = _read_manifest(self._path)
                if on_disk["generation"] != self._generation:
                    raise IndexStateError(
                        f"{self._path} was changed by another writer (generation {on_disk['generation']}, this "
                        f"handle read {self._generation}); call refresh() or reopen, then retry"
                    )
                for seg in written:
                    seg.write(self._path)
                replace_json(self._path / MANIFEST, self._manifest(segments, live, generation))
                _collect_garbage(self._path, {s.name for s in segments})
            if self._mmap:  # serve new segments from their files, not from the RAM copy just written
                segments = [Segment.read(self._path / s.name) if s in written else s for s in segments]
        self._segments, self._live, self._generation = segments, live, generation
        self._reindex()

    def _manifest(self, segments: list[Segment], live: list[np.ndarray], generation: int) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "generation": generation,
            "dim": self._dim,
            "ann": self._ann.to_dict(),
            "search": {"k_prime": self.search_params.k_prime, "ef_search": self.search_params.ef_search,
                       "nprobe": self.search_params.nprobe},
            "max_segments": self._max_segments,
            "segments": [{"name": s.name, "deleted": np.flatnonzero(~m).tolist()} for s, m in zip(segments, live)],
        }

    def _segment_name(self) -> str:
        # Random suffix: never collides with a half-written leftover of a killed writer.
        return f"seg-{self._generation + 1:06d}-{secrets.token_hex(4)}"

    def _reindex(self) -> None:
        where: dict[str, tuple[int, int]] = {}
        for s, (seg, live) in enumerate(zip(self._segments, self._live)):
            for i in np.flatnonzero(live).tolist():
                if where.setdefault(seg.ids[i], (s, i)) != (s, i):
                    raise IndexStateError(f"page id {seg.ids[i]!r} is live in two segments (corrupt manifest)")
        self._where = where

    def _locate(self, page_id: str) -> tuple[int, int]:
        try:
            return self._where[page_id]
        except KeyError:
            raise KeyError(f"page {page_id!r} is not in the index") from None

    def _hash_of(self, page_id: str) -> str | None:
        s, i = self._where[page_id]
        return self._segments[s].hashes[i]

    # --- search ---------------------------------------------------------------------------------------
    def search(
        self,
        query: QueryLike,
        k: int = 20,
        *,
        k_prime: int | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
        exact: bool = False,
    ) -> list[SearchHit]:
        """Top ``k`` pages for a query embedding (Tq, D), best first, by exact MaxSim score.

        ``k_prime`` / ``ef_search`` / ``nprobe`` override :attr:`search_params` for this call; ``exact``
        scores every page (ground truth; slow on large indexes). An empty index gives [].
        """
        q = self._query_array(query)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not self._where:
            return []
        params = self.search_params.override(k_prime=k_prime, ef_search=ef_search, nprobe=nprobe)
        kp = params.k_prime_for(k)
        scores, owners = [], []
        for s, (seg, live) in enumerate(zip(self._segments, self._live)):
            if exact or seg.index is None:
                pages = np.flatnonzero(live)
                sc = seg.scores(q)[pages]
            else:
                pages = seg.candidates(q, kp, params)
                pages = pages[live[pages]]
                sc = seg.scores(q, pages)
            scores.append(sc)
            owners.append(np.stack([np.full(len(pages), s, dtype=np.int64), pages]))
        all_scores = np.concatenate(scores)
        where = np.concatenate(owners, axis=1)
        hits = []
        for rank, j in enumerate(top_k(all_scores, k).tolist(), start=1):
            seg = self._segments[int(where[0, j])]
            i = int(where[1, j])
            hits.append(SearchHit(seg.ids[i], float(all_scores[j]), rank, dict(seg.metadata[i])))
        return hits

    def search_batch(self, queries: Sequence[QueryLike], k: int = 20, **kwargs: Any) -> list[list[SearchHit]]:
        return [self.search(q, k, **kwargs) for q in queries]

    def _query_array(self, query: QueryLike) -> np.ndarray:
        if isinstance(query, str):
            raise InvalidQueryError("PageIndex.search takes a query embedding; encode text with PageEmbedder.encode_queries")
        if isinstance(query, torch.Tensor):
            query = query.detach().to("cpu", torch.float32).numpy()
        try:
            q = np.asarray(query, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidQueryError(f"query embedding is not a numeric array ({exc})") from exc
        if q.ndim == 1 and q.size:
            q = q[None, :]
        if q.ndim != 2 or q.shape[0] == 0 or q.shape[1] == 0:
            raise InvalidQueryError(f"query embedding must be a non-empty (Tq, D) array, got shape {q.shape}")
        if self._dim is not None and q.shape[1] != self._dim:
            raise InvalidQueryError(f"query embedding has dim {q.shape[1]}, the index has dim {self._dim}")
        if not np.isfinite(q).all():
            raise InvalidQueryError("query embedding contains NaN or inf")
        return np.ascontiguousarray(q)


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexStateError(f"no index at {path} ({MANIFEST} not found)") from None
    except (OSError, ValueError) as exc:
        raise IndexStateError(f"{file}: unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexStateError(f"{file}: not a minirerank page index")
    if manifest.get("version") != VERSION:
        raise IndexStateError(
            f"{file}: format version {manifest.get('version')!r}; this minirerank reads version {VERSION}"
        )
    missing = {"generation", "dim", "ann", "search", "max_segments", "segments"} - set(manifest)
    if missing:
        raise IndexStateError(f"{file}: incomplete manifest (missing {sorted(missing)})")
    return manifest


def _collect_garbage(path: Path, keep: set[str]) -> None:
    """Remove segments no longer referenced and leftovers of killed writers (call under the writer lock).
    Readers that still map removed files keep working: POSIX frees them at their last close."""
    for entry in path.iterdir():
        name = entry.name
        if (name.startswith("seg-") and name not in keep) or name.startswith((".tmp-", f".{MANIFEST}.tmp")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
