"""Rerankers: one interface (``Reranker``), point-wise and listwise as siblings over one page side.

    base.py        Reranker, RerankResult, Pruning: what every reranker is
    page_side.py   PageSide: model, pixel budget, visual grids, prefix KV, page prefill, page-KV cache
    loading.py     one checkpoint loader for both
    pointwise.py   MiniReranker (miniReranker: cached vision-first point-wise scoring)
    listwise/      ListwiseReranker (ZipRerank single pass, sliding windows, cached listwise)
"""

from __future__ import annotations

from .base import Pruning, Reranker, RerankResult
from .listwise import ListwiseConfig, ListwiseReranker
from .loading import Checkpoint, load_checkpoint
from .page_side import PageSide
from .pointwise import MiniReranker

__all__ = ["Checkpoint", "ListwiseConfig", "ListwiseReranker", "MiniReranker", "PageSide", "Pruning", "RerankResult",
           "Reranker", "load_checkpoint"]
