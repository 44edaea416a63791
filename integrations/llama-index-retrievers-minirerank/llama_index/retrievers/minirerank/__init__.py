"""LlamaIndex retriever over a minirerank RerankPipeline's first-stage page index."""

from llama_index.retrievers.minirerank.base import MiniRerankRetriever

__all__ = ["MiniRerankRetriever"]
