"""minirerank: fast multimodal page reranking for RAG.

    from minirerank_core import MiniReranker, RerankConfig, Page
"""

from __future__ import annotations

from .engine.config import RerankConfig
from .engine.prompt import DEFAULT_TEMPLATE, MONOQWEN_TEMPLATE, MLPHead, PromptTemplate, YesNoHead
from .errors import (
    ConfigError,
    DuplicatePageIdError,
    EmptyCandidatesError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidQueryError,
    MiniRerankError,
    UnsupportedModelError,
)
from .pages import Page, PixelBudget
from .listwise import ListwiseConfig, ListwiseReranker
from .reranker import MiniReranker, RerankResult

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TEMPLATE", "MONOQWEN_TEMPLATE", "ConfigError", "DuplicatePageIdError", "EmptyCandidatesError",
    "ImageTooLargeError", "InvalidImageError", "InvalidQueryError", "ListwiseConfig", "ListwiseReranker", "MLPHead", "MiniRerankError", "MiniReranker",
    "Page", "PixelBudget", "PromptTemplate", "RerankConfig", "RerankResult", "UnsupportedModelError", "YesNoHead",
]
