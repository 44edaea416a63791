"""One suite every reranker passes (the Reranker interface): point-wise and listwise, pruning or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minirerank_core import (
    Candidate,
    ConfigError,
    EmptyCandidatesError,
    ImportanceMap,
    InvalidImportanceError,
    InvalidQueryError,
    ListwiseConfig,
    ListwiseReranker,
    MiniReranker,
    Page,
    PixelBudget,
    RerankConfig,
    Reranker,
    RerankResult,
    UnprunedWarning,
)

QUERY = "revenue growth table"

FACTORIES = {
    "pointwise": lambda m, p: MiniReranker(m, p),
    "pointwise-mini": lambda m, p: MiniReranker(m, p, RerankConfig(exit_layer=5, band=(1, 4), keep_ratio=0.5)),
    "listwise-single-pass": lambda m, p: ListwiseReranker(m, p, ListwiseConfig(keep_ratio=0.5)),
    "listwise-cached": lambda m, p: ListwiseReranker(m, p, ListwiseConfig(mode="cached", exit_layer=5, band=(1, 4),
                                                                            keep_ratio=0.5)),
}


@pytest.fixture(scope="module", params=list(FACTORIES))
def reranker(request, tiny) -> Reranker:
    model, proc = tiny("qwen3_vl")
    return FACTORIES[request.param](model, proc)


@pytest.fixture(scope="module")
def pages(page_images):
    return [Page(img, id=f"p{i}") for i, img in enumerate(page_images)]


def maps_for(r: Reranker, pages, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [ImportanceMap(torch.rand(r.visual_grid(p), generator=g)) for p in pages]


def test_is_a_reranker(reranker, pages):
    assert isinstance(reranker, Reranker) and reranker.kind in ("pointwise", "listwise")
    assert isinstance(reranker.name, str) and reranker.name
    assert isinstance(reranker.pixel_budget, PixelBudget)
    for p in pages:
        h, w = reranker.visual_grid(p)
        assert h >= 1 and w >= 1 and reranker.visual_grid(Candidate(p)) == (h, w)
    assert 0 < reranker.pruning.keep_ratio <= 1 and 0 < reranker.pruning.index_keep_ratio <= 1


def test_rerank_and_score_agree(reranker, pages):
    maps = maps_for(reranker, pages)
    results = reranker.rerank(QUERY, pages, importance=maps)
    assert all(isinstance(r, RerankResult) for r in results)
    assert [r.rank for r in results] == [1, 2, 3] and sorted(r.index for r in results) == [0, 1, 2]
    assert [pages[r.index].id for r in results] == [r.page_id for r in results]
    scores = reranker.score(QUERY, pages, importance=maps)
    assert [r.score for r in results] == pytest.approx([scores[r.index] for r in results], abs=1e-5)
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    top = reranker.rerank(QUERY, pages, top_n=np.int64(2), importance=maps)  # numpy ints are ints
    assert [r.page_id for r in top] == [r.page_id for r in results[:2]]


def test_candidates_carry_first_stage_fields_and_maps_through(reranker, pages):
    maps = maps_for(reranker, pages, seed=1)
    cands = [Candidate(p, first_stage_score=10.0 - i, first_stage_rank=i + 1, importance=m, metadata={"n": i})
             for i, (p, m) in enumerate(zip(pages, maps))]
    by_cand = reranker.rerank(QUERY, cands)
    by_arg = reranker.rerank(QUERY, pages, importance=maps)
    assert [r.page_id for r in by_cand] == [r.page_id for r in by_arg]
    assert [r.score for r in by_cand] == pytest.approx([r.score for r in by_arg], abs=1e-6)
    for r in by_cand:
        assert (r.first_stage_rank, r.first_stage_score, r.metadata) == (r.index + 1, 10.0 - r.index, {"n": r.index})
        assert r.importance is maps[r.index]


def test_bad_inputs(reranker, pages):
    with pytest.raises(InvalidQueryError):
        reranker.rerank("  ", pages)
    with pytest.raises(EmptyCandidatesError):
        reranker.rerank(QUERY, [])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="top_n"):
            reranker.rerank(QUERY, pages, top_n=bad)
    grid = reranker.visual_grid(pages[0])
    transposed = np.zeros((grid[1], grid[0])) if grid[0] != grid[1] else np.zeros((grid[0] + 1, grid[1]))
    for bad_map in (np.full(grid, np.nan), transposed, np.zeros(grid[0] * grid[1] + 1)):
        with pytest.raises(InvalidImportanceError, match="p0"):
            reranker.rerank(QUERY, pages[:1], importance=[bad_map])
    with pytest.raises(ConfigError, match="keep_ratio"):
        reranker.score(QUERY, pages, keep_ratio=0)


def test_missing_maps(reranker, pages):
    """A reranker that needs maps refuses candidates without them, or with missing_maps="unpruned" attends to
    every token (saying so); a mix is refused either way. Others do not need them."""
    maps = maps_for(reranker, pages)
    if not reranker.pruning.needs_maps or reranker.pruning.keep_ratio >= 1:
        reranker.rerank(QUERY, pages)
        return
    with pytest.raises(ConfigError, match="importance"):
        reranker.rerank(QUERY, pages)
    with pytest.warns(UnprunedWarning):
        unpruned = reranker.score(QUERY, pages, missing_maps="unpruned")
    assert unpruned == pytest.approx(reranker.score(QUERY, pages, keep_ratio=1.0), abs=1e-6)
    assert unpruned != pytest.approx(reranker.score(QUERY, pages, importance=maps), abs=1e-4)  # pruning matters
    with pytest.raises(ConfigError, match="1 of 3|2 of 3"):
        reranker.score(QUERY, pages, importance=[maps[0], None, maps[2]], missing_maps="unpruned")


def test_index_accepts_pages_and_candidates(reranker, pages):
    out = reranker.index([Candidate(p) for p in pages])
    if out is not None:  # a reranker with a page cache returns each page's KV
        assert len(out) == len(pages)
    reranker.index(pages)


def test_index_time_pruning_needs_the_page_maps(tiny, pages):
    model, proc = tiny("qwen3_vl")
    r = MiniReranker(model, proc, RerankConfig(index_keep_ratio=0.5))
    fresh = [Page(img.image(), id=img.id) for img in pages]  # same content
    with pytest.raises(ConfigError, match="index_keep_ratio"):
        r.rerank(QUERY, fresh, missing_maps="unpruned")  # no fallback: the cache key needs the map
    index_maps = maps_for(r, pages, seed=3)
    with_maps = r.rerank(QUERY, [Candidate(p, index_importance=m) for p, m in zip(pages, index_maps)])
    again = r.rerank(QUERY, fresh)  # remembered by content from the call before
    assert [x.page_id for x in again] == [x.page_id for x in with_maps]
