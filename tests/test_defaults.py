"""The shipped default models: present, small, loadable offline with plain transformers, and they score the
sample corpus the way queries.json records."""

from __future__ import annotations

import json
import os

import pytest
import torch

from minirerank_core import MiniReranker, defaults
from minirerank_core.engine.config import RerankConfig

pytestmark = pytest.mark.skipif(not (defaults.DEFAULT_RERANKER_DIR / "model.safetensors").exists(),
                                reason="shipped assets not built (python -m minirerank_core.train.export)")


def test_asset_directories_are_complete_and_small():
    for d in (defaults.DEFAULT_RERANKER_DIR, defaults.DEFAULT_EMBEDDER_DIR):
        for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (d / name).is_file(), d / name
    total = sum(f.stat().st_size for d in (defaults.DEFAULT_RERANKER_DIR, defaults.DEFAULT_EMBEDDER_DIR,
                                           defaults.SAMPLE_CORPUS_DIR) for f in d.iterdir())
    assert total < 60e6
    pages = defaults.sample_pages()
    assert 12 <= len(pages) <= 30
    ids = {p.stem for p in pages}
    queries = defaults.sample_queries()
    assert queries and all(set(q["relevant"]) <= ids for q in queries)
    assert any(q["demo"] for q in queries)


def test_default_config_is_what_the_student_was_trained_with():
    doc = json.loads((defaults.DEFAULT_RERANKER_DIR / "minirerank_config.json").read_text())
    cfg = defaults.default_rerank_config()
    assert isinstance(cfg, RerankConfig)
    assert cfg.query_positions == "shared" and cfg.shared_offset == doc["config"]["shared_offset"]
    assert list(cfg.band) == doc["config"]["band"] and cfg.exit_layer == doc["config"]["exit_layer"]
    assert cfg.keep_ratio == doc["config"]["keep_ratio"] < 1.0
    assert doc["training"]["stage"] == "student"
    assert defaults.default_rerank_config(batch_size=7).batch_size == 7
    # With no argument, the facade loads the shipped student with the settings and prompt it was trained with.
    rr = MiniReranker.from_pretrained()
    assert rr.config.replace(device="cpu") == cfg.replace(device="cpu")
    assert "{query}" in rr.template.query and (rr.template.positive, rr.template.negative) == ("yes", "no")


def test_models_load_offline_with_plain_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from colpali_engine.models import ColQwen3, ColQwen3Processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(str(defaults.DEFAULT_RERANKER_DIR), local_files_only=True)
    rr = AutoModelForImageTextToText.from_pretrained(str(defaults.DEFAULT_RERANKER_DIR), local_files_only=True)
    assert rr.config.model_type == "qwen3_vl" and proc.tokenizer.convert_tokens_to_ids("<|image_pad|>") >= 0
    emb = ColQwen3.from_pretrained(str(defaults.DEFAULT_EMBEDDER_DIR), local_files_only=True)
    eproc = ColQwen3Processor.from_pretrained(str(defaults.DEFAULT_EMBEDDER_DIR), local_files_only=True)
    assert emb.config.model_type == "qwen3_vl" and eproc.tokenizer.convert_tokens_to_ids("<|image_pad|>") >= 0
    # One vision tower config and one pixel budget: importance maps land on the reranker's own grid.
    assert emb.config.vision_config.to_dict() == rr.config.vision_config.to_dict()
    a = json.loads((defaults.DEFAULT_RERANKER_DIR / "processor_config.json").read_text())["image_processor"]["size"]
    b = json.loads((defaults.DEFAULT_EMBEDDER_DIR / "processor_config.json").read_text())["image_processor"]["size"]
    assert a == b


def test_shipped_pipeline_scores_the_sample_corpus_as_recorded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from minirerank_core import Page
    from minirerank_core.retrieval import FirstStage

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    mini = MiniReranker.from_pretrained()
    first_stage = FirstStage.from_pretrained(defaults.DEFAULT_EMBEDDER_DIR, reranker=mini)
    first_stage.add([Page(p, id=p.stem) for p in defaults.sample_pages()])
    doc = json.loads((defaults.SAMPLE_CORPUS_DIR / "queries.json").read_text())
    top_k = doc["accuracy"]["top_k"]
    for q in doc["queries"]:
        cands = first_stage.candidates(q["query"], top_k, mini)
        assert (cands[0].page_id in q["relevant"]) == q["first_stage_top1"]
        res = mini.rerank(q["query"], cands)
        assert all(r.score == r.score for r in res)  # finite
        assert (res[0].page_id in q["relevant"]) == q["mini_top1"], q["query"]


@pytest.mark.skipif(not (defaults.DEFAULT_LISTWISE_DIR / "model.safetensors").exists(), reason="no listwise asset")
def test_shipped_listwise_model_is_the_default_and_ranks_first_stage_candidates(monkeypatch):
    """The listwise student: the default of ListwiseReranker.from_pretrained() and mode="listwise", in the cached
    layout and prompt it was trained in; below the band's end it is the point-wise student's weights (frozen while
    it trained), and it ranks the first stage's candidates of the sample corpus."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file

    from minirerank_core import ListwiseReranker
    from minirerank_core.train.listwise import READBACK_TEMPLATE

    lw = ListwiseReranker.from_pretrained()
    assert lw.name == str(defaults.DEFAULT_LISTWISE_DIR)
    c = lw.config
    assert (c.mode, c.exit_layer, c.band, c.keep_ratio, c.prune_by, c.readout) == ("cached", 8, (2, 5), 0.5, "maps", "labels")
    assert lw.template == READBACK_TEMPLATE
    student = load_file(str(defaults.DEFAULT_RERANKER_DIR / "model.safetensors"))
    listwise = load_file(str(defaults.DEFAULT_LISTWISE_DIR / "model.safetensors"))
    layer = lambda name: int(name.split("layers.")[1].split(".")[0]) if "language_model.layers." in name else None  # noqa: E731
    frozen = [k for k in student if layer(k) is not None and layer(k) < 5]
    same = lambda k: torch.allclose(student[k].float(), listwise[k].float(), rtol=1e-3, atol=1e-5)  # noqa: E731 (fp16)
    assert frozen and all(same(k) for k in frozen)
    assert any(not same(k) for k in student if layer(k) == 7)

    _ranks_the_sample_corpus_candidates(lw)


@pytest.mark.skipif(not (defaults.DEFAULT_LISTWISE_SINGLE_PASS_DIR / "model.safetensors").exists(),
                    reason="no single-pass listwise asset")
def test_shipped_single_pass_model_is_the_single_pass_default(monkeypatch):
    """ListwiseReranker.from_pretrained(mode="single_pass") loads the single-pass model (not the cached one, which
    was never fitted for that layout: no UntrainedLayoutWarning), with the read-out it was built for, and ranks the
    sample corpus's first-stage candidates (QI-EI pruning: no maps needed)."""
    import warnings

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from minirerank_core import ListwiseReranker, UntrainedLayoutWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedLayoutWarning)
        lw = ListwiseReranker.from_pretrained(mode="single_pass")
    assert lw.name == str(defaults.DEFAULT_LISTWISE_SINGLE_PASS_DIR)
    c = lw.config
    assert (c.mode, c.keep_ratio, c.prune_by, c.readout) == ("single_pass", 0.5, "qiei", "labels")
    assert ListwiseReranker.from_pretrained().name == str(defaults.DEFAULT_LISTWISE_DIR)  # the default stays cached
    _ranks_the_sample_corpus_candidates(lw)


def _ranks_the_sample_corpus_candidates(reranker) -> None:
    """`reranker` reorders the first stage's top 10 of the sample corpus (with its maps) into distinct scores."""
    from minirerank_core import Page
    from minirerank_core.retrieval import FirstStage

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    mini = MiniReranker.from_pretrained()
    first_stage = FirstStage.from_pretrained(defaults.DEFAULT_EMBEDDER_DIR, reranker=mini)
    first_stage.add([Page(p, id=p.stem) for p in defaults.sample_pages()])
    q = defaults.sample_queries()[0]
    cands = first_stage.candidates(q["query"], 10, mini)
    res = reranker.rerank(q["query"], cands)
    assert sorted(r.page_id for r in res) == sorted(c.page_id for c in cands)
    assert all(r.score == r.score for r in res) and len({round(r.score, 4) for r in res}) > 1
