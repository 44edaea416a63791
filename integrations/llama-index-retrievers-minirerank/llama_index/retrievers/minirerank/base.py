"""MiniRerankRetriever: first-stage page retrieval from a RerankPipeline's index, as LlamaIndex ImageNodes."""

from __future__ import annotations

import asyncio
from typing import Any, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle

from minirerank_core.candidates import Candidate
from minirerank_core.glue import RetrieverAdapter, page_label
from minirerank_core.glue.retrieval import HIDDEN_KEYS
from minirerank_core.validation import check_positive_int


class MiniRerankRetriever(BaseRetriever):
    """The first stage of minirerank (ColPali-family multi-vector embeddings, FAISS candidates, exact MaxSim)
    over a :class:`~minirerank_core.pipeline.RerankPipeline`'s page index, as a LlamaIndex retriever.

    Returns one ImageNode per page, best first: ``id_`` = the page id (stable across runs: document, page
    number and content hash), ``score`` = the MaxSim score, ``image_path`` = the page image file (or ``image``
    = base64 PNG for pages that have no file), and the page's index metadata (source, document, page, ...)
    plus ``retrieval_rank``. With ``include_importance`` each node also carries the first stage's maps on the
    reranker's visual-token grid (``metadata["minirerank_importance"]``, hidden from LLM and embed metadata),
    which :class:`llama_index.postprocessor.minirerank.MiniRerank` uses to prune.

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
        self._core = RetrieverAdapter(pipeline, include_importance)
        self._similarity_top_k = check_positive_int("similarity_top_k", similarity_top_k)
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @property
    def pipeline(self) -> Any:
        return self._core.pipeline

    @property
    def similarity_top_k(self) -> int:
        return self._similarity_top_k

    @similarity_top_k.setter
    def similarity_top_k(self, value: int) -> None:
        self._similarity_top_k = check_positive_int("similarity_top_k", value)

    def _node(self, c: Candidate) -> NodeWithScore:
        node = ImageNode(
            id_=c.page_id,
            text=page_label(c),
            metadata=self._core.metadata(c, with_score=False),
            excluded_llm_metadata_keys=list(HIDDEN_KEYS),
            excluded_embed_metadata_keys=list(HIDDEN_KEYS),
            **self._core.image(c),
            **({} if c.page.source else {"image_mimetype": "image/png"}),
        )
        return NodeWithScore(node=node, score=c.first_stage_score)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return [self._node(c) for c in self._core.candidates(query_bundle.query_str, self._similarity_top_k)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        """Non-blocking: query encoding, search and maps run on the embedder's model thread, and nodes (which may
        PNG-encode pages kept in memory) are built in a worker thread."""
        candidates = await self._core.acandidates(query_bundle.query_str, self._similarity_top_k)
        return await asyncio.to_thread(lambda: [self._node(c) for c in candidates])
