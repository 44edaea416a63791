"""RerankService: what the HTTP routes do, without the web framework.

A request goes through three places:

1. a short-lived I/O thread reads the documents into Pages (base64 decoded, files read under ``root``, image
   headers checked against the limits) and checks the query against the reranker's token limit;
2. the embedder's model thread (``glue.model_executor``) builds the pruning maps through an in-memory
   :class:`FirstStage` over the request's pages (as ``minirerank rerank --embedder`` does), or, for /v1/search,
   runs the index's first stage;
3. the reranker's model thread reranks; its page cache is shared by every request.

One worker thread per model: concurrent requests queue instead of fighting over the cores, and two requests of
different stages overlap. Every job checks the request's deadline before it starts, so a request that timed out
while queued is never run.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import math
import os
import threading
import time
import urllib.parse
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..candidates import Candidate
from ..errors import ConfigError, EmptyCandidatesError, ImageTooLargeError, InvalidImageError
from ..glue.images import NoImage, local_path_from_url
from ..glue.reranking import model_executor
from ..pages import Page
from ..pages.page import looks_like_base64_image
from ..rerankers.base import Reranker, RerankResult
from ..validation import check_positive_int, check_top_n
from .limits import (
    ImageBytesError,
    InvalidDocumentError,
    Limits,
    NoIndexError,
    PathOutsideRootError,
    RequestTimeoutError,
    ServerBusyError,
    TooManyDocumentsError,
)
from .metrics import Metrics, cache_gauges
from .schemas import (
    BilledUnits,
    DocumentObject,
    Meta,
    RerankRequest,
    RerankResponse,
    RerankResultItem,
    SearchRequest,
    SearchResponse,
    SearchResultRow,
    Usage,
)

if TYPE_CHECKING:
    from ..pipeline import RerankPipeline
    from ..retrieval.embedder import PageEmbedder
    from ..retrieval.embedding import PageEmbedding

T = TypeVar("T")
_URLSAFE = str.maketrans("-_", "+/")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")


def sigmoid(x: float) -> float:
    """RerankResult.probability's formula: P(positive) for a yes/no head, in [0, 1]."""
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


class CachedEmbedder:
    """A PageEmbedder whose page embeddings are remembered by content (an LRU bounded in bytes), so pages sent
    again in later requests are not embedded again. Queries are always encoded. Everything else is delegated."""

    def __init__(self, embedder: PageEmbedder, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.embedder = embedder
        self.max_bytes = max_bytes
        self._lru: OrderedDict[str, PageEmbedding] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.embedder, name)

    def encode_query(self, query: str) -> Any:
        return self.embedder.encode_query(query)

    def encode_pages(self, pages: Sequence[Page], batch_size: int = 4, show_progress: bool = False) -> list[PageEmbedding]:
        found: dict[int, PageEmbedding] = {}
        with self._lock:
            for i, p in enumerate(pages):
                e = self._lru.get(p.content_hash)
                if e is not None:
                    self._lru.move_to_end(p.content_hash)
                    found[i] = e
            self.stats["hits"] += len(found)
            self.stats["misses"] += len(pages) - len(found)
        todo = [p for i, p in enumerate(pages) if i not in found]
        fresh = iter(self.embedder.encode_pages(todo, batch_size=batch_size, show_progress=show_progress) if todo else [])
        out = []
        for i, p in enumerate(pages):
            if i in found:  # same content under this request's id and metadata
                out.append(dataclasses.replace(found[i], page_id=p.id, metadata=dict(p.metadata)))
                continue
            e = next(fresh)
            out.append(e)
            self._remember(p.content_hash, e)
        return out

    def _remember(self, key: str, e: PageEmbedding) -> None:
        size = e.vectors.numel() * e.vectors.element_size() + e.patch_rows.numel() * 8
        with self._lock:
            if key in self._lru or size > self.max_bytes:
                return
            self._lru[key] = e
            self._nbytes += size
            while self._nbytes > self.max_bytes:
                _, old = self._lru.popitem(last=False)
                self._nbytes -= old.vectors.numel() * old.vectors.element_size() + old.patch_rows.numel() * 8


class RerankService:
    """The reranker (and optionally an embedder for pruning maps, and a pipeline for /v1/search), the limits,
    and the request handling. ``root``: the only directory whose files a document may name."""

    def __init__(
        self,
        reranker: Reranker,
        *,
        embedder: PageEmbedder | None = None,
        pipeline: RerankPipeline | None = None,
        root: str | os.PathLike[str] | None = None,
        limits: Limits | None = None,
    ) -> None:
        if not isinstance(reranker, Reranker):
            raise ConfigError(f"the server needs a minirerank Reranker, got {type(reranker).__name__}")
        if embedder is None and reranker.pruning.prunes_at_index_time:
            raise ConfigError(
                f"index_keep_ratio={reranker.pruning.index_keep_ratio:g} prunes pages with the first stage's maps "
                "before the prefill: serve it with an embedder (--embedder or --index), or set index_keep_ratio=1")
        self.reranker = reranker
        self.embedder = embedder
        self.cached_embedder = CachedEmbedder(embedder) if embedder is not None else None
        self.pipeline = pipeline
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ConfigError(f"root {root} is not a directory")
        self.limits = limits or Limits()
        self.metrics = Metrics()
        self.pending = 0  # requests admitted on the model routes (running or queued); event-loop only
        self.ready = False  # set by the app's lifespan
        self.draining = False  # set when shutdown begins: /ready answers 503, new model requests are refused

    @property
    def model_name(self) -> str:
        return self.reranker.name

    # --- admission and threads ------------------------------------------------------------------------------
    def admit(self) -> None:
        """Count a request in, or refuse it (ServerBusyError) when ``max_pending`` are admitted or we are draining."""
        if self.draining:
            raise ServerBusyError("the server is shutting down; retry on another instance")
        if self.pending >= self.limits.max_pending:
            raise ServerBusyError(f"{self.pending} requests are already queued or running (max_pending="
                                  f"{self.limits.max_pending}); retry shortly")
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1

    async def _on(self, owner: Any, deadline: float, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on ``owner``'s model thread, unless the deadline passed while it was queued."""

        def job() -> T:
            if time.monotonic() > deadline:
                raise RequestTimeoutError(f"the request waited past its {self.limits.request_timeout_s:g} s limit "
                                          "(request_timeout_s) in the model queue")
            return fn(*args)

        # a cancelled await (the request timed out) cancels the job too when it has not started
        return await asyncio.wrap_future(model_executor(owner).submit(job))

    async def run(self, coro_fn: Callable[[float], Any]) -> Any:
        """Admit, run ``coro_fn(deadline)`` within the request time limit, release."""
        self.admit()
        limit = self.limits.request_timeout_s
        try:
            return await asyncio.wait_for(coro_fn(time.monotonic() + limit), timeout=limit)
        except RequestTimeoutError:
            raise
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"no answer within {limit:g} s (request_timeout_s)") from None
        finally:
            self.release()

    # --- reading documents -------------------------------------------------------------------------------------
    def read_documents(self, query: str, documents: Sequence[Any]) -> tuple[str, list[Page], list[int]]:
        """(checked query, distinct pages, position in those pages of each document). Runs in an I/O thread."""
        n = len(documents)
        if n > self.limits.max_documents:
            raise TooManyDocumentsError(f"{n} documents, over the limit of {self.limits.max_documents} per request "
                                        "(max_documents); split them over several requests")
        if n == 0:
            raise EmptyCandidatesError("documents is empty: send at least one page image")
        query = self.reranker.check_query(query)  # the token limit, before any image is decoded
        pages: list[Page] = []
        slots: list[int] = []
        seen: dict[str, int] = {}
        for i, doc in enumerate(documents):
            page = self.document_page(doc, i)
            key = page.content_hash  # the same image twice is scored once
            if key not in seen:
                seen[key] = len(pages)
                pages.append(page)
            slots.append(seen[key])
        return query, pages, slots

    def document_page(self, doc: Any, i: int) -> Page:
        """One document as a Page: a data URL or base64 image, a page id of the index, or a file under ``root``."""
        where = f"documents[{i}]"
        if isinstance(doc, DocumentObject):
            if (doc.image is None) == (doc.text is None):
                raise InvalidDocumentError(f"{where}: give exactly one of 'image' or 'text'")
            value, where = (doc.image, f"{where}.image") if doc.image is not None else (doc.text, f"{where}.text")
        else:
            value = doc
        if not isinstance(value, str) or not value.strip():
            raise InvalidDocumentError(f"{where}: empty document")
        if value[:5].lower() == "data:":
            head, _, payload = value.partition(",")
            if not head[5:].lower().startswith("image/"):
                raise InvalidDocumentError(f"{where}: a data URL must hold an image (data:image/...), got {head[:40]!r}")
            return self._from_base64(value, payload, where)
        if self.pipeline is not None and value in self.pipeline.index:
            return self.pipeline.page(value)
        low = value[:8].lower()
        if low.startswith(("http://", "https://")):
            raise InvalidDocumentError(f"{where}: the server never downloads images; send the image as base64 or a "
                                       "data URL")
        if low.startswith("file://"):
            try:
                return self._from_path(local_path_from_url(value), where)
            except NoImage as exc:
                raise PathOutsideRootError(f"{where}: {exc}") from None
        if looks_like_base64_image(value):
            return self._from_base64(value, value, where)
        if self.root is not None:
            return self._from_path(value, where)
        if "/" in value or "\\" in value or value.lower().endswith(_IMAGE_SUFFIXES):
            raise PathOutsideRootError(f"{where}: local paths are read only under a --root the server was started "
                                       "with; send the image as base64 or a data URL")
        index = "a page id of the server's index, " if self.pipeline is not None else ""
        raise InvalidDocumentError(f"{where}: not an image: expected a data URL or base64 image, {index}or "
                                   f"{{'image': ...}} (got {value[:40]!r})")

    def _from_base64(self, text: str, payload: str, where: str) -> Page:
        approx = len(payload) * 3 // 4  # decoded size, known before decoding
        if approx > self.limits.max_image_bytes:
            raise ImageBytesError(f"{where}: image is ~{approx:,} bytes, over the limit of "
                                  f"{self.limits.max_image_bytes:,} (max_image_bytes)")
        data = _decode(text, where)
        self._check_header(io.BytesIO(data), where)
        return self._decodable(Page.from_bytes(data, max_image_pixels=self.limits.max_image_pixels), where)

    def _from_path(self, value: str, where: str) -> Page:
        if self.root is None:
            raise PathOutsideRootError(f"{where}: local paths are read only under a --root the server was started with")
        path = Path(value)
        path = (path if path.is_absolute() else self.root / path).resolve()
        if not path.is_relative_to(self.root):
            raise PathOutsideRootError(f"{where}: {value!r} is outside the server's root directory")
        if not path.is_file():
            raise InvalidDocumentError(f"{where}: not an image (data URL, base64), a page id of the index, or a file "
                                       f"under the server's root (got {value[:40]!r})")
        size = path.stat().st_size
        if size > self.limits.max_image_bytes:
            raise ImageBytesError(f"{where}: {value!r} is {size:,} bytes, over the limit of "
                                  f"{self.limits.max_image_bytes:,} (max_image_bytes)")
        with open(path, "rb") as fp:
            self._check_header(fp, where)
        return self._decodable(Page.from_path(path, max_image_pixels=self.limits.max_image_pixels), where)

    @staticmethod
    def _decodable(page: Page, where: str) -> Page:
        """Decode once here (then drop the pixels), so a truncated or corrupt image is refused naming its document
        rather than failing a batch on a model thread."""
        try:
            page.image()
        except InvalidImageError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        return page

    def _check_header(self, fp: Any, where: str) -> None:
        """Width x height from the image header, before any pixel is decoded (the decompression-bomb guard)."""
        from PIL import Image

        try:
            with Image.open(fp) as img:
                w, h = img.size
        except Image.DecompressionBombError:
            w = h = self.limits.max_image_pixels  # over any limit we accept
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types on a bad header
            raise InvalidImageError(f"{where}: not a readable image ({exc})") from None
        if w * h > self.limits.max_image_pixels:
            raise ImageTooLargeError(f"{where}: image is {w}x{h} = {w * h:,} pixels, over the limit of "
                                     f"{self.limits.max_image_pixels:,} (max_image_pixels)")

    # --- /v1/rerank -----------------------------------------------------------------------------------------
    async def rerank(self, req: RerankRequest) -> RerankResponse:
        return await self.run(lambda deadline: self._rerank(req, deadline))

    async def _rerank(self, req: RerankRequest, deadline: float) -> RerankResponse:
        top_n = check_top_n(req.top_n)
        query, pages, slots = await asyncio.to_thread(self.read_documents, req.query, req.documents)
        warnings: list[str] = []
        if self.cached_embedder is not None:
            cands = await self._on(self.embedder, deadline, self._maps, query, pages)
        else:
            cands = [Candidate(p) for p in pages]
            if self.reranker.pruning.needs_maps and self.reranker.pruning.prunes_at_query_time:
                warnings.append("no pruning maps (the server has no embedder): every visual token is used")
        results, tokens = await self._on(self.reranker, deadline, self._rank, query, cands)
        self.metrics.add_documents(len(pages))
        members: dict[str, list[int]] = {}
        for i, s in enumerate(slots):
            members.setdefault(pages[s].content_hash, []).append(i)
        items = []
        for r in results:  # the reranker's order; a repeated document follows its first copy
            for i in members[cands[r.index].page.content_hash]:
                doc = req.documents[i] if req.return_documents else None
                items.append(RerankResultItem(
                    index=i, relevance_score=sigmoid(r.score), score=r.score,
                    document=None if doc is None else ({"text": doc} if isinstance(doc, str) else doc.model_dump(exclude_none=True))))
        n = len(req.documents)
        return RerankResponse(
            id=str(uuid.uuid4()), model=self.model_name, results=items[:top_n],
            meta=Meta(billed_units=BilledUnits(search_units=max(1, math.ceil(n / 100)), images=n), warnings=warnings),
            usage=Usage(total_tokens=tokens))

    def _maps(self, query: str, pages: list[Page]) -> list[Candidate]:
        """The pages as candidates with the query's maps on the reranker's grid, through an in-memory FirstStage
        (the handoff's one owner), as `minirerank rerank --embedder` builds them. Embedder thread."""
        from ..retrieval import FirstStage, PageIndex

        first_stage = FirstStage(self.cached_embedder, PageIndex())  # type: ignore[arg-type]
        first_stage.add(pages, show_progress=False)
        cands = first_stage.candidates(query, len(pages), self.reranker, exact=True)  # exact: every page comes back
        if len(cands) != len(pages):
            raise RuntimeError(f"the first stage returned {len(cands)} of {len(pages)} pages")
        return cands

    def _rank(self, query: str, cands: list[Candidate]) -> tuple[list[RerankResult], int]:
        """All candidates, best first, and the tokens read (query + visual tokens). Reranker thread."""
        # no embedder, no maps: every visual token (missing_maps="unpruned"), said in meta.warnings, not per request
        # in the log
        unpruned = self.cached_embedder is None and self.reranker.pruning.needs_maps
        results = self.reranker.rerank(query, cands, top_n=None, keep_ratio=1.0 if unpruned else None,
                                       missing_maps="unpruned")
        visual = sum(h * w for h, w in (self.reranker.visual_grid(c.page) for c in cands))
        query_tokens = len(self.reranker.pages.tokenizer(query, add_special_tokens=False)["input_ids"])
        return results, visual + query_tokens

    # --- /v1/search -----------------------------------------------------------------------------------------
    async def search(self, req: SearchRequest) -> SearchResponse:
        return await self.run(lambda deadline: self._search(req, deadline))

    async def _search(self, req: SearchRequest, deadline: float) -> SearchResponse:
        pipe = self.pipeline
        if pipe is None:
            raise NoIndexError("this server has no index: start it with `minirerank serve --index DIR` to search")
        k = check_positive_int("k", req.k)
        if k > self.limits.max_documents:
            raise TooManyDocumentsError(f"k={k} candidates, over the limit of {self.limits.max_documents} per "
                                        "request (max_documents)")
        top_n = check_top_n(req.top_n)
        t0 = time.perf_counter()
        # RerankPipeline.search, split over the two model threads
        query = await asyncio.to_thread(self.reranker.check_query, req.query)
        cands = await self._on(pipe.embedder, deadline, self._first_stage, query, k, req.rerank)
        if not cands:
            results: list[RerankResult] = []
        elif not req.rerank:
            results = [RerankResult(c.page_id, c.first_stage_score, c.first_stage_rank, i, c.page, c.first_stage_score,
                                    c.first_stage_rank, c.metadata) for i, c in enumerate(cands[:top_n])]
        else:
            results = await self._on(self.reranker, deadline, self.reranker.rerank, query, cands, top_n)
            self.metrics.add_documents(len(cands))
        seconds = time.perf_counter() - t0
        rows = [SearchResultRow(
            rank=r.rank, page_id=r.page_id, score=float(r.score), first_stage_score=float(r.first_stage_score),
            first_stage_rank=r.first_stage_rank, source=r.metadata.get("source"), page=r.metadata.get("page"),
            relevance_score=sigmoid(float(r.score))) for r in results]
        return SearchResponse(
            id=str(uuid.uuid4()), model=self.model_name, query=req.query, index=_where(pipe),
            pages_in_index=len(pipe.index), candidates=k, reranked=req.rerank, results=rows, seconds=round(seconds, 4))

    def _first_stage(self, query: str, k: int, rerank: bool) -> list[Candidate]:
        pipe = self.pipeline
        assert pipe is not None
        pipe.index.refresh()  # pages another process (`minirerank index`) committed since the last search
        return pipe.first_stage.candidates(query, k, self.reranker if rerank else None)

    # --- status --------------------------------------------------------------------------------------------
    def gauges(self) -> dict[str, tuple[str, str, float]]:
        out = cache_gauges(self.reranker.pages.store)
        out["minirerank_requests_pending"] = ("gauge", "Requests admitted on the model routes (running or queued).",
                                              self.pending)
        if self.cached_embedder is not None:
            out["minirerank_embedding_cache_hits_total"] = (
                "counter", "Request pages whose first-stage embedding was reused.", self.cached_embedder.stats["hits"])
        if self.pipeline is not None:
            out["minirerank_index_pages"] = ("gauge", "Pages in the served index.", len(self.pipeline.index))
        return out

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "kind": self.reranker.kind,
                "embedder": None if self.embedder is None else self.embedder.name,
                "index": None if self.pipeline is None else _where(self.pipeline),
                "pages_in_index": None if self.pipeline is None else len(self.pipeline.index)}


def _where(pipe: RerankPipeline) -> str | None:
    """The served workspace (as `minirerank search --json` names it), else the index directory; None in memory."""
    path = pipe.workspace or pipe.index.path
    return None if path is None else str(path)


def _decode(text: str, where: str) -> bytes:
    """The bytes of a data URL or base64 text (line-wrapped, URL-safe and unpadded base64 accepted, as Page does)."""
    if text[:5].lower() == "data:":
        head, _, text = text.partition(",")
        if not head.lower().endswith(";base64"):
            return urllib.parse.unquote_to_bytes(text)  # a percent-encoded data URL (RFC 2397)
    compact = "".join(text.split()).translate(_URLSAFE)
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"{where}: not valid base64 ({exc})") from None


def encode_image(data: bytes, mime: str = "image/png") -> str:
    """A data URL for ``data`` (what clients send as a document)."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


__all__ = ["CachedEmbedder", "RerankService", "encode_image", "sigmoid"]
