"""LangChain integration of minirerank: a document compressor (reranker) for page-image documents, a retriever over
a RerankPipeline's first-stage page index, and documents_to_messages to hand the pages to a chat model as images."""

from minirerank_core.errors import MissingImageWarning, UnprunedWarning
from minirerank_core.glue import IMPORTANCE_KEY, INDEX_IMPORTANCE_KEY
from langchain_minirerank.compressor import MiniRerank, document_page
from langchain_minirerank.messages import documents_to_messages
from langchain_minirerank.retriever import MiniRerankRetriever

__all__ = ["IMPORTANCE_KEY", "INDEX_IMPORTANCE_KEY", "MiniRerank", "MiniRerankRetriever", "MissingImageWarning",
           "UnprunedWarning", "document_page", "documents_to_messages"]
