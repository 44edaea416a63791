"""LangChain integration of minirerank: a document compressor (reranker) for page-image documents and a
retriever over a RerankPipeline's first-stage page index."""

from minirerank_core.integration import IMPORTANCE_KEY, MissingImageWarning, UnprunedWarning
from langchain_minirerank.compressor import MiniRerank, document_page
from langchain_minirerank.retriever import MiniRerankRetriever

__all__ = ["IMPORTANCE_KEY", "MiniRerank", "MiniRerankRetriever", "MissingImageWarning", "UnprunedWarning", "document_page"]
