"""MiniRerankRetriever: first-stage page retrieval from a RerankPipeline's index, as LangChain Documents."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from minirerank_core.integration import IMPORTANCE_KEY, Base64Cache, Candidate, afirst_stage, check_k, check_pipeline, first_stage, page_label


class MiniRerankRetriever(BaseRetriever):
    """The first stage of minirerank (ColPali-family multi-vector embeddings, FAISS candidates, exact MaxSim)
    over a :class:`~minirerank_core.pipeline.RerankPipeline`'s page index, as a LangChain retriever.

    Returns one Document per page, best first: ``id`` = the page id (stable across runs), ``page_content`` = a
    short label ("report.pdf, page 3"), metadata = the page's index metadata (source, document, page, ...)
    plus ``retrieval_score`` / ``retrieval_rank``, the image as ``metadata["image_path"]`` (or base64 PNG in
    ``metadata["image"]`` for pages without a file), and with ``include_importance`` the query's similarity
    map on the reranker's grid in ``metadata["minirerank_importance"]`` for :class:`MiniRerank` to prune with.

        retriever = ContextualCompressionRetriever(
            base_compressor=MiniRerank(pipeline.reranker, top_n=5),
            base_retriever=MiniRerankRetriever(pipeline=pipeline, k=20),
        )
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pipeline: Any = Field(description="A minirerank_core.pipeline.RerankPipeline.")
    k: int = Field(default=20, description="Number of pages to return.")
    include_importance: bool = Field(default=True, description="Attach the pruning map for the reranker.")

    _images: Base64Cache = PrivateAttr(default_factory=Base64Cache)

    @field_validator("pipeline")
    @classmethod
    def _check_pipeline(cls, value: Any) -> Any:
        return check_pipeline(value)

    @field_validator("k")
    @classmethod
    def _check_k(cls, value: int) -> int:
        return check_k(value)

    def _document(self, c: Candidate) -> Document:
        metadata = {**c.metadata, "page_id": c.page_id, "retrieval_score": c.score, "retrieval_rank": c.rank}
        if c.page.source:
            metadata["image_path"] = c.page.source
        else:
            metadata["image"] = self._images.get(c.page)
        if self.include_importance and c.importance is not None:
            metadata[IMPORTANCE_KEY] = c.importance
        return Document(page_content=page_label(c), metadata=metadata, id=c.page_id)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: Optional[int] = None, **kwargs: Any
    ) -> list[Document]:
        k = self.k if k is None else check_k(k)
        return [self._document(c) for c in first_stage(self.pipeline, query, k, self.include_importance)]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, k: Optional[int] = None, **kwargs: Any
    ) -> list[Document]:
        """Non-blocking: query encoding and search run on the embedder's model thread, any page prefill on the
        reranker's, and documents (which may PNG-encode pages kept in memory) are built in a worker thread."""
        k = self.k if k is None else check_k(k)
        candidates = await afirst_stage(self.pipeline, query, k, self.include_importance)
        return await asyncio.to_thread(lambda: [self._document(c) for c in candidates])
