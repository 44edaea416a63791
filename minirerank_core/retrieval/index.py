"""PageIndex: a multi-vector page index -- FAISS candidate generation, exact MaxSim ranking, crash-safe on disk.

Search = for each query token, the ``k_prime`` nearest stored vectors (FAISS: exhaustive for "flat"
segments, HNSW / IVF / IVF-PQ otherwise) -> the pages owning them are candidates -> (with
``SearchParams.rescore``: the best ``rescore`` of them by an approximate MaxSim read off the FAISS results) ->
exact MaxSim over each candidate's stored vectors -> top k. Flat segments skip candidate generation and score
every page, so an all-flat index (small collections) ranks exactly as colpali's ``score_multi_vector``.

At scale (100k+ pages of ~1,000 vectors) the FAISS codes stay in RAM while the full vectors (float32 or float16,
``AnnConfig.vector_dtype``) are memory-mapped and read only for the candidates; segments larger than
``build_memory_bytes`` are built on disk (segment.py), so adding a generator of pages never holds them all.

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
import logging
import os
import secrets
import shutil
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import DuplicatePageIdError, IndexMergeWarning, IndexStateError, InvalidQueryError, LockTimeoutError
from ..fileio import canonical_json, format_tag, is_temp_name, write_json, writer_lock
from ..validation import check_positive_int
from .ann import AnnConfig, SearchParams
from .embedding import PageEmbedding
from .maxsim import top_k
from .segment import Segment, SegmentBuilder, build_in_progress

logger = logging.getLogger("minirerank.index")

_FORMAT_NAME = "minirerank-page-index"
VERSION = 1
FORMAT = format_tag("page-index", VERSION)
MANIFEST = "manifest.json"

QueryLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]]


@dataclass(frozen=True)
class SearchHit:
    """One first-stage result: exact MaxSim ``score``; ``rank`` starts at 1. ``embedding``: the page's stored
    embedding, when the search was asked for it (``with_embeddings``), read from the same snapshot as the hit."""

    page_id: str
    score: float
    rank: int
    metadata: dict[str, Any] = field(default_factory=dict)
    embedding: PageEmbedding | None = field(default=None, compare=False, repr=False)


def require_same_content(page: PageEmbedding, in_call: bool, known_hash: str | None) -> None:
    """Every backend's rule for a page id it already holds (or saw earlier in the same call): the caller skips the
    page when its content is the same (re-adding a page is a no-op); anything else raises DuplicatePageIdError."""
    if page.content_hash is None or page.content_hash != known_hash:
        raise DuplicatePageIdError(
            f"page id {page.page_id!r} is already {'in this call' if in_call else 'indexed'} "
            "with different (or unknown) content; delete it first or give the page another id"
        )


@runtime_checkable
class PageIndexBackend(Protocol):
    """What the first stage, the pipeline and the retrievers need of a page index. :class:`PageIndex` (FAISS, a
    directory) and :class:`~minirerank_core.retrieval.qdrant.QdrantPageIndex` (a Qdrant collection) implement it."""

    @property
    def dim(self) -> int | None: ...

    def __len__(self) -> int: ...

    def __contains__(self, page_id: object) -> bool: ...

    def page_ids(self) -> list[str]: ...

    def content_hashes(self) -> dict[str, str]: ...

    def metadata(self, page_id: str) -> dict[str, Any]: ...

    def embedding(self, page_id: str) -> PageEmbedding: ...

    def add(self, pages: Iterable[PageEmbedding],
            metadata: Sequence[Mapping[str, Any] | None] | None = None) -> list[str]: ...

    def delete(self, page_ids: Iterable[str], *, missing_ok: bool = False) -> int: ...

    def refresh(self) -> bool: ...

    def search(self, query: QueryLike, k: int = 20, *, exact: bool = False, with_embeddings: bool = False,
               **kwargs: Any) -> list[SearchHit]: ...


@dataclass(frozen=True)
class _State:
    """One consistent view of the index. A change builds a new one and swaps it in with one assignment, so a
    reader that took ``self._state`` once sees segments, tombstones and ids that belong together."""

    segments: tuple[Segment, ...] = ()
    live: tuple[np.ndarray, ...] = ()  # per segment, bool per page: False = tombstoned
    where: dict[str, tuple[int, int]] = field(default_factory=dict)  # live page id -> (segment, page number)
    generation: int = 0

    @classmethod
    def of(cls, segments: Sequence[Segment], live: Sequence[np.ndarray], generation: int) -> _State:
        where: dict[str, tuple[int, int]] = {}
        for s, (seg, mask) in enumerate(zip(segments, live)):
            for i in np.flatnonzero(mask).tolist():
                if where.setdefault(seg.ids[i], (s, i)) != (s, i):
                    raise IndexStateError(f"page id {seg.ids[i]!r} is live in two segments (corrupt manifest)")
        return cls(tuple(segments), tuple(live), where, generation)


class PageIndex:
    """Multi-vector page index. In memory until bound to a directory by :meth:`create`, :meth:`open` or
    :meth:`save`; once bound, every :meth:`add` / :meth:`delete` / :meth:`compact` is durable on return.

    Within one process, searches may run while another thread adds or deletes (each reads one snapshot) and
    writes from several threads are serialised. Across processes, any number of readers may :meth:`open` the
    directory while one writer process changes it.
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        index_type: str | None = None,
        ann: AnnConfig | None = None,
        search_params: SearchParams | None = None,
        max_segments: int = 8,
        build_memory_bytes: int = 1 << 30,
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
        # Vectors of a segment being built kept in RAM up to this; past it a bound index writes them to disk.
        self.build_memory_bytes = check_positive_int("build_memory_bytes", build_memory_bytes)
        self._state = _State()
        self._write_lock = threading.RLock()  # one writer thread at a time in this process
        self._path: Path | None = None
        self._mmap = True

    # read-only views of the current snapshot (a reader that needs several takes self._state once)
    @property
    def _segments(self) -> tuple[Segment, ...]:
        return self._state.segments

    @property
    def _live(self) -> tuple[np.ndarray, ...]:
        return self._state.live

    @property
    def _where(self) -> dict[str, tuple[int, int]]:
        return self._state.where

    @property
    def _generation(self) -> int:
        return self._state.generation

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
        build_memory_bytes: int = 1 << 30,
    ) -> PageIndex:
        """Open the index in ``path``. ``mmap``: map vector files (and FAISS lists) instead of reading them (low
        memory); ``verify``: check every file's sha256 (reads everything). IndexStateError if absent or damaged."""
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
            build_memory_bytes=build_memory_bytes,
        )
        live = []
        for seg, entry in zip(segments, manifest["segments"]):
            mask = np.ones(seg.n_pages, dtype=bool)
            deleted = np.asarray(entry.get("deleted", []), dtype=np.int64)
            if deleted.size and (deleted.min() < 0 or deleted.max() >= seg.n_pages):
                raise IndexStateError(f"{path / MANIFEST}: tombstone out of range for segment {seg.name}")
            mask[deleted] = False
            live.append(mask)
        index._state = _State.of(segments, live, manifest["generation"])
        index._path, index._mmap = path, mmap
        _sweep_if_idle(path)  # debris of a writer that died (disk full, killed): removed when nobody writes
        return index

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this in-memory index to directory ``path`` (new or empty of any index) and bind it there."""
        path = Path(path)
        if self._path is not None:
            if path.resolve() == self._path.resolve():
                return  # already durable
            raise IndexStateError(f"this index is bound to {self._path}; open a new PageIndex to copy it elsewhere")
        path.mkdir(parents=True, exist_ok=True)
        with self._write_lock, writer_lock(path):
            if (path / MANIFEST).exists():
                raise IndexStateError(f"{path} already holds an index; use PageIndex.open({str(path)!r})")
            st = self._state
            for seg in st.segments:
                seg.write(path)
            write_json(path / MANIFEST, self._manifest(st.segments, st.live, st.generation + 1))
            _collect_garbage(path, {s.name for s in st.segments})
            self._state = _State(st.segments, st.live, st.where, st.generation + 1)
        self._path = path

    def refresh(self) -> bool:
        """Re-read the directory if another process changed it since; True when something changed."""
        if self._path is None or _read_manifest(self._path)["generation"] == self._generation:
            return False
        fresh = PageIndex.open(self._path, mmap=self._mmap, search_params=self.search_params,
                               build_memory_bytes=self.build_memory_bytes)
        with self._write_lock:
            self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k != "_write_lock"})
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
        st = self._state
        for page_id, (s, i) in st.where.items():
            h = st.segments[s].hashes[i]
            if h is not None:
                out.setdefault(h, page_id)
        return out

    def metadata(self, page_id: str) -> dict[str, Any]:
        st = self._state
        s, i = _locate(st, page_id)
        return dict(st.segments[s].metadata[i])

    def embedding(self, page_id: str) -> PageEmbedding:
        """The stored embedding of a page (vectors, patch rows, grid): what importance maps are made from."""
        st = self._state
        s, i = _locate(st, page_id)
        return st.segments[s].embedding(i)

    def stats(self) -> dict[str, Any]:
        """Counts per segment (kind, pages, live pages) and totals; vectors of tombstoned pages included."""
        st = self._state
        return {
            "pages": len(st.where),
            "vectors_stored": sum(s.n_vectors for s in st.segments),
            "segments": [{"name": s.name, "kind": s.kind, "pages": s.n_pages, "live": int(l.sum())}
                         for s, l in zip(st.segments, st.live)],
            "generation": st.generation,
        }

    # --- changes --------------------------------------------------------------------------------------
    def add(
        self, pages: Iterable[PageEmbedding], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> list[str]:
        """Index ``pages``; returns the ids added.

        ``metadata[i]`` (JSON-serialisable) is merged over ``pages[i].metadata``. A page whose id is already
        indexed (or repeated in this call) is skipped when both carry the same ``content_hash`` -- re-adding
        the same page is a no-op -- and raises DuplicatePageIdError otherwise, adding nothing. ``pages`` is read
        once: a generator is consumed page by page, and on an index bound to a directory vectors beyond
        ``build_memory_bytes`` go straight to disk (how a collection larger than RAM is loaded).
        """
        with self._write_lock:
            added = self._add(pages, metadata)
        if added:
            self.tidy()
        return added

    def adopt(self, segment_dirs: Sequence[str | os.PathLike[str]], *, tidy: bool = True) -> int:
        """Take over segments written elsewhere (``SegmentBuilder`` output, e.g. by distributed indexing workers)
        in one commit: each directory is moved into the index (a rename: keep them on the index's filesystem) and
        the manifest switches once to include them all. Returns the pages added.

        The segments must hold pages not already in the index; they are checked where they are, so a refused
        call moves nothing. A crash after a move and before the switch leaves an unreferenced segment directory
        that the index's next write removes."""
        if self._path is None:
            raise IndexStateError("adopt() needs an index bound to a directory (PageIndex.create/open)")
        dirs = [Path(d) for d in segment_dirs]
        if not dirs:
            return 0
        with self._write_lock:
            staged = [Segment.read(d) for d in dirs]
            dims = {s.dim for s in staged} | ({self._dim} if self._dim is not None else set())
            if len(dims) > 1:
                raise IndexStateError(f"segments of dims {sorted(dims)} cannot share one index (another embedder?)")
            known = [pid for s in staged for pid in s.ids if pid in self._where]
            if known:
                raise DuplicatePageIdError(f"already in the index: {known[:5]}{' ...' if len(known) > 5 else ''}")
            del staged  # they map files at the old paths: read again once moved
            segments = []
            for d in dirs:
                os.replace(d, self._path / d.name)
                segments.append(Segment.read(self._path / d.name))
            old_dim, self._dim = self._dim, dims.pop()
            try:
                self._commit([*self._segments, *segments],
                             [*self._live, *(np.ones(s.n_pages, dtype=bool) for s in segments)], [])
            except BaseException:
                self._dim = old_dim
                raise
        if tidy:
            self.tidy()
        return sum(s.n_pages for s in segments)

    def tidy(self) -> None:
        """Merge the smallest segments when there are more than ``max_segments`` (each costs a FAISS search per
        query). ``add`` and ``adopt`` call it after their commit: the pages are durable by then, and a merge that
        fails (another writer, a full disk) only leaves more segments behind, said in an ``IndexMergeWarning``."""
        try:
            with self._write_lock:
                self._maybe_merge()
        except (IndexStateError, OSError) as exc:
            logger.warning("minirerank: pages added; merging index segments failed and is retried on the next "
                           "change (%s)", exc)
            warnings.warn(f"minirerank: pages added; merging index segments failed ({exc})", IndexMergeWarning,
                          stacklevel=3)

    def _add(self, pages: Iterable[PageEmbedding], metadata: Sequence[Mapping[str, Any] | None] | None) -> list[str]:
        if metadata is not None:
            metadata = list(metadata)
            if hasattr(pages, "__len__") and len(metadata) != len(pages):
                raise ValueError(f"metadata has {len(metadata)} entries for {len(pages)} pages")
        dim = self._dim
        seen: dict[str, str | None] = {}
        builder = SegmentBuilder(self._segment_name(), self._ann, stage_in=self._path,
                                 memory_bytes=self.build_memory_bytes)
        n = 0
        try:
            for n, page in enumerate(pages, start=1):
                i = n - 1
                if not isinstance(page, PageEmbedding):
                    raise TypeError(f"pages[{i}] is a {type(page).__name__}, not a PageEmbedding")
                if metadata is not None and i >= len(metadata):
                    raise ValueError(f"metadata has {len(metadata)} entries for more pages")
                dim = dim or page.dim
                if page.dim != dim:
                    raise ValueError(f"page {page.page_id!r} has dim {page.dim}, the index has dim {dim}")
                if page.page_id in seen or page.page_id in self._where:
                    in_call = page.page_id in seen
                    require_same_content(page, in_call, seen[page.page_id] if in_call else self._hash_of(page.page_id))
                    continue
                meta = {**page.metadata, **dict((metadata[i] if metadata is not None else None) or {})}
                try:
                    canonical_json(meta)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"metadata of page {page.page_id!r} is not JSON-serialisable ({exc})") from exc
                seen[page.page_id] = page.content_hash
                builder.add(page.vectors.numpy(), page.patch_rows.numpy(), page.grid, page.page_id,
                            page.content_hash, meta)
            if metadata is not None and n != len(metadata):
                raise ValueError(f"metadata has {len(metadata)} entries for {n} pages")
            if builder.n_pages == 0:
                builder.abort()
                return []
            seg = builder.finish()
        except BaseException:
            builder.abort()
            raise
        old_dim, self._dim = self._dim, dim  # the manifest written by _commit records the dim
        try:
            self._commit([*self._segments, seg], [*self._live, np.ones(seg.n_pages, dtype=bool)], [seg])
        except BaseException:
            self._dim = old_dim
            raise
        return list(builder.ids)

    def delete(self, page_ids: Iterable[str], *, missing_ok: bool = False) -> int:
        """Remove pages (tombstones; space comes back at :meth:`compact`). Returns how many were removed.
        Unknown ids raise KeyError unless ``missing_ok``."""
        if isinstance(page_ids, str):
            page_ids = [page_ids]
        with self._write_lock:
            return self._delete(list(dict.fromkeys(page_ids)), missing_ok)

    def _delete(self, ids: list[str], missing_ok: bool) -> int:
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
        with self._write_lock:
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
            merged = Segment.merge(self._segment_name(), parts, self._ann, stage_in=self._path,
                                   memory_bytes=self.build_memory_bytes)
            segments.append(merged)
            live.append(np.ones(merged.n_pages, dtype=bool))
            written.append(merged)
        self._commit(segments, live, written)

    def _commit(self, segments: list[Segment], live: list[np.ndarray], written: list[Segment]) -> None:
        """Make (segments, live) the index's state: durably first when bound, then in memory."""
        generation = self._generation + 1
        try:
            self._commit_files(segments, live, written, generation)
        finally:
            for seg in written:  # a commit that failed before writing a staged segment: remove its staging
                seg.discard()
        if self._path is not None and self._mmap:  # serve new segments from their files, not from the RAM copy
            segments = [Segment.read(self._path / s.name) if s in written else s for s in segments]
        self._state = _State.of(segments, live, generation)

    def _commit_files(self, segments: list[Segment], live: list[np.ndarray], written: list[Segment],
                      generation: int) -> None:
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
                write_json(self._path / MANIFEST, self._manifest(segments, live, generation))
                _collect_garbage(self._path, {s.name for s in segments})

    def _manifest(self, segments: list[Segment], live: list[np.ndarray], generation: int) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "generation": generation,
            "dim": self._dim,
            "ann": self._ann.to_dict(),
            "search": {"k_prime": self.search_params.k_prime, "ef_search": self.search_params.ef_search,
                       "nprobe": self.search_params.nprobe,
                       # only when set: a manifest without it stays readable by earlier versions
                       **({"rescore": self.search_params.rescore} if self.search_params.rescore is not None else {})},
            "max_segments": self._max_segments,
            "segments": [{"name": s.name, "deleted": np.flatnonzero(~m).tolist()} for s, m in zip(segments, live)],
        }

    def _segment_name(self) -> str:
        # Random suffix: never collides with a half-written leftover of a killed writer.
        return f"seg-{self._generation + 1:06d}-{secrets.token_hex(4)}"

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
        rescore: int | None = None,
        exact: bool = False,
        with_embeddings: bool = False,
    ) -> list[SearchHit]:
        """Top ``k`` pages for a query embedding (Tq, D), best first, by exact MaxSim score.

        ``k_prime`` / ``ef_search`` / ``nprobe`` / ``rescore`` override :attr:`search_params` for this call;
        ``exact`` scores every page (ground truth; slow on large indexes); ``with_embeddings`` attaches each hit's
        stored embedding (what the pruning maps are made from). An empty index gives [].
        """
        q = self._query_array(query)
        k = check_positive_int("k", k)
        st = self._state  # one snapshot: a concurrent add or delete swaps in a new one, never changes this
        if not st.where:
            return []
        params = self.search_params.override(k_prime=k_prime, ef_search=ef_search, nprobe=nprobe, rescore=rescore)
        kp = params.k_prime_for(k)
        limit = None if params.rescore is None else max(int(params.rescore), k)
        scores, owners, approx = [], [], []
        for s, (seg, live) in enumerate(zip(st.segments, st.live)):
            if exact or seg.index is None:
                pages = np.flatnonzero(live)
                scores.append(seg.scores(q)[pages])
                owners.append(_owners(s, pages))
            elif limit is None:
                pages = seg.candidates(q, kp, params)
                pages = pages[live[pages]]
                scores.append(seg.scores(q, pages))
                owners.append(_owners(s, pages))
            else:
                pages, guess = seg.candidates(q, kp, params, approx=True)
                ok = live[pages]
                approx.append((_owners(s, pages[ok]), guess[ok]))
        if approx:
            where = np.concatenate([w for w, _ in approx], axis=1)
            best = np.sort(top_k(np.concatenate([g for _, g in approx]), limit))  # segment-major order kept
            where = where[:, best]
            for s in np.unique(where[0]).tolist():
                pages = where[1, where[0] == s]
                scores.append(st.segments[s].scores(q, pages))
                owners.append(_owners(s, pages))
        all_scores = np.concatenate(scores) if scores else np.empty(0, dtype=np.float32)
        where = np.concatenate(owners, axis=1) if owners else np.empty((2, 0), dtype=np.int64)
        hits = []
        for rank, j in enumerate(top_k(all_scores, k).tolist(), start=1):
            seg = st.segments[int(where[0, j])]
            i = int(where[1, j])
            emb = seg.embedding(i) if with_embeddings else None
            hits.append(SearchHit(seg.ids[i], float(all_scores[j]), rank, dict(seg.metadata[i]), emb))
        return hits

    def search_batch(self, queries: Sequence[QueryLike], k: int = 20, **kwargs: Any) -> list[list[SearchHit]]:
        return [self.search(q, k, **kwargs) for q in queries]

    def _query_array(self, query: QueryLike) -> np.ndarray:
        return as_query_array(query, self._dim)


def as_query_array(query: QueryLike, dim: int | None) -> np.ndarray:
    """A query embedding as a C-contiguous float32 (Tq, D) array; InvalidQueryError when it is not one."""
    if isinstance(query, str):
        raise InvalidQueryError("the index's search takes a query embedding; encode text with "
                                "PageEmbedder.encode_queries")
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
    if dim is not None and q.shape[1] != dim:
        raise InvalidQueryError(f"query embedding has dim {q.shape[1]}, the index has dim {dim}")
    if not np.isfinite(q).all():
        raise InvalidQueryError("query embedding contains NaN or inf")
    return np.ascontiguousarray(q)


def _owners(s: int, pages: np.ndarray) -> np.ndarray:
    """(2, n): segment number and local page number of each page."""
    return np.stack([np.full(len(pages), s, dtype=np.int64), np.asarray(pages, dtype=np.int64)])


def _locate(st: _State, page_id: str) -> tuple[int, int]:
    try:
        return st.where[page_id]
    except KeyError:
        raise KeyError(f"page {page_id!r} is not in the index") from None


def _sweep_if_idle(path: Path) -> None:
    """Remove the debris of dead writers when no writer holds the lock (never a live writer's files)."""
    try:
        with writer_lock(path, timeout=0):
            manifest = _read_manifest(path)
            _collect_garbage(path, {e["name"] for e in manifest["segments"]})
    except (LockTimeoutError, OSError, IndexStateError):
        pass  # someone is writing (their sweep will do it), or the directory is read-only


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexStateError(f"no index at {path} ({MANIFEST} not found)") from None
    except (OSError, ValueError) as exc:
        raise IndexStateError(f"{file}: unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(_FORMAT_NAME):
        raise IndexStateError(f"{file}: not a minirerank page index")
    # before format tags were unified, the version was a separate field: {"format": NAME, "version": 1}
    version = manifest.get("version") if manifest["format"] == _FORMAT_NAME else manifest["format"].rpartition("/")[2]
    if str(version) != str(VERSION):
        raise IndexStateError(f"{file}: format version {version!r}; this minirerank reads version {VERSION}")
    missing = {"generation", "dim", "ann", "search", "max_segments", "segments"} - set(manifest)
    if missing:
        raise IndexStateError(f"{file}: incomplete manifest (missing {sorted(missing)})")
    return manifest


def _collect_garbage(path: Path, keep: set[str]) -> None:
    """Remove segments no longer referenced and leftovers of killed writers (call under the writer lock).
    Readers that still map removed files keep working: POSIX frees them at their last close."""
    for entry in path.iterdir():
        name = entry.name
        if (name.startswith("seg-") and name not in keep) or name.startswith(".tmp-") or is_temp_name(name):
            if name.startswith(".tmp-") and build_in_progress(entry):
                continue  # a live process is building a large segment there (segment.SegmentBuilder)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
