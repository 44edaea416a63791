"""First stage: ColPali-family page embeddings, a FAISS multi-vector page index (or a Qdrant collection:
``retrieval.qdrant.QdrantPageIndex``, imported on use), index-time token pooling, and pruning importance maps.

    first_stage = FirstStage.from_pretrained("path/to/colqwen3", reranker=reranker, index=PageIndex.create("my-index"))
    first_stage.add(pages)
    candidates = first_stage.candidates("revenue growth", k=20, reranker=reranker)   # with maps on its grid
"""

from __future__ import annotations

from .ann import INDEX_TYPES, AnnConfig, SearchParams
from .embedder import PageEmbedder
from .embedding import PageEmbedding
from .first_stage import FirstStage
from .importance import page_importance, query_importance, query_importances, salience_map, similarity_map, to_grid
from .index import PageIndex, PageIndexBackend, SearchHit
from .maxsim import maxsim_scores
from .pooling import pool_embedding

__all__ = [
    "INDEX_TYPES",
    "AnnConfig",
    "FirstStage",
    "PageEmbedder",
    "PageEmbedding",
    "PageIndex",
    "PageIndexBackend",
    "SearchHit",
    "SearchParams",
    "maxsim_scores",
    "page_importance",
    "pool_embedding",
    "query_importance",
    "query_importances",
    "salience_map",
    "similarity_map",
    "to_grid",
]
