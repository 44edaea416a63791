"""minirerank: fast multimodal page reranking for RAG.

    from minirerank_core import MiniReranker, RerankConfig, Page

Layers, bottom up: ``pages`` (page images) · ``engine`` (the cached sparse math) · ``cache`` (page-KV stores) ·
``rerankers`` (point-wise and listwise over one page side) · ``retrieval`` (first stage: embedder, index, maps,
``FirstStage``) · ``pipeline`` · ``glue`` (framework-free pieces of the LlamaIndex / LangChain integrations) ·
``cli``. Training lives apart in ``train`` (imported only when used).
"""

from __future__ import annotations

from .candidates import Candidate, ImportanceMap
from .engine.config import RerankConfig
from .engine.prompt import (
    DEFAULT_TEMPLATE,
    JINA_M0_TEMPLATE,
    MONOQWEN_TEMPLATE,
    QWEN3_VL_RERANKER_TEMPLATE,
    JinaM0Head,
    MLPHead,
    PromptTemplate,
    QueryFirstTemplate,
    YesNoHead,
)
from .errors import (
    ConfigError,
    DiskFullError,
    DuplicatePageIdError,
    EmptyCandidatesError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidImportanceError,
    InvalidQueryError,
    MiniRerankError,
    ModelNotFoundError,
    UnprunedWarning,
    UnsupportedModelError,
    UntrainedLayoutWarning,
)
from .pages import Page, PixelBudget
from .rerankers import ListwiseConfig, ListwiseReranker, MiniReranker, Reranker, RerankResult

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TEMPLATE", "JINA_M0_TEMPLATE", "MONOQWEN_TEMPLATE", "QWEN3_VL_RERANKER_TEMPLATE", "Candidate", "JinaM0Head",
    "ModelNotFoundError", "QueryFirstTemplate", "ConfigError", "DiskFullError", "DuplicatePageIdError",
    "EmptyCandidatesError", "ImageTooLargeError", "ImportanceMap", "InvalidImageError", "InvalidImportanceError",
    "InvalidQueryError", "ListwiseConfig", "ListwiseReranker", "MLPHead", "MiniRerankError", "MiniReranker", "Page",
    "PixelBudget", "PromptTemplate", "RerankConfig", "RerankResult", "Reranker", "UnprunedWarning",
    "UnsupportedModelError", "UntrainedLayoutWarning", "YesNoHead",
]
