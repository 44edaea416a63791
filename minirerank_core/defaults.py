"""The small default models that ship inside the package, and the sample corpus they are measured on.

    DEFAULT_RERANKER_DIR   Qwen3-VL miniReranker student (HF save_pretrained dir + minirerank_config.json)
    DEFAULT_TEACHER_DIR    the dense point-wise teacher of the recipe (benchmarks and comparisons; MODEL_CARD.md: which run)
    DEFAULT_LISTWISE_DIR   the listwise model, cached layout (README, Listwise reranking)
    DEFAULT_LISTWISE_SINGLE_PASS_DIR   the listwise model for ZipRerank's single pass (what
                           ListwiseReranker.from_pretrained(mode="single_pass") loads)
    DEFAULT_EMBEDDER_DIR   ColQwen3 first-stage embedder (same vision tower config and pixel budget)
    SAMPLE_CORPUS_DIR      a couple of dozen rendered pages (PNG) + queries.json, for the demo

The models were trained from scratch by minirerank_core.train (see MODEL_CARD.md): toy-sized, on rendered
Python-documentation pages. They demonstrate the method end to end offline; bring a real checkpoint for real use.
The rerankers load offline with `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained(dir)` (or
`MiniReranker.from_pretrained()`), the embedder with colpali-engine's `ColQwen3` / `ColQwen3Processor` (or
`PageEmbedder.from_pretrained(dir)`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .engine.config import RerankConfig
from .engine.settings import read_settings

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_RERANKER_DIR = ASSETS_DIR / "reranker"
DEFAULT_TEACHER_DIR = ASSETS_DIR / "teacher"
DEFAULT_LISTWISE_DIR = ASSETS_DIR / "listwise"
DEFAULT_LISTWISE_SINGLE_PASS_DIR = ASSETS_DIR / "listwise_single_pass"
DEFAULT_EMBEDDER_DIR = ASSETS_DIR / "embedder"
SAMPLE_CORPUS_DIR = ASSETS_DIR / "sample_corpus"


def default_rerank_config(**overrides) -> RerankConfig:
    """The configuration the shipped student was trained with (and is measured with in MODEL_CARD.md), with
    `overrides` (e.g. device="cuda", batch_size=64) applied on top."""
    return read_settings(DEFAULT_RERANKER_DIR).config.replace(**overrides)


def sample_queries() -> list[dict]:
    """The sample corpus's queries: [{"query", "relevant": [page ids], "demo": bool, ...}]."""
    return json.loads((SAMPLE_CORPUS_DIR / "queries.json").read_text(encoding="utf-8"))["queries"]


def sample_pages() -> list[Path]:
    """The sample corpus's page images (their file stems are the page ids used in queries.json)."""
    return sorted(SAMPLE_CORPUS_DIR.glob("*.png"))


__all__ = ["ASSETS_DIR", "DEFAULT_EMBEDDER_DIR", "DEFAULT_LISTWISE_DIR", "DEFAULT_LISTWISE_SINGLE_PASS_DIR", "DEFAULT_RERANKER_DIR", "DEFAULT_TEACHER_DIR",
           "SAMPLE_CORPUS_DIR", "default_rerank_config", "sample_pages", "sample_queries"]
