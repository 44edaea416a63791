"""MiniRerank: a LlamaIndex node postprocessor that reranks page-image nodes with minirerank."""

from __future__ import annotations

import os
from typing import Any, List, Optional

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle

from minirerank_core import InvalidQueryError, Page

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
        return _page_from_url(str(image_url), page_id)
    resource = getattr(node, "image_resource", None)
    if resource is not None:
        if resource.data:
            return page_from_base64(resource.data, page_id=page_id, where="image_resource.data")
        if resource.path is not None:
            return page_from_path(resource.path, page_id=page_id, where="image_resource.path")
        if resource.url is not None:
            return _page_from_url(str(resource.url), page_id)
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


def _check_query(query_bundle: Optional[QueryBundle]) -> None:
    if query_bundle is None:
        raise InvalidQueryError("MiniRerank needs a query: pass query_bundle= or query_str=")
    if not isinstance(query_bundle.query_str, str) or not query_bundle.query_str.strip():
        raise InvalidQueryError(f"MiniRerank needs a non-empty query string, got {query_bundle.query_str!r}")


def _page_from_url(url: str, page_id: str) -> Page:
    if url[:5].lower() == "data:":
        return page_from_base64(url, page_id=page_id, where="image_url (data URL)")
    return page_from_path(local_path_from_url(url), page_id=page_id, where="image_url")


class MiniRerank(BaseNodePostprocessor):
    """Rerank page-image nodes with a minirerank model (point-wise MiniReranker or listwise ListwiseReranker).

    Nodes are read as ImageNode / ImageDocument (``image`` base64, ``image_path``, local ``image_url``) or
    through ``metadata["image_path"]`` / ``metadata["file_path"]``. Each returned node is a copy with the
    rerank score (a Python float; logit(yes) - logit(no) for point-wise models) as its score and the first
    stage's score kept in ``metadata["retrieval_score"]``. Nodes from MiniRerankRetriever carry the first
    stage's similarity map, used to prune visual tokens when the reranker's ``keep_ratio < 1``.

        reranker = MiniReranker.from_pretrained("path/to/checkpoint")
        postprocessor = MiniRerank(reranker, top_n=3)
        # or: MiniRerank(model="path/to/checkpoint", device="cuda", top_n=3)
        # or: MiniRerank(top_n=3) for the default model shipped with minirerank (when installed)
    """

    model: str = Field(description="Name of the reranker checkpoint (for events and traces).")
    top_n: Optional[int] = Field(default=5, description="Number of nodes to return (None = all).")
    score_threshold: Optional[float] = Field(default=None, description="Drop nodes scoring below this.")
    mode: str = Field(default="pointwise", description="'pointwise' (MiniReranker) or 'listwise' (ListwiseReranker).")
    batch_size: Optional[int] = Field(
        default=None, description="Candidates per model call in point-wise mode (None = all at once; the model batches internally)."
    )
    device: Optional[str] = Field(default=None, description="Device of the reranker ('cpu', 'cuda', 'cuda:1', ...).")
    keep_retrieval_score: bool = Field(default=True, description="Keep the first-stage score in metadata['retrieval_score'].")
    on_missing_image: str = Field(
        default="raise", description="A node without a readable page image: 'raise' or 'skip' (with a warning)."
    )

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
        keep_retrieval_score: bool = True,
        on_missing_image: str = "raise",
        callback_manager: Optional[CallbackManager] = None,
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
            keep_retrieval_score=keep_retrieval_score,
            on_missing_image=on_missing_image,
            callback_manager=callback_manager or CallbackManager(),
        )
        self._reranker = instance
        self._scorer = Scorer(instance, resolved_mode, batch_size)

    @classmethod
    def class_name(cls) -> str:
        return "MiniRerank"

    @property
    def reranker(self) -> Any:
        """The underlying MiniReranker / ListwiseReranker."""
        return self._reranker

    # --- shared steps -------------------------------------------------------------------------------
    def _prepare(self, nodes: List[NodeWithScore]):
        check_top_n(self.top_n)
        self._scorer.batch_size = check_batch_size(self.batch_size)
        pages, kept = collect_pages(
            nodes,
            lambda n, pid: node_page(n.node, pid),
            lambda n, i: n.node.node_id,
            check_policy(self.on_missing_image),  # type: ignore[arg-type]
            "node",
        )
        importance = [importance_array(nodes[i].node.metadata.get(IMPORTANCE_KEY)) for i in kept]
        check_importance(self._reranker, importance, [nodes[i].node.node_id for i in kept], "node")
        return pages, kept, importance

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

    def _finish(self, nodes: List[NodeWithScore], kept: list[int], ranked: list[tuple[int, float]]) -> List[NodeWithScore]:
        out: List[NodeWithScore] = []
        for j, score in select(ranked, self.top_n, self.score_threshold):
            original = nodes[kept[j]]
            node = original.node.model_copy()  # never mutate the caller's (or the docstore's) node
            metadata = {k: v for k, v in original.node.metadata.items() if k != IMPORTANCE_KEY}
            if self.keep_retrieval_score:
                metadata["retrieval_score"] = None if original.score is None else float(original.score)
            node.metadata = metadata
            out.append(NodeWithScore(node=node, score=score))
        return out

    # --- sync / async -------------------------------------------------------------------------------
    def _postprocess_nodes(
        self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None
    ) -> List[NodeWithScore]:
        _check_query(query_bundle)
        if not nodes:
            return []
        with self._start(nodes, query_bundle) as event:
            pages, kept, importance = self._prepare(nodes)
            ranked = self._scorer.rank(query_bundle.query_str, pages, importance) if pages else []
            new_nodes = self._finish(nodes, kept, ranked)
            event.on_end(payload={EventPayload.NODES: new_nodes})
        dispatcher.event(ReRankEndEvent(nodes=new_nodes))
        return new_nodes

    async def _apostprocess_nodes(
        self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None
    ) -> List[NodeWithScore]:
        """Non-blocking: page files are read and hashed concurrently in threads, and the model runs batch by
        batch on one worker thread per reranker (concurrent queries queue there), so the event loop is never
        blocked. The model itself is synchronous PyTorch."""
        _check_query(query_bundle)
        if not nodes:
            return []
        with self._start(nodes, query_bundle) as event:
            pages, kept, importance = self._prepare(nodes)
            ranked = await self._scorer.arank(query_bundle.query_str, pages, importance) if pages else []
            new_nodes = self._finish(nodes, kept, ranked)
            event.on_end(payload={EventPayload.NODES: new_nodes})
        dispatcher.event(ReRankEndEvent(nodes=new_nodes))
        return new_nodes
