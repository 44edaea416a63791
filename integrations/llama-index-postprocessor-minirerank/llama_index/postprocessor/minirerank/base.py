"""MiniRerank: a LlamaIndex node postprocessor that reranks page-image nodes with minirerank."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle

from minirerank_core import InvalidQueryError, Page
from minirerank_core.glue import (
    IMPORTANCE_KEY,
    INDEX_IMPORTANCE_KEY,
    NoImage,
    RerankAdapter,
    is_image_file_name,
    page_from_base64,
    page_from_path,
)
from minirerank_core.glue.images import page_from_url
from minirerank_core.glue.reranking import ScoreScale
from minirerank_core.validation import check_query

dispatcher = get_dispatcher(__name__)


def node_page(node: BaseNode, page_id: str) -> Page:
    """The page image of a node, from (in this order) ImageNode / ImageDocument ``image`` (base64),
    ``image_path``, ``image_url`` (file:// or data: only), a Node's ``image_resource``, then
    ``metadata["image_path"]`` and ``metadata["file_path"]`` (when it names an image file).
    Raises NoImage, saying why, when none is usable."""
    image = getattr(node, "image", None)
    if isinstance(image, (str, bytes)) and image:
        return page_from_base64(image, page_id=page_id, where="image (base64)")
    image_path = getattr(node, "image_path", None)
    if image_path:
        return page_from_path(image_path, page_id=page_id, where="image_path")
    image_url = getattr(node, "image_url", None)
    if image_url:
        return page_from_url(str(image_url), page_id=page_id, where="image_url")
    resource = getattr(node, "image_resource", None)
    if resource is not None:
        if resource.data:
            return page_from_base64(resource.data, page_id=page_id, where="image_resource.data")
        if resource.path is not None:
            return page_from_path(resource.path, page_id=page_id, where="image_resource.path")
        if resource.url is not None:
            return page_from_url(str(resource.url), page_id=page_id, where="image_resource.url")
    metadata = node.metadata or {}
    if metadata.get("image_path"):
        return page_from_path(str(metadata["image_path"]), page_id=page_id, where="metadata['image_path']")
    file_path = metadata.get("file_path")
    if file_path:
        if is_image_file_name(str(file_path)):
            return page_from_path(str(file_path), page_id=page_id, where="metadata['file_path']")
        raise NoImage(
            f"metadata['file_path'] {str(file_path)!r} is not an image file; ingest documents as page images "
            "(minirerank_core.pages.ingest or MiniRerankRetriever)"
        )
    raise NoImage(
        f"a text-only {type(node).__name__}: no image, image_path or image_url, and no metadata['image_path'] "
        "or image metadata['file_path']"
    )


def _with(keys: List[str], key: str) -> List[str]:
    return list(keys) if key in keys else [*keys, key]


class MiniRerank(RerankAdapter, BaseNodePostprocessor):
    """Rerank page-image nodes with a minirerank model (point-wise MiniReranker or listwise ListwiseReranker).

    Nodes are read as ImageNode / ImageDocument (``image`` base64, ``image_path``, local ``image_url``) or
    through ``metadata["image_path"]`` / ``metadata["file_path"]``. Each returned node is a copy whose score (a
    Python float) is, with ``score="probability"`` (the default), sigmoid of the reranker's score, in [0, 1]
    (point-wise: P(yes) against no; listwise: sigmoid of the page's label logit, in rank order but not a
    calibrated probability), or with ``score="logit"`` the raw score; ``score_threshold`` is on the same scale.
    With ``keep_retrieval_score`` the first stage's score is kept in ``metadata["retrieval_score"]`` (hidden from
    the LLM and the embedder). Nodes from MiniRerankRetriever carry the first stage's similarity maps, used to
    prune visual tokens when the reranker's ``keep_ratio < 1``; other nodes are scored unpruned (with an
    UnprunedWarning).

    ``to_dict`` / ``from_dict`` round-trip: ``model`` holds the checkpoint directory the reranker was loaded from
    (with its settings in ``config``), and ``from_dict`` reloads it by path. A reranker built in code from a
    model object has no checkpoint directory: ``from_dict`` then raises ConfigError (save it with
    ``save_pretrained`` first, or pass the instance: ``MiniRerank.from_dict(data, reranker=reranker)``).

        reranker = MiniReranker.from_pretrained("path/to/checkpoint")
        postprocessor = MiniRerank(reranker, top_n=3)
        # or: MiniRerank(model="path/to/checkpoint", device="cuda", top_n=3)
        # or: MiniRerank(top_n=3) for the default model shipped with minirerank
    """

    keep_retrieval_score: bool = Field(
        default=False, description="Keep the first-stage score in metadata['retrieval_score'] (hidden from the LLM).")

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
        keep_retrieval_score: bool = False,
        on_missing_image: str = "raise",
        callback_manager: Optional[CallbackManager] = None,
    ) -> None:
        instance, fields = self._fields(reranker, model, top_n=top_n, score=score, score_threshold=score_threshold,
                                        mode=mode, batch_size=batch_size, device=device, config=config,
                                        cache_dir=cache_dir, on_missing_image=on_missing_image)
        super().__init__(**fields, keep_retrieval_score=keep_retrieval_score,
                         callback_manager=callback_manager or CallbackManager())
        self._reranker = instance

    @classmethod
    def class_name(cls) -> str:
        return "MiniRerank"

    @classmethod
    def from_dict(cls, data: Dict[str, Any], **kwargs: Any) -> "MiniRerank":
        """The postprocessor ``to_dict`` described: its checkpoint reloaded by path with the stored settings.
        ``kwargs`` override stored fields; ``reranker=`` (an instance) replaces the stored checkpoint."""
        return cls(**cls._stored_fields({**data, **kwargs}, cls.class_name()))

    # --- framework mapping --------------------------------------------------------------------------
    @staticmethod
    def _query(query_bundle: Optional[QueryBundle]) -> str:
        if query_bundle is None:
            raise InvalidQueryError("MiniRerank needs a query: pass query_bundle= or query_str=")
        return check_query(query_bundle.query_str)

    def _items(self, nodes: List[NodeWithScore]):
        return (nodes, lambda n, pid: node_page(n.node, pid), lambda n, i: n.node.node_id, lambda n: n.node.metadata,
                "node")

    def _start(self, nodes: List[NodeWithScore], query_bundle: QueryBundle):
        dispatcher.event(
            ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=self.top_n or len(nodes), model_name=self.model)
        )
        return self.callback_manager.event(
            CBEventType.RERANKING,
            payload={
                EventPayload.NODES: nodes,
                EventPayload.MODEL_NAME: self.model,
                EventPayload.QUERY_STR: query_bundle.query_str,
                EventPayload.TOP_K: self.top_n,
            },
        )

    def _finish(self, nodes: List[NodeWithScore], ranked: list[tuple[int, float]], event) -> List[NodeWithScore]:
        out: List[NodeWithScore] = []
        for i, score in ranked:
            original = nodes[i]
            node = original.node.model_copy()  # never mutate the caller's (or the docstore's) node
            metadata = {k: v for k, v in original.node.metadata.items() if k not in (IMPORTANCE_KEY, INDEX_IMPORTANCE_KEY)}
            if self.keep_retrieval_score:
                metadata["retrieval_score"] = None if original.score is None else float(original.score)
                # for the caller, not for the answering model or an embedder (new lists: the copy is shallow)
                node.excluded_llm_metadata_keys = _with(node.excluded_llm_metadata_keys, "retrieval_score")
                node.excluded_embed_metadata_keys = _with(node.excluded_embed_metadata_keys, "retrieval_score")
            node.metadata = metadata
            out.append(NodeWithScore(node=node, score=score))
        event.on_end(payload={EventPayload.NODES: out})
        return out

    # --- sync / async -------------------------------------------------------------------------------
    def _postprocess_nodes(self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        query = self._query(query_bundle)
        if not nodes:
            return []
        with self._start(nodes, query_bundle) as event:
            new_nodes = self._finish(nodes, self._rank_items(query, *self._items(nodes)), event)
        dispatcher.event(ReRankEndEvent(nodes=new_nodes))
        return new_nodes

    async def _apostprocess_nodes(self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        """Non-blocking: page files are read and hashed in threads, and the model runs batch by batch on one worker
        thread per reranker (concurrent queries queue there). The model itself is synchronous PyTorch."""
        query = self._query(query_bundle)
        if not nodes:
            return []
        with self._start(nodes, query_bundle) as event:
            new_nodes = self._finish(nodes, await self._arank_items(query, *self._items(nodes)), event)
        dispatcher.event(ReRankEndEvent(nodes=new_nodes))
        return new_nodes
