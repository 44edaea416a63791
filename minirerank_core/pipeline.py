"""RerankPipeline: ingest -> embed -> index -> (reranker page cache); search = first stage + pruned rerank.

    pipeline = RerankPipeline(PageEmbedder.from_pretrained(..., pixel_budget=reranker.pixel_budget),
                              reranker, PageIndex.create("my-index"), page_dir="my-pages")
    pipeline.add(["reports/", "scan.png"])
    results = pipeline.search("revenue growth in 2023", k=20, top_n=5)

Give the embedder the reranker's pixel budget when both share a vision tower (ColQwen3 + Qwen3-VL): the
importance maps then fall exactly on the reranker's visual tokens; otherwise they are resampled.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DuplicatePageIdError, InvalidImageError, InvalidQueryError
from .pages import Page
from .pages.ingest import Duplicate, IngestError, IngestReport, ingest, reload_page
from .retrieval.embedder import PageEmbedder
from .retrieval.importance import page_importance, query_importances
from .retrieval.index import PageIndex, SearchHit


@dataclass(frozen=True)
class PipelineResult:
    """One page of a pipeline search. ``score`` is the reranker's (the first stage's when rerank=False)."""

    page_id: str
    score: float
    rank: int
    first_stage_score: float
    first_stage_rank: int
    metadata: dict[str, Any] = field(default_factory=dict)
    page: Page | None = field(default=None, repr=False, compare=False)


class RerankPipeline:
    """First-stage embedder + FAISS page index, then the MLLM reranker over the top-k with pruning maps.

    page_dir: where rendered PDF pages are stored as PNG; with it (or with image files as input) a pipeline
    re-created over the same index finds its pages again. Without it, PDF pages are re-rendered from the
    source file when a new process needs them.
    """

    def __init__(
        self,
        embedder: PageEmbedder,
        reranker: Any,
        index: PageIndex | None = None,
        *,
        page_dir: str | os.PathLike[str] | None = None,
        dpi: float = 144.0,
        batch_size: int = 4,
        show_progress: bool = True,
    ) -> None:
        self.embedder = embedder
        self.reranker = reranker
        self.index = index if index is not None else PageIndex()
        self.page_dir = Path(page_dir) if page_dir is not None else None
        self.dpi = dpi
        self.batch_size = batch_size
        self.show_progress = show_progress
        self._pages: dict[str, Page] = {}  # pages seen by this object (no reload needed)
        self._grids: dict[str, tuple[int, int]] = {}  # reranker visual grid per page id

    # --- indexing -------------------------------------------------------------------------------------
    def add(self, items: Iterable[Any]) -> IngestReport:
        """Ingest files / folders (PDFs, images) and page-like items (Page, PIL image, bytes, base64), embed,
        index, and prefill the reranker's page cache. Returns the ingest report: pages added, per-item errors,
        duplicates skipped (same content as a page already indexed or earlier in the call)."""
        if isinstance(items, (str, os.PathLike, Page)):
            items = [items]
        paths: list[Any] = []
        direct: list[Page] = []
        problems: list[IngestError] = []
        for item in items:
            try:
                page = item if isinstance(item, Page) else None if isinstance(item, os.PathLike) else Page(item)
            except (InvalidImageError, TypeError) as exc:
                problems.append(IngestError(f"<{type(item).__name__}>", exc))
                continue
            if page is None or (page.source is not None and not isinstance(item, Page)):
                paths.append(item)  # a file or folder: ingest() expands, renders and reports it
            else:
                direct.append(page)
        seen = self.index.content_hashes()
        report = ingest(paths, dpi=self.dpi, image_dir=self.page_dir, known=seen, show_progress=self.show_progress)
        report.errors.extend(problems)
        seen.update((p.content_hash, p.id) for p in report.pages)
        for page in direct:
            try:
                digest = page.content_hash
            except InvalidImageError as exc:
                report.errors.append(IngestError(page.source or repr(page), exc))
                continue
            if digest in seen:
                report.duplicates.append(Duplicate(page.source or repr(page), None, digest, seen[digest]))
                continue
            seen[digest] = page.id
            report.pages.append(page)
        clash = [p.id for p in report.pages if p.id in self.index]
        if clash:  # same id, other content (same content was skipped above): refuse before any work
            raise DuplicatePageIdError(f"page ids already indexed with other content: {clash[:5]}")
        new = report.pages
        if not new:
            return report
        embeddings = self.embedder.encode_pages(new, batch_size=self.batch_size, show_progress=self.show_progress)
        # Path-backed pages record their file, so a later process can load them from the index alone.
        self.index.add(embeddings, [{"image_path": p.source} if p.source else {} for p in new])
        self._pages.update((p.id, p) for p in new)
        importance = None
        if self._index_keep_ratio() < 1.0:  # index-time pruning needs a query-independent map per page
            importance = [page_importance(e, self.grid(p)) for e, p in zip(embeddings, new)]
        self.reranker.index(new, importance=importance, show_progress=self.show_progress)
        return report

    # --- search ---------------------------------------------------------------------------------------
    def search(
        self, query: str, k: int = 20, top_n: int = 5, rerank: bool = True, **search_kwargs: Any
    ) -> list[PipelineResult]:
        """First-stage top ``k`` (exact MaxSim over FAISS candidates), reranked with importance maps; the best
        ``top_n``. ``search_kwargs`` (k_prime, nprobe, ef_search, exact) go to :meth:`PageIndex.search`."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidQueryError(f"query must be a non-empty string, got {query!r}")
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise ValueError(f"top_n must be a positive int, got {top_n!r}")
        if len(self.index) == 0:
            return []
        q = self.embedder.encode_query(query)
        hits = self.index.search(q, k, **search_kwargs)
        if not rerank:
            return [self._result(h, h.score, h.rank, self.page(h)) for h in hits[:top_n]]
        pages = [self.page(h) for h in hits]
        grids = [self.grid(p) for p in pages]
        embeddings = [self.index.embedding(h.page_id) for h in hits]
        if self._index_keep_ratio() < 1.0:  # a fresh reranker must learn each page's index-time map again
            self.reranker.index(pages, importance=[page_importance(e, g) for e, g in zip(embeddings, grids)])
        importance = query_importances(q, embeddings, grids)
        by_id = {h.page_id: h for h in hits}
        results = self.reranker.rerank(query, pages, top_n=top_n, importance=importance)
        return [self._result(by_id[r.page_id], r.score, r.rank, pages[r.index]) for r in results]

    def delete(self, page_ids: Sequence[str]) -> int:
        """Remove pages from the index (the reranker's cache entries simply stop being used)."""
        for page_id in page_ids:
            self._pages.pop(page_id, None)
            self._grids.pop(page_id, None)
        return self.index.delete(page_ids, missing_ok=True)

    # --- helpers --------------------------------------------------------------------------------------
    def _result(self, hit: SearchHit, score: float, rank: int, page: Page | None) -> PipelineResult:
        return PipelineResult(hit.page_id, float(score), rank, hit.score, hit.rank, hit.metadata, page)

    def page(self, hit: SearchHit) -> Page:
        page = self._pages.get(hit.page_id)
        if page is None:
            page = self._pages[hit.page_id] = reload_page(hit.page_id, hit.metadata)
        return page

    def grid(self, page: Page) -> tuple[int, int]:
        grid = self._grids.get(page.id)
        if grid is None:
            grid = self._grids[page.id] = tuple(self.reranker.visual_grid(page))
        return grid

    def _index_keep_ratio(self) -> float:
        config = getattr(self.reranker, "config", None)
        return float(getattr(config, "index_keep_ratio", 1.0))


__all__ = ["PipelineResult", "RerankPipeline"]
