"""Listwise page reranking (ZipRerank): one forward pass ranks a window of labelled pages.

    from minirerank_core.rerankers.listwise import ListwiseReranker, ListwiseConfig
"""

from __future__ import annotations

from .config import RANKGPT_LABELS, ListwiseConfig
from .prompt import DEFAULT_LISTWISE_TEMPLATE, ListwiseTemplate
from .reranker import ListwiseReranker
from .windows import Ranking, Window, sliding_rerank, window_schedule

__all__ = [
    "DEFAULT_LISTWISE_TEMPLATE", "RANKGPT_LABELS", "ListwiseConfig", "ListwiseReranker", "ListwiseTemplate", "Ranking",
    "Window", "sliding_rerank", "window_schedule",
]
