"""MiniRerankRetriever: first-stage page retrieval from a RerankPipeline's index, as LangChain Documents."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from minirerank_core.candidates import Candidate
from minirerank_core.glue import RetrieverAdapter, page_label
from minirerank_core.glue.retrieval import check_pipeline
from minirerank_core.validation import check_positive_int


class MiniRerankRetriever(BaseRetriever):
    """The first stage of minirerank (ColPali-family multi-vector embeddings, FAISS candidates, exact MaxSim)
    over a :class:`~minirerank_core.pipeline.RerankPipeline`'s page index, as a LangChain retriever.

    Returns one Document per page, best first: ``id`` = the page id (stable across runs), ``page_content`` = a
    short label ("report.pdf, page 3"), metadata = the page's index metadata (source, document, page, ...)
    plus ``retrieval_score`` / ``retrieval_rank``, the image as ``metadata["image_path"]`` (or base64 PNG in
    ``metadata["image"]`` for pages without a file), and with ``include_importance`` the first stage's maps on
    the reranker's grid (``metadata["minirerank_importance"]``) for :class:`MiniRerank` to prune with.

        retriever = ContextualCompressionRetriever(
            base_compressor=MiniRerank(pipeline.reranker, top_n=5),
            base_retriever=MiniRerankRetriever(pipeline=pipeline, k=20),
        )
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pipeline: Any = Field(description="A minirerank_core.pipeline.RerankPipeline.")
    k: int = Field(default=20, description="Number of pages to return.")
    include_importance: bool = Field(default=True, description="Attach the pruning maps for the reranker.")

    _core: RetrieverAdapter = PrivateAttr()

    @field_validator("pipeline")
    @classmethod
    def _check_pipeline(cls, value: Any) -> Any:
        return check_pipeline(value)

    @field_validator("k")
    @classmethod
    def _check_k(cls, value: int) -> int:
        return check_positive_int("k", value)

    def model_post_init(self, context: Any) -> None:
        self._core = RetrieverAdapter(self.pipeline, self.include_importance)

    def _document(self, c: Candidate) -> Document:
        return Document(page_content=page_label(c), metadata={**self._core.metadata(c), **self._core.image(c)}, id=c.page_id)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: Optional[int] = None, **kwargs: Any
    ) -> list[Document]:
        return [self._document(c) for c in self._core.candidates(query, self.k if k is None else k)]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, k: Optional[int] = None, **kwargs: Any
    ) -> list[Document]:
        """Non-blocking: query encoding, search and maps run on the embedder's model thread, and documents (which may
        PNG-encode pages kept in memory) are built in a worker thread."""
        candidates = await self._core.acandidates(query, self.k if k is None else k)
        return await asyncio.to_thread(lambda: [self._document(c) for c in candidates])
