"""MiniRerank: a LangChain document compressor that reranks page-image documents with minirerank."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, PrivateAttr

from minirerank_core import InvalidQueryError, Page
from minirerank_core.pages.page import looks_like_base64_image

from minirerank_core.integration import (
    IMPORTANCE_KEY,
    NoImage,
    Scorer,
    build_reranker,
    check_batch_size,
    check_importance,
    check_policy,
    check_top_n,
    collect_pages,
    importance_array,
    is_image_file_name,
    local_path_from_url,
    model_name,
    select,
    page_from_base64,
    page_from_path,
)


def document_page(doc: Document, page_id: str) -> Page:
    """The page image of a document, from (in this order) ``metadata["image_path"]``, base64 or data-URL
    ``page_content``, ``metadata["image"]`` (base64), ``metadata["image_url"]`` (file:// or data: only), then
    ``metadata["file_path"]`` / ``metadata["source"]`` when they name an image file. Raises NoImage otherwise."""
    md = doc.metadata or {}
    if md.get("image_path"):
        return page_from_path(str(md["image_path"]), page_id=page_id, where="metadata['image_path']")
    content = doc.page_content or ""
    if content[:11].lower().startswith("data:image/"):
        return page_from_base64(content, page_id=page_id, where="page_content (data URL)")
    if looks_like_base64_image(content):
        return page_from_base64(content, page_id=page_id, where="page_content (base64)")
    if isinstance(md.get("image"), (str, bytes)) and md["image"]:
        return page_from_base64(md["image"], page_id=page_id, where="metadata['image'] (base64)")
    if md.get("image_url"):
        url = str(md["image_url"])
        if url[:5].lower() == "data:":
            return page_from_base64(url, page_id=page_id, where="metadata['image_url'] (data URL)")
        return page_from_path(local_path_from_url(url), page_id=page_id, where="metadata['image_url']")
    for key in ("file_path", "source"):
        value = md.get(key)
        if isinstance(value, str) and value and is_image_file_name(value):
            return page_from_path(value, page_id=page_id, where=f"metadata[{key!r}]")
    raise NoImage(
        "a text-only document: no metadata['image_path'], no base64 image in page_content or metadata['image'], "
        "no local metadata['image_url'], and no image file in metadata['file_path'] / ['source']"
    )


class MiniRerank(BaseDocumentCompressor):
    """Rerank page-image documents with a minirerank model (point-wise MiniReranker or listwise ListwiseReranker).

    Images come from ``metadata["image_path"]`` or a base64 / data-URL ``page_content`` (see
    :func:`document_page` for every source). Returned documents are copies, best first, with the same
    ``id`` and metadata plus ``metadata["relevance_score"]`` (a Python float; logit(yes) - logit(no) for
    point-wise models). Documents from MiniRerankRetriever carry the first stage's similarity map, used to
    prune visual tokens when the reranker's ``keep_ratio < 1``.

        compressor = MiniRerank(MiniReranker.from_pretrained("path/to/checkpoint"), top_n=3)
        # or: MiniRerank(model="path/to/checkpoint", device="cuda"), or MiniRerank() for the shipped default
        retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base)
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    model: str = Field(description="Name of the reranker checkpoint.")
    top_n: Optional[int] = Field(default=5, description="Number of documents to return (None = all).")
    score_threshold: Optional[float] = Field(default=None, description="Drop documents scoring below this.")
    mode: str = Field(default="pointwise", description="'pointwise' (MiniReranker) or 'listwise' (ListwiseReranker).")
    batch_size: Optional[int] = Field(default=None, description="Candidates per model call in point-wise mode (None = all).")
    device: Optional[str] = Field(default=None, description="Device of the reranker.")
    on_missing_image: str = Field(default="raise", description="'raise' or 'skip' (with a warning).")

    _reranker: Any = PrivateAttr()
    _scorer: Scorer = PrivateAttr()

    def __init__(
        self,
        reranker: Any = None,
        *,
        model: str | os.PathLike[str] | None = None,
        top_n: Optional[int] = 5,
        score_threshold: Optional[float] = None,
        mode: Optional[str] = None,
        batch_size: Optional[int] = None,
        device: Optional[str] = None,
        config: Any = None,
        cache_dir: str | os.PathLike[str] | None = None,
        on_missing_image: str = "raise",
    ) -> None:
        check_top_n(top_n)
        check_batch_size(batch_size)
        check_policy(on_missing_image)
        instance, resolved_mode = build_reranker(
            reranker, model, mode=mode, device=device, config=config, cache_dir=cache_dir  # type: ignore[arg-type]
        )
        current = getattr(getattr(instance, "config", None), "device", None)
        super().__init__(
            model=model_name(instance) if model is None else str(model),
            top_n=top_n,
            score_threshold=None if score_threshold is None else float(score_threshold),
            mode=resolved_mode,
            batch_size=batch_size,
            device=device if device is not None else (None if current is None else str(current)),
            on_missing_image=on_missing_image,
        )
        self._reranker = instance
        self._scorer = Scorer(instance, resolved_mode, batch_size)

    @property
    def reranker(self) -> Any:
        """The underlying MiniReranker / ListwiseReranker."""
        return self._reranker

    def _prepare(self, documents: Sequence[Document], query: str):
        if not isinstance(query, str) or not query.strip():
            raise InvalidQueryError(f"MiniRerank needs a non-empty query string, got {query!r}")
        check_top_n(self.top_n)
        self._scorer.batch_size = check_batch_size(self.batch_size)
        pages, kept = collect_pages(
            documents,
            document_page,
            lambda d, i: d.id if d.id is not None else f"#{i}",
            check_policy(self.on_missing_image),  # type: ignore[arg-type]
            "document",
        )
        importance = [importance_array(documents[i].metadata.get(IMPORTANCE_KEY)) for i in kept]
        ids = [documents[i].id if documents[i].id is not None else f"#{i}" for i in kept]
        check_importance(self._reranker, importance, ids, "document")
        return pages, kept, importance

    def _finish(self, documents: Sequence[Document], kept: list[int], ranked: list[tuple[int, float]]) -> list[Document]:
        out = []
        for j, score in select(ranked, self.top_n, self.score_threshold):
            doc = documents[kept[j]]
            metadata = {k: v for k, v in doc.metadata.items() if k != IMPORTANCE_KEY}
            metadata["relevance_score"] = score
            out.append(Document(page_content=doc.page_content, metadata=metadata, id=doc.id))
        return out

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Rerank ``documents`` for ``query``: at most ``top_n``, best first, scores in metadata["relevance_score"]."""
        if not documents:
            return []
        pages, kept, importance = self._prepare(documents, query)
        ranked = self._scorer.rank(query, pages, importance) if pages else []
        return self._finish(documents, kept, ranked)

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Non-blocking: page files are read and hashed concurrently in threads and the model runs batch by
        batch on one worker thread per reranker (concurrent queries queue there); the event loop is never
        blocked. The model itself is synchronous PyTorch."""
        if not documents:
            return []
        pages, kept, importance = self._prepare(documents, query)
        ranked = await self._scorer.arank(query, pages, importance) if pages else []
        return self._finish(documents, kept, ranked)
