"""First stage: ColPali-family page embeddings, a FAISS multi-vector page index, and pruning importance maps.

    embedder = PageEmbedder.from_pretrained("path/to/colqwen3", pixel_budget=reranker.pixel_budget)
    index = PageIndex.create("my-index")                    # or PageIndex.open("my-index")
    index.add(embedder.encode_pages(pages))
    hits = index.search(embedder.encode_query("revenue growth"), k=20)
    importance = query_importance(query_embedding, index.embedding(hit.page_id), reranker.visual_grid(page))
"""

from __future__ import annotations

from .ann import INDEX_TYPES, AnnConfig, SearchParams
from .embedder import PageEmbedder
from .embedding import PageEmbedding
from .importance import page_importance, query_importance, query_importances, salience_map, similarity_map, to_grid
from .index import PageIndex, SearchHit
from .maxsim import maxsim_scores

__all__ = [
    "INDEX_TYPES",
    "AnnConfig",
    "PageEmbedder",
    "PageEmbedding",
    "PageIndex",
    "SearchHit",
    "SearchParams",
    "maxsim_scores",
    "page_importance",
    "query_importance",
    "query_importances",
    "salience_map",
    "similarity_map",
    "to_grid",
]
