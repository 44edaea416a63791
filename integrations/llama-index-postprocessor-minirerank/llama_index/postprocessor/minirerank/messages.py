"""nodes_to_messages: the reranked page nodes as a chat turn for a multimodal LLM (images, not text labels)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, Optional, Union

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.schema import BaseNode, NodeWithScore

from minirerank_core.glue import DEFAULT_INSTRUCTION, EncodedImage, item_label, prompt_parts

from llama_index.postprocessor.minirerank.base import node_page


def _node(n: Union[NodeWithScore, BaseNode]) -> BaseNode:
    return n.node if isinstance(n, NodeWithScore) else n


def nodes_to_messages(
    query: str,
    nodes: Sequence[Union[NodeWithScore, BaseNode]],
    *,
    instruction: Optional[str] = DEFAULT_INSTRUCTION,
    on_missing_image: str = "raise",
) -> List[ChatMessage]:
    """One user ChatMessage for ``llm.chat``: the instruction, then for each node, in the order given (MiniRerank's
    output is best first), a TextBlock "[i] label" ("report.pdf, page 3", from ``metadata["source"]`` and
    ``metadata["page"]``, else the node id) followed by the page as an ImageBlock, then "Question: ...".

    Images are read like MiniRerank reads them (``image`` base64, ``image_path``, local ``image_url``,
    ``metadata["image_path"]``...) and sent as bytes: PNG / JPEG / GIF / WEBP files as they are, anything else
    as PNG. A node without a readable image raises InvalidImageError, or is left out with a MissingImageWarning
    with ``on_missing_image="skip"``. Scores are not sent.

        nodes = MiniRerank(reranker, top_n=3).postprocess_nodes(retriever.retrieve(query), query_str=query)
        answer = llm.chat(nodes_to_messages(query, nodes))
    """

    def block(part: Union[str, EncodedImage]) -> Union[TextBlock, ImageBlock]:
        if isinstance(part, EncodedImage):
            return ImageBlock(image=part.data, image_mimetype=part.mime_type)
        return TextBlock(text=part)

    parts = prompt_parts(query, list(nodes), lambda n, pid: node_page(_node(n), pid), lambda n, i: _node(n).node_id,
                         lambda n, i: item_label(_node(n).metadata, _node(n).node_id), "node",
                         instruction=instruction, on_missing_image=on_missing_image)
    return [ChatMessage(role=MessageRole.USER, blocks=[block(p) for p in parts])]


__all__ = ["nodes_to_messages"]
