"""Importance maps: hand-computed values, placement on the reranker's grid (same grid and resampled)."""

from __future__ import annotations

import pytest
import torch

from minirerank_core import ImportanceMap
from minirerank_core.errors import InvalidQueryError
from minirerank_core.retrieval import PageEmbedding
from minirerank_core.retrieval.importance import (
    page_importance,
    query_importance,
    query_importances,
    similarity_map,
    to_grid,
)


def page_with_grid(h: int, w: int, dim: int = 8, extra_rows: int = 3, seed: int = 0) -> PageEmbedding:
    """Prompt rows first, then h*w patch rows; small random patches so planted ones stand out."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(extra_rows + h * w, dim, generator=g), dim=-1) * 0.1
    return PageEmbedding("p", v, torch.arange(extra_rows, extra_rows + h * w), (h, w))


def test_hand_computed_small_case():
    # 2 query tokens, D=2, a 2x3 patch grid stored in a shuffled row order, plus one prompt row.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vectors = torch.tensor([
        [9.0, 9.0],    # prompt row: never part of the map
        [0.5, 0.1],    # patch (0, 1)
        [0.2, 0.3],    # patch (0, 0)
        [-1.0, -2.0],  # patch (1, 2)
        [0.0, 0.7],    # patch (1, 0)
        [0.6, 0.6],    # patch (0, 2)
        [0.1, -0.4],   # patch (1, 1)
    ])
    page = PageEmbedding("p", vectors, torch.tensor([2, 1, 5, 4, 6, 3]), (2, 3))
    # max over the two tokens of <q_t, v> = max(x, y) per patch
    expected = torch.tensor([[0.3, 0.5, 0.6], [0.7, 0.1, -1.0]])
    torch.testing.assert_close(similarity_map(q, page), expected)
    same = query_importance(q, page, (2, 3))
    assert isinstance(same, ImportanceMap) and same.grid == (2, 3) and same.values.dtype == torch.float32
    torch.testing.assert_close(same.values, expected)  # same grid: used as is
    torch.testing.assert_close(same.flat(), expected.reshape(-1))  # row-major, like the visual tokens
    torch.testing.assert_close(query_importance(q, page).values, expected)


def plant(page: PageEmbedding, q: torch.Tensor, cell: tuple[int, int]) -> None:
    i, j = cell
    page.vectors[page.patch_rows[i * page.grid[1] + j]] = q[1]  # similarity 1 with query token 1


@pytest.mark.parametrize(
    "source, cell, target, expected",
    [
        ((3, 5), (1, 4), (3, 5), (1, 4)),      # same grid, non-square: index 1 * 5 + 4
        ((8, 12), (5, 7), (4, 6), (2, 3)),     # shrink x2: cell // 2
        ((8, 12), (0, 11), (5, 7), (0, 6)),    # shrink, non-integer ratio: floor((i + .5) * 5 / 8) ...
        ((9, 6), (6, 4), (5, 5), (3, 3)),
        ((4, 6), (2, 5), (4, 6), (2, 5)),
    ],
)
def test_hot_patch_lands_on_the_right_reranker_token(source, cell, target, expected):
    q = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    page = page_with_grid(*source)
    plant(page, q, cell)
    imp = query_importance(q, page, target)
    assert imp.grid == target and imp.values.dtype == torch.float32
    assert divmod(int(imp.flat().argmax()), target[1]) == expected


def test_upsampling_keeps_the_hot_cell_inside_its_footprint():
    q = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    page = page_with_grid(4, 6)
    plant(page, q, (2, 3))
    imp = query_importance(q, page, (8, 12))  # each source cell covers 2x2 target cells
    top = {divmod(int(i), 12) for i in imp.flat().topk(4).indices}
    assert top == {(4, 6), (4, 7), (5, 6), (5, 7)}


def test_query_independent_importance_prefers_distinct_patches():
    page = page_with_grid(4, 5, extra_rows=2)
    background = torch.nn.functional.normalize(torch.ones(8), dim=0)
    page.vectors[page.patch_rows] = background  # a blank page...
    content = {(0, 1): 0, (2, 3): 1, (3, 4): 2}
    for (i, j), axis in content.items():  # ...with three content patches
        v = torch.zeros(8)
        v[axis] = 1.0
        page.vectors[page.patch_rows[i * 5 + j]] = v
    imp = page_importance(page)
    assert imp.grid == (4, 5) and imp.values.dtype == torch.float32
    assert {divmod(int(i), 5) for i in imp.flat().topk(3).indices} == set(content)
    resampled = page_importance(page, (2, 2))  # the bottom-right quarter holds two of the three
    assert int(resampled.flat().argmax()) == 3


def test_batch_helper_and_errors():
    q = torch.randn(2, 8)
    pages = [page_with_grid(2, 3, seed=s) for s in range(3)]
    out = query_importances(q, pages, [(2, 3), (4, 6), None])
    assert [m.grid for m in out] == [(2, 3), (4, 6), (2, 3)]
    with pytest.raises(ValueError):
        query_importances(q, pages, [(2, 3)])
    for bad in (torch.randn(0, 8), torch.randn(2, 7), torch.randn(8)):
        with pytest.raises(InvalidQueryError):
            query_importance(bad, pages[0])
    with pytest.raises(ValueError):
        to_grid(torch.ones(2, 2), (0, 3))
