"""MiniRerankRetriever: first-stage page retrieval from a RerankPipeline's index, as LlamaIndex ImageNodes."""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle
from minirerank_core.integration import (
    IMPORTANCE_KEY,
    Base64Cache,
    Candidate,
    afirst_stage,
    check_k,
    check_pipeline,
    first_stage,
    page_label,
)

# bulky or machine-specific keys an LLM or an embedding model should not see
_HIDDEN_KEYS = [IMPORTANCE_KEY, "image_path", "render", "width", "height", "page_count", "retrieval_rank"]


class MiniRerankRetriever(BaseRetriever):
    """The first stage of minirerank (ColPali-family multi-vector embeddings, FAISS candidates, exact MaxSim)
    over a :class:`~minirerank_core.pipeline.RerankPipeline`'s page index, as a LlamaIndex retriever.

    Returns one ImageNode per page, best first: ``id_`` = the page id (stable across runs: document, page
    number and content hash), ``score`` = the MaxSim score, ``image_path`` = the page image file (or ``image``
    = base64 PNG for pages that have no file), and the page's index metadata (source, document, page, ...)
    plus ``retrieval_rank``. With ``include_importance`` each node also carries the query's similarity map on
    the reranker's visual-token grid under ``metadata["minirerank_importance"]`` (hidden from LLM and embed
    metadata), which :class:`llama_index.postprocessor.minirerank.MiniRerank` uses to prune.

        retriever = MiniRerankRetriever(pipeline, similarity_top_k=20)
        engine = RetrieverQueryEngine.from_args(retriever, node_postprocessors=[MiniRerank(pipeline.reranker, top_n=5)])
    """

    def __init__(
        self,
        pipeline: Any,
        similarity_top_k: int = 20,
        *,
        include_importance: bool = True,
        callback_manager: Optional[CallbackManager] = None,
        verbose: bool = False,
    ) -> None:
        self._pipeline = check_pipeline(pipeline)
        self._similarity_top_k = check_k(similarity_top_k, "similarity_top_k")
        self._include_importance = bool(include_importance)
        self._images = Base64Cache()
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @property
    def pipeline(self) -> Any:
        return self._pipeline

    @property
    def similarity_top_k(self) -> int:
        return self._similarity_top_k

    @similarity_top_k.setter
    def similarity_top_k(self, value: int) -> None:
        self._similarity_top_k = check_k(value, "similarity_top_k")

    def _node(self, c: Candidate) -> NodeWithScore:
        metadata = {**c.metadata, "page_id": c.page_id, "retrieval_rank": c.rank}
        if self._include_importance and c.importance is not None:
            metadata[IMPORTANCE_KEY] = c.importance
        image: dict[str, Any] = {"image_path": c.page.source} if c.page.source else {"image": self._images.get(c.page), "image_mimetype": "image/png"}
        node = ImageNode(
            id_=c.page_id,
            text=page_label(c),
            metadata=metadata,
            excluded_llm_metadata_keys=list(_HIDDEN_KEYS),
            excluded_embed_metadata_keys=list(_HIDDEN_KEYS),
            **image,
        )
        return NodeWithScore(node=node, score=c.score)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        candidates = first_stage(self._pipeline, query_bundle.query_str, self._similarity_top_k, self._include_importance)
        return [self._node(c) for c in candidates]

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        """Non-blocking: query encoding and search run on the embedder's model thread, any page prefill on the
        reranker's, and nodes (which may PNG-encode pages kept in memory) are built in a worker thread."""
        candidates = await afirst_stage(
            self._pipeline, query_bundle.query_str, self._similarity_top_k, self._include_importance
        )
        return await asyncio.to_thread(lambda: [self._node(c) for c in candidates])
