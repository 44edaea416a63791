"""Index-time token pooling (colpali-engine's hierarchical pooler): fewer vectors per page, every grid cell still
mapped to a row, and pruning maps that land on the reranker's grid through FirstStage.candidates."""

from __future__ import annotations

import pytest
import torch

from minirerank_core import ConfigError, MiniReranker, Page, RerankConfig
from minirerank_core import testing as T
from minirerank_core.retrieval import FirstStage, PageEmbedding, PageIndex, pool_embedding
from minirerank_core.retrieval.embedder import PageEmbedder
from minirerank_core.retrieval.importance import page_importance, query_importance, similarity_map
from tests.helpers import D, make_query, unit

QUERY = "annual revenue"


def page_with_blank_margin(seed: int = 0) -> PageEmbedding:
    """5 prompt rows + a 6x8 patch grid whose left half is near-identical 'background' vectors."""
    g = torch.Generator().manual_seed(seed)
    prompt = unit(torch.randn(5, D, generator=g))
    patches = unit(torch.randn(6, 8, D, generator=g))
    background = unit(torch.randn(D, generator=g))
    patches[:, :4] = unit(background + 0.02 * torch.randn(6, 4, D, generator=g))
    vectors = torch.cat([prompt, patches.reshape(-1, D)])
    return PageEmbedding("pg", vectors, torch.arange(5, 53), (6, 8), content_hash="h", metadata={"source": "a.pdf"})


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_pooled_rows_and_the_cell_map(factor):
    from colpali_engine.compression import HierarchicalTokenPooler

    page = page_with_blank_margin()
    pooled = pool_embedding(page, factor)
    n_pooled = pooled.vectors.shape[0] - 5
    assert 1 <= n_pooled <= 48 // factor
    assert (pooled.page_id, pooled.grid, pooled.content_hash) == ("pg", (6, 8), "h")
    assert pooled.metadata == {"source": "a.pdf"}
    torch.testing.assert_close(pooled.vectors[:5], page.vectors[:5], rtol=0, atol=0)  # prompt rows kept
    rows = pooled.patch_rows
    assert rows.shape == (48,) and int(rows.min()) == 5 and set(rows.tolist()) == set(range(5, 5 + n_pooled))
    # each pooled row is the normalised mean of exactly the patches mapped to it (colpali's definition)...
    for r in range(5, 5 + n_pooled):
        cells = (rows == r).nonzero().squeeze(1)
        want = torch.nn.functional.normalize(page.vectors[5 + cells].mean(0), dim=0)
        torch.testing.assert_close(pooled.vectors[r], want, rtol=1e-5, atol=1e-6)
    # ...and the rows are colpali-engine's own output, in its order
    ref = HierarchicalTokenPooler().pool_embeddings([page.vectors[5:]], pool_factor=factor)[0]
    torch.testing.assert_close(pooled.vectors[5:], ref, rtol=1e-6, atol=1e-6)
    # the near-identical background half collapses: its 24 cells share few rows
    assert len(set(rows.reshape(6, 8)[:, :4].reshape(-1).tolist())) <= max(1, 24 // factor)


def test_map_of_a_pooled_page_paints_each_cell_with_its_cluster():
    page = page_with_blank_margin()
    pooled = pool_embedding(page, 3)
    q = make_query(seed=7)
    m = similarity_map(q, pooled)
    assert m.shape == (6, 8)
    # the map of the pooled page == the map of the unpooled page with every patch replaced by its cluster's row
    replaced = PageEmbedding("pg", torch.cat([page.vectors[:5], pooled.vectors[pooled.patch_rows]]),
                             torch.arange(5, 53), (6, 8))
    torch.testing.assert_close(m, similarity_map(q, replaced))
    # and it approximates the unpooled map (the background cells were near-identical)
    assert (m - similarity_map(q, page)).abs()[:, :4].max() < 0.05


def test_factor_one_and_bad_factors():
    page = page_with_blank_margin()
    assert pool_embedding(page, 1) is page
    for bad in (0, -2, 1.5, None):
        with pytest.raises(ConfigError, match="pool_factor"):
            pool_embedding(page, bad)
    twice = pool_embedding(pool_embedding(page, 2), 2)  # pooling again pools the distinct pooled rows
    assert twice.vectors.shape[0] - 5 <= 48 // 4 and twice.patch_rows.shape == (48,)


# --- through the embedder and FirstStage.candidates ------------------------------------------------------------
@pytest.fixture(scope="module")
def embedder():
    return T.tiny_embedder("qwen3_vl", max_pixels=32 * 32 * 40)


@pytest.fixture(scope="module")
def pages():
    return [Page(T.random_page_image(w, h, seed=i), id=f"p{i}")
            for i, (w, h) in enumerate([(200, 150), (120, 260), (160, 160), (90, 140)])]


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("budget", ["shared", "other"])
def test_candidates_of_a_pooled_index_carry_maps_on_the_rerankers_grid(embedder, pages, factor, budget):
    model, proc = embedder
    r_model, r_proc = T.tiny_model_and_processor("qwen3_vl", max_pixels=32 * 32 * (12 if budget == "shared" else 5))
    reranker = MiniReranker(r_model, r_proc, RerankConfig(keep_ratio=0.5, index_keep_ratio=0.5))
    shared = reranker.pixel_budget if budget == "shared" else None  # "other": the embedder keeps its larger grid
    plain = PageEmbedder(model, proc, pixel_budget=shared)
    pooled = PageEmbedder(model, proc, pixel_budget=shared, pool_factor=factor)
    fs = FirstStage(pooled, PageIndex())
    added = fs.add(pages)
    unpooled = plain.encode_pages(pages, show_progress=False)
    for a, u in zip(added, unpooled):
        n_patch = u.patch_rows.numel()
        assert a.grid == u.grid and a.patch_rows.numel() == n_patch  # same grid, every cell mapped
        assert a.vectors.shape[0] <= u.vectors.shape[0] - n_patch + n_patch // factor  # pooled: fewer rows
    assert fs.index.stats()["vectors_stored"] == sum(a.vectors.shape[0] for a in added)
    q = fs.embedder.encode_query(QUERY)
    cands = fs.candidates(QUERY, 4, reranker)
    assert len(cands) == 4
    if budget == "other":
        assert any(fs.index.embedding(c.page_id).grid != reranker.visual_grid(c.page) for c in cands)
    for c in cands:
        grid = reranker.visual_grid(c.page)
        assert c.importance.grid == grid and c.index_importance.grid == grid
        emb = fs.index.embedding(c.page_id)
        torch.testing.assert_close(c.importance.values, query_importance(q, emb, grid).values)
        torch.testing.assert_close(c.index_importance.values, page_importance(emb, grid).values)
    results = reranker.rerank(QUERY, cands)  # the maps are usable as they are
    assert len(results) == 4 and all(r.importance is not None for r in results)


def test_pooling_settings_are_checked(embedder):
    model, proc = embedder
    with pytest.raises(ConfigError, match="pool_factor"):
        PageEmbedder(model, proc, pool_factor=0)
