"""minirerank: fast multimodal page reranking for RAG."""

from __future__ import annotations

__version__ = "0.1.0"
