"""LlamaIndex node postprocessor for minirerank: rerank page-image nodes with a cached multimodal-LLM reranker,
and hand the pages to a multimodal LLM as images (nodes_to_messages)."""

from minirerank_core.errors import MissingImageWarning, UnprunedWarning
from minirerank_core.glue import IMPORTANCE_KEY, INDEX_IMPORTANCE_KEY
from llama_index.postprocessor.minirerank.base import MiniRerank, node_page
from llama_index.postprocessor.minirerank.messages import nodes_to_messages

__all__ = ["IMPORTANCE_KEY", "INDEX_IMPORTANCE_KEY", "MiniRerank", "MissingImageWarning", "UnprunedWarning", "node_page",
           "nodes_to_messages"]
