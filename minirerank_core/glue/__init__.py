"""Framework-free glue for the LlamaIndex and LangChain packages under ``integrations/`` (both depend on the core,
so one copy serves both and neither framework depends on the other).

    images.py     an image reference (path, file:// URL, base64 / data URL, bytes) -> Page; the missing-image policy
    reranking.py  building a reranker from an instance or a checkpoint; ranking items sync and async;
                  RerankAdapter, the small base both frameworks' rerankers share (fields, prepare/finish)
    retrieval.py  the first stage for the retrievers (FirstStage.candidates), maps in metadata, page labels
    answering.py  the reranked pages as one user turn for the answering model (labels and images in rank order)
"""

from __future__ import annotations

from .images import NoImage, collect_pages, is_image_file_name, local_path_from_url, page_from_base64, page_from_path
from .reranking import MODES, POLICIES, SCORE_SCALES, RerankAdapter, build_reranker, checkpoint_dir, model_executor
from .retrieval import IMPORTANCE_KEY, INDEX_IMPORTANCE_KEY, Base64Cache, RetrieverAdapter, maps_from_metadata, maps_to_metadata, page_label
from .answering import DEFAULT_INSTRUCTION, EncodedImage, encode_page, item_label, prompt_parts

__all__ = [
    "DEFAULT_INSTRUCTION", "IMPORTANCE_KEY", "INDEX_IMPORTANCE_KEY", "MODES", "POLICIES", "SCORE_SCALES", "Base64Cache",
    "EncodedImage", "NoImage", "RerankAdapter", "RetrieverAdapter", "build_reranker", "checkpoint_dir",
    "collect_pages", "encode_page", "is_image_file_name", "item_label", "local_path_from_url", "maps_from_metadata",
    "maps_to_metadata", "model_executor", "page_from_base64", "page_from_path", "page_label", "prompt_parts",
]
