"""RerankPipeline: ingest -> first stage (embed, index) -> reranker page cache; search = candidates + rerank.

    reranker = MiniReranker.from_pretrained(...)
    pipeline = RerankPipeline(PageEmbedder.for_reranker("path/to/colqwen3", reranker), reranker,
                              PageIndex.create("my-index"), page_dir="my-pages")
    pipeline.add(["reports/", "scan.png"])
    results = pipeline.search("revenue growth in 2023", k=20, top_n=5)

The handoff between the two stages is :meth:`FirstStage.candidates`; this class adds ingestion (PDFs, images,
folders, in-memory pages, with a report of what could not be read) and filling the reranker's page cache at
index time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .candidates import Candidate
from .errors import ConfigError, DuplicatePageIdError, InvalidImageError
from .fileio import format_tag, read_json, write_json, writer_lock
from .pages import Page
from .pages.ingest import Duplicate, IngestError, IngestReport, ingest
from .rerankers.base import Reranker, RerankResult
from .retrieval.embedder import PageEmbedder
from .retrieval.first_stage import FirstStage
from .retrieval.index import PageIndex
from .validation import check_positive_int, check_top_n


WORKSPACE_FILE = "minirerank.json"
WORKSPACE_FORMAT = format_tag("workspace", 1)
_OLD_WORKSPACE_FORMAT = "minirerank-cli-workspace"  # before format tags were unified; same fields


def read_workspace(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The models a workspace was built with (``{"embedder": path, "reranker": path or None}``), or {} if the
    directory holds no workspace file."""
    path = Path(directory) / WORKSPACE_FILE
    if not path.is_file():
        return {}
    return read_json(path, format=(WORKSPACE_FORMAT, _OLD_WORKSPACE_FORMAT))


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path


def _model_ref(name: str, default: Path) -> str | None:
    """How a workspace records a model: None for the shipped default (found again wherever the package is
    installed), an absolute path for a local checkpoint, a hub id as is; None for a model built in code."""
    path = Path(name)
    if path.exists():
        return None if path.resolve() == default.resolve() else str(path.resolve())
    return name if "/" in name else None


class RerankPipeline:
    """First-stage embedder + FAISS page index, then the MLLM reranker over the top-k with pruning maps.

    page_dir: where rendered PDF pages are stored as PNG; with it (or with image files as input) a pipeline
    re-created over the same index finds its pages again. Without it, PDF pages are re-rendered from the
    source file when a new process needs them.
    """

    def __init__(
        self,
        embedder: PageEmbedder,
        reranker: Reranker,
        index: PageIndex | None = None,
        *,
        page_dir: str | os.PathLike[str] | None = None,
        dpi: float = 144.0,
        batch_size: int = 4,
        show_progress: bool = True,
    ) -> None:
        self.first_stage = FirstStage(embedder, index)
        self.reranker = reranker
        # absolute: ingestion records page files by this path, read later from any working directory
        self.page_dir = Path(page_dir).resolve() if page_dir is not None else None
        self.workspace: Path | None = None  # set by open(): the directory whose minirerank.json names the models
        self.lock_timeout: float | None = 60.0  # seconds add() waits for another writer of the workspace
        self.dpi = dpi
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.show_progress = show_progress

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        reranker: Reranker | None = None,
        embedder: str | os.PathLike[str] | PageEmbedder | None = None,
        create: bool = False,
        lock_timeout: float | None = 60.0,
        **kwargs: Any,
    ) -> RerankPipeline:
        """A pipeline over a workspace directory (what ``minirerank index --index DIR`` builds): ``DIR/index`` (the
        page index), ``DIR/pages`` (rendered PDF pages), ``DIR/cache`` (the reranker's page cache) and
        ``DIR/minirerank.json`` (which models built it). ``reranker`` / ``embedder`` default to the workspace's
        (else the shipped defaults); ``create`` makes a new workspace. An embedder other than the one the index was
        built with is refused (its vectors live in another space). One writer at a time: :meth:`add` waits up to
        ``lock_timeout`` seconds (None: forever) for another process adding to the workspace, then raises
        LockTimeoutError before doing any work; searches never wait."""
        from .rerankers import MiniReranker
        from .retrieval.index import PageIndex

        root = Path(directory).resolve()
        saved = read_workspace(root)
        index_dir = root / "index"
        has_index = (index_dir / "manifest.json").exists()
        if not create and not (saved or has_index):
            raise ConfigError(f"no minirerank index in {root}; build one with `minirerank index DOCS --index {directory}`")
        if reranker is None:
            reranker = MiniReranker.from_pretrained(saved.get("reranker"), cache_dir=root / "cache")
        if not isinstance(embedder, PageEmbedder):
            from .defaults import DEFAULT_EMBEDDER_DIR

            default = str(DEFAULT_EMBEDDER_DIR.resolve())
            recorded = (saved.get("embedder") or default) if saved else None
            given = _abs(None if embedder is None else os.fspath(embedder))
            if recorded and given and given != recorded and has_index:
                raise ConfigError(f"{root} was indexed with the embedder {recorded}; pages embedded by another model "
                                  "would mix embedding spaces. Use a new workspace directory")
            embedder = PageEmbedder.for_reranker(given or recorded or default, reranker)
        if has_index:
            index = PageIndex.open(index_dir)
        else:
            root.mkdir(parents=True, exist_ok=True)
            index = PageIndex.create(index_dir)
        pipe = cls(embedder, reranker, index, page_dir=root / "pages", **kwargs)
        pipe.workspace, pipe.lock_timeout = root, lock_timeout
        return pipe

    def _record_workspace(self) -> None:
        """Write DIR/minirerank.json (which models built the index) once pages are committed."""
        if self.workspace is None:
            return
        from .defaults import DEFAULT_EMBEDDER_DIR, DEFAULT_RERANKER_DIR

        info = {"embedder": _model_ref(self.embedder.name, DEFAULT_EMBEDDER_DIR),
                "reranker": _model_ref(self.reranker.name, DEFAULT_RERANKER_DIR)}
        if read_workspace(self.workspace) != {"format": WORKSPACE_FORMAT, **info}:
            write_json(self.workspace / WORKSPACE_FILE, info, format=WORKSPACE_FORMAT)

    @property
    def embedder(self) -> PageEmbedder:
        return self.first_stage.embedder

    @property
    def index(self) -> PageIndex:
        return self.first_stage.index

    # --- indexing -------------------------------------------------------------------------------------
    def add(self, items: Iterable[Any]) -> IngestReport:
        """Ingest files / folders (PDFs, images) and page-like items (Page, PIL image, bytes, base64), embed,
        index, and prefill the reranker's page cache. Returns the ingest report: pages added, per-item errors,
        duplicates skipped (same content as a page already indexed or earlier in the call)."""
        if isinstance(items, (str, os.PathLike, Page)):
            items = [items]
        if self.workspace is None:
            return self._add(items)
        # One writer per workspace: wait for another add (another process) to finish, or fail before any work.
        with writer_lock(self.workspace, timeout=self.lock_timeout):
            self.index.refresh()  # pages the other writer committed meanwhile
            return self._add(items)

    def _add(self, items: Iterable[Any]) -> IngestReport:
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
                page.image()  # decode now: an unreadable or odd-shaped page belongs in the report, not in a crash
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
        if new:
            embeddings = self.first_stage.add(new, batch_size=self.batch_size, show_progress=self.show_progress)
            self._record_workspace()  # with the first commit: a killed run still leaves a usable workspace
            maps = self.first_stage.index_maps(new, self.reranker, embeddings)
            self.reranker.index(new, importance=maps, show_progress=self.show_progress)
        self._fill_cache([d.duplicate_of for d in report.duplicates])
        return report

    def _fill_cache(self, page_ids: Sequence[str]) -> None:
        """Already-indexed pages met again (a re-run after a killed one): prefill those whose cache entry is missing."""
        ids = [i for i in dict.fromkeys(page_ids) if i in self.index]
        if ids:
            pages = [self.first_stage.page(i) for i in ids]
            maps = self.first_stage.index_maps(pages, self.reranker)
            self.reranker.pages.fill(pages, maps, show_progress=self.show_progress)

    # --- search ---------------------------------------------------------------------------------------
    def search(self, query: str, k: int = 20, top_n: int | None = 5, rerank: bool = True,
               **search_kwargs: Any) -> list[RerankResult]:
        """First-stage top ``k`` (exact MaxSim over FAISS candidates), reranked with their pruning maps; the best
        ``top_n`` (None: all k). ``search_kwargs`` (k_prime, nprobe, ef_search, exact) go to PageIndex.search."""
        top_n = check_top_n(top_n)
        query = self.reranker.check_query(query)  # the token limit (or the cut) applies to both stages
        cands = self.first_stage.candidates(query, k, self.reranker if rerank else None, **search_kwargs)
        if not cands:
            return []
        if not rerank:
            return [RerankResult(c.page_id, c.first_stage_score, c.first_stage_rank, i, c.page, c.first_stage_score,
                                 c.first_stage_rank, c.metadata) for i, c in enumerate(cands[:top_n])]
        return self.reranker.rerank(query, cands, top_n=top_n)

    def candidates(self, query: str, k: int = 20, **search_kwargs: Any) -> list[Candidate]:
        """The first stage's candidates for this pipeline's reranker (maps on its grid), best first."""
        return self.first_stage.candidates(query, k, self.reranker, **search_kwargs)

    def delete(self, page_ids: Sequence[str]) -> int:
        """Remove pages from the index (the reranker's cache entries simply stop being used)."""
        self.first_stage.forget(page_ids)
        return self.index.delete(page_ids, missing_ok=True)

    def page(self, page_id: str) -> Page:
        """An indexed page by id (loaded from its image file or re-rendered from its PDF when needed)."""
        return self.first_stage.page(page_id)


__all__ = ["RerankPipeline"]
