"""MiniRerank: a LangChain document compressor that reranks page-image documents with minirerank."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict

from minirerank_core import Page
from minirerank_core.glue import IMPORTANCE_KEY, INDEX_IMPORTANCE_KEY, NoImage, RerankAdapter, is_image_file_name, page_from_base64, page_from_path
from minirerank_core.glue.images import page_from_url
from minirerank_core.glue.reranking import ScoreScale
from minirerank_core.pages.page import looks_like_base64_image
from minirerank_core.validation import check_query


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
        return page_from_url(str(md["image_url"]), page_id=page_id, where="metadata['image_url']")
    for key in ("file_path", "source"):
        value = md.get(key)
        if isinstance(value, str) and value and is_image_file_name(value):
            return page_from_path(value, page_id=page_id, where=f"metadata[{key!r}]")
    raise NoImage(
        "a text-only document: no metadata['image_path'], no base64 image in page_content or metadata['image'], "
        "no local metadata['image_url'], and no image file in metadata['file_path'] / ['source']"
    )


class MiniRerank(RerankAdapter, BaseDocumentCompressor):
    """Rerank page-image documents with a minirerank model (point-wise MiniReranker or listwise ListwiseReranker).

    Images come from ``metadata["image_path"]`` or a base64 / data-URL ``page_content`` (see
    :func:`document_page` for every source). Returned documents are copies, best first, with the same
    ``id`` and metadata plus ``metadata["relevance_score"]`` (a Python float): with ``score="probability"``
    (the default) sigmoid of the reranker's score, in [0, 1] (point-wise: P(yes) against no; listwise: sigmoid
    of the page's label logit, in rank order but not a calibrated probability), with ``score="logit"`` the raw
    score; ``score_threshold`` is on the same scale. Documents from MiniRerankRetriever carry the first stage's
    similarity maps, used to prune visual tokens when the reranker's ``keep_ratio < 1``; others are scored
    unpruned (UnprunedWarning).

        compressor = MiniRerank(MiniReranker.from_pretrained("path/to/checkpoint"), top_n=3)
        # or: MiniRerank(model="path/to/checkpoint", device="cuda"), or MiniRerank() for the shipped default
        retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base)
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    def __init__(
        self,
        reranker: Any = None,
        *,
        model: str | os.PathLike[str] | None = None,
        top_n: Optional[int] = 5,
        score: ScoreScale = "probability",
        score_threshold: Optional[float] = None,
        mode: Optional[str] = None,
        batch_size: Optional[int] = None,
        device: Optional[str] = None,
        config: Any = None,
        cache_dir: str | os.PathLike[str] | None = None,
        on_missing_image: str = "raise",
    ) -> None:
        instance, fields = self._fields(reranker, model, top_n=top_n, score=score, score_threshold=score_threshold,
                                        mode=mode, batch_size=batch_size, device=device, config=config,
                                        cache_dir=cache_dir, on_missing_image=on_missing_image)
        super().__init__(**fields)
        self._reranker = instance

    def _items(self, documents: Sequence[Document]):
        return (documents, document_page, lambda d, i: d.id if d.id is not None else f"#{i}", lambda d: d.metadata,
                "document")

    @staticmethod
    def _finish(documents: Sequence[Document], ranked: list[tuple[int, float]]) -> list[Document]:
        out = []
        for i, score in ranked:
            doc = documents[i]
            metadata = {k: v for k, v in doc.metadata.items() if k not in (IMPORTANCE_KEY, INDEX_IMPORTANCE_KEY)}
            metadata["relevance_score"] = score
            out.append(Document(page_content=doc.page_content, metadata=metadata, id=doc.id))
        return out

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        """Rerank ``documents`` for ``query``: at most ``top_n``, best first, scores in metadata["relevance_score"]."""
        query = check_query(query)
        if not documents:
            return []
        return self._finish(documents, self._rank_items(query, *self._items(documents)))

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Callbacks | None = None) -> Sequence[Document]:
        """Non-blocking: page files are read and hashed in threads and the model runs batch by batch on one worker
        thread per reranker (concurrent queries queue there). The model itself is synchronous PyTorch."""
        query = check_query(query)
        if not documents:
            return []
        return self._finish(documents, await self._arank_items(query, *self._items(documents)))
