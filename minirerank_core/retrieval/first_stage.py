"""FirstStage: the one owner of the first-stage → reranker handoff.

    first_stage = FirstStage(embedder, index)
    candidates = first_stage.candidates("revenue growth", k=20, reranker=reranker)   # pages + maps on its grid
    results = reranker.rerank("revenue growth", candidates, top_n=5)

``candidates`` encodes the query, searches the index (exact MaxSim over FAISS candidates), loads each hit's page
(remembered from :meth:`add` in this process, else reloaded from the index metadata), and, given a reranker,
computes the pruning maps on that reranker's visual grid: the query's map for query-time pruning, and the page's
query-independent map when the reranker prunes at index time. Every caller (the pipeline, the retrievers, the
CLI, the report, the server, training export and the benchmarks) goes through here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..candidates import Candidate, ImportanceMap
from ..pages import Page, as_pages
from ..pages.ingest import reload_page
from ..validation import check_positive_int, check_query
from .embedder import PageEmbedder
from .embedding import PageEmbedding
from .importance import page_importance, query_importance
from .index import PageIndex, PageIndexBackend

if TYPE_CHECKING:
    from ..rerankers.base import Reranker


class FirstStage:
    """A page embedder and a multi-vector index (a :class:`PageIndex`, or any backend with its interface such as
    :class:`~minirerank_core.retrieval.qdrant.QdrantPageIndex`), and the pages behind the index's ids."""

    def __init__(self, embedder: PageEmbedder, index: PageIndexBackend | None = None) -> None:
        self.embedder = embedder
        self.index = index if index is not None else PageIndex()
        self._pages: dict[str, Page] = {}  # pages added in this process (no reload needed, even from bytes)

    @classmethod
    def from_pretrained(cls, embedder: str | os.PathLike[str], *, reranker: Reranker | None = None,
                        index: PageIndexBackend | None = None, **kwargs: Any) -> FirstStage:
        """Load a colpali-engine embedder; with ``reranker``, one that shares its vision tower (ColQwen + Qwen-VL)
        gets the reranker's pixel budget so the maps fall exactly on its visual tokens (others are resampled)."""
        return cls(PageEmbedder.for_reranker(embedder, reranker, **kwargs), index)

    def __len__(self) -> int:
        return len(self.index)

    # --- pages ----------------------------------------------------------------------------------------
    def page(self, page_id: str, metadata: dict[str, Any] | None = None) -> Page:
        """The page behind an index id: remembered, or loaded from its metadata (image file, or PDF page)."""
        page = self._pages.get(page_id)
        if page is None:
            page = self._pages[page_id] = reload_page(page_id, metadata if metadata is not None else self.index.metadata(page_id))
        return page

    def add(self, pages: Sequence[Any], *, batch_size: int = 4, show_progress: bool = False) -> list[PageEmbedding]:
        """Embed ``pages`` and add them to the index; path-backed pages record their file so another process
        can load them from the index alone."""
        pages = as_pages(pages)
        if not pages:
            return []
        embeddings = self.embedder.encode_pages(pages, batch_size=batch_size, show_progress=show_progress)
        self.index.add(embeddings, [{"image_path": p.source} if p.source else {} for p in pages])
        self._pages.update((p.id, p) for p in pages)
        return embeddings

    def forget(self, page_ids: Sequence[str]) -> None:
        for page_id in page_ids:
            self._pages.pop(page_id, None)

    # --- maps on a reranker's grid --------------------------------------------------------------------
    def index_maps(self, pages: Sequence[Page], reranker: Reranker,
                   embeddings: Sequence[PageEmbedding] | None = None) -> list[ImportanceMap] | None:
        """The query-independent map of each page on the reranker's grid when it prunes at index time, else None."""
        if not reranker.pruning.prunes_at_index_time:
            return None
        embeddings = embeddings if embeddings is not None else [self.index.embedding(p.id) for p in pages]
        return [page_importance(e, reranker.visual_grid(p)) for e, p in zip(embeddings, pages)]

    # --- the handoff ------------------------------------------------------------------------------------
    def candidates(self, query: str, k: int, reranker: Reranker | None = None, **search_kwargs: Any) -> list[Candidate]:
        """The top ``k`` pages for ``query``, best first, as Candidates. With ``reranker``, each carries the query's
        importance map on the reranker's grid (and its index-time map when the reranker prunes at index time).
        ``search_kwargs`` (k_prime, nprobe, ef_search, rescore, exact) go to the index's ``search`` (PageIndex or
        QdrantPageIndex)."""
        query = reranker.check_query(query) if reranker is not None else check_query(query)
        k = check_positive_int("k", k)
        if len(self.index) == 0:
            return []
        q = self.embedder.encode_query(query)
        # The maps need each hit's stored vectors: they come with the hits (one snapshot; one round trip to a
        # vector database) rather than one lookup per page.
        hits = self.index.search(q, k, with_embeddings=reranker is not None, **search_kwargs)
        index_time = reranker is not None and reranker.pruning.prunes_at_index_time
        out = []
        for h in hits:
            page = self.page(h.page_id, h.metadata)
            imp = idx = None
            if reranker is not None:
                emb = h.embedding if h.embedding is not None else self.index.embedding(h.page_id)
                grid = reranker.visual_grid(page)
                imp = query_importance(q, emb, grid)
                idx = page_importance(emb, grid) if index_time else None
            out.append(Candidate(page, float(h.score), int(h.rank), imp, idx, dict(h.metadata)))
        return out


__all__ = ["FirstStage"]
