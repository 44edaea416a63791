"""FirstStage.candidates: the one first-stage → reranker handoff (hits, pages, maps on the reranker's grid)."""

from __future__ import annotations

import pytest
import torch

from minirerank_core import ConfigError, InvalidQueryError, MiniReranker, Page, RerankConfig
from minirerank_core import testing as T
from minirerank_core.retrieval import FirstStage, PageIndex
from minirerank_core.retrieval.embedder import PageEmbedder
from minirerank_core.retrieval.importance import page_importance, query_importance

QUERY = "annual revenue"


@pytest.fixture(scope="module")
def embedder():
    model, proc = T.tiny_embedder("qwen3_vl", max_pixels=32 * 32 * 40)
    return model, proc


@pytest.fixture(scope="module")
def pages():
    return [Page(T.random_page_image(w, h, seed=i), id=f"p{i}") for i, (w, h) in enumerate([(200, 150), (120, 260), (160, 160), (90, 140)])]


def stage(embedder, reranker=None, **kw) -> FirstStage:
    model, proc = embedder
    budget = reranker.pixel_budget if reranker is not None else None
    return FirstStage(PageEmbedder(model, proc, pixel_budget=budget), PageIndex(**kw))


def test_candidates_are_the_hits_with_maps_on_the_rerankers_grid(embedder, pages):
    model, proc = T.tiny_model_and_processor("qwen3_vl", max_pixels=32 * 32 * 12)
    reranker = MiniReranker(model, proc, RerankConfig(keep_ratio=0.5))
    fs = stage(embedder, reranker)
    assert fs.candidates(QUERY, 3, reranker) == []  # empty index
    fs.add(pages)
    q = fs.embedder.encode_query(QUERY)
    hits = fs.index.search(q, 3)
    cands = fs.candidates(QUERY, 3, reranker)
    assert [(c.page_id, c.first_stage_rank) for c in cands] == [(h.page_id, h.rank) for h in hits]
    assert [c.first_stage_score for c in cands] == pytest.approx([h.score for h in hits], rel=1e-6)
    for c in cands:
        assert c.page is next(p for p in pages if p.id == c.page_id)  # remembered, not reloaded
        grid = reranker.visual_grid(c.page)
        assert c.importance.grid == grid  # shared tower and budget: the embedder's grid is the reranker's
        torch.testing.assert_close(c.importance.values, query_importance(q, fs.index.embedding(c.page_id), grid).values)
        assert c.index_importance is None  # this reranker does not prune at index time
    assert all(c.importance is None for c in fs.candidates(QUERY, 3))  # no reranker: no maps


def test_resampled_maps_and_index_time_maps(embedder, pages):
    """A reranker with another pixel budget (another grid): maps are resampled onto its grid; a reranker that prunes
    at index time also gets each page's query-independent map."""
    model, proc = T.tiny_model_and_processor("qwen3_vl", max_pixels=32 * 32 * 5)
    reranker = MiniReranker(model, proc, RerankConfig(keep_ratio=0.5, index_keep_ratio=0.5))
    fs = stage(embedder)  # the embedder keeps its own, larger budget
    fs.add(pages)
    cands = fs.candidates(QUERY, 4, reranker)
    assert any(fs.index.embedding(c.page_id).grid != reranker.visual_grid(c.page) for c in cands)
    for c in cands:
        grid = reranker.visual_grid(c.page)
        assert c.importance.grid == grid and c.index_importance.grid == grid
        torch.testing.assert_close(c.index_importance.values, page_importance(fs.index.embedding(c.page_id), grid).values)
    results = reranker.rerank(QUERY, cands)  # one call: everything it needs travels with the candidates
    assert len(results) == 4 and all(r.index_importance is not None for r in results)


def test_pages_reload_from_index_metadata(embedder, tmp_path):
    files = []
    for i in range(2):
        f = tmp_path / f"page{i}.png"
        T.random_page_image(150, 120, seed=40 + i).save(f)
        files.append(f)
    fs = stage(embedder)
    fs.index = PageIndex.create(tmp_path / "ix")
    fs.add([Page(f) for f in files])
    fresh = stage(embedder)  # another process's view: same index on disk, no pages in memory
    fresh.index = PageIndex.open(tmp_path / "ix")
    cands = fresh.candidates(QUERY, 2)
    assert sorted(c.page.source for c in cands) == sorted(str(f) for f in files)


def test_bad_arguments(embedder, pages):
    fs = stage(embedder)
    fs.add(pages[:1])
    with pytest.raises(InvalidQueryError):
        fs.candidates("  ", 3)
    for bad in (0, 2.5, None):
        with pytest.raises(ConfigError, match="k must"):
            fs.candidates(QUERY, bad)
