"""LlamaIndex node postprocessor for minirerank: rerank page-image nodes with a cached multimodal-LLM reranker."""

from minirerank_core.integration import IMPORTANCE_KEY, MissingImageWarning, UnprunedWarning
from llama_index.postprocessor.minirerank.base import MiniRerank, node_page

__all__ = ["IMPORTANCE_KEY", "MiniRerank", "MissingImageWarning", "UnprunedWarning", "node_page"]
