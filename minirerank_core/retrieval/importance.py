"""Pruning signals for the reranker: per-visual-token importance on the RERANKER's grid.

Query-dependent (online pruning): importance of patch p = max over query tokens t of <q_t, v_p> -- the
quantity whose sum over t (after the max over patches) is the MaxSim score, read per patch instead.

Query-independent (index-time pruning, before the page prefill): importance of patch p = 1 - cos(v_p, m),
m the mean of the page's patch vectors ("distinctiveness"). Why this and not the vector norm: colpali
models L2-normalise every output vector, so norms carry no signal at all. A page's patches are dominated
by background and white space whose embeddings are nearly alike and sit close to the mean; text, tables and
figures -- what a query can match -- differ from it. Ranking by distance from the mean keeps those.

Grids: when the embedder and the reranker share a vision tower and pixel budget (ColQwen3 + Qwen3-VL) the
patch grid IS the reranker's visual-token grid and the map is used as is. Otherwise the (h_e, w_e) map is
resampled bilinearly (antialiased when shrinking, so a hot patch is averaged into its target cell rather
than skipped) to (h_r, w_r); both grids span the whole page, so cell centres map proportionally.
``query_importance`` / ``page_importance`` return an :class:`ImportanceMap` on the target grid (the type that
carries its grid through the handoff to the reranker); ``to_grid`` returns the resampled map flattened row-major.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..candidates import ImportanceMap
from ..errors import InvalidQueryError
from .embedding import PageEmbedding

Grid = tuple[int, int]


def similarity_map(query: torch.Tensor, page: PageEmbedding) -> torch.Tensor:
    """(h_e, w_e) map: max over query tokens of the similarity with each image patch of ``page``."""
    q = _query(query, page.dim)
    h, w = page.grid
    sims = q @ page.vectors[page.patch_rows].T  # (Tq, h*w)
    return sims.max(dim=0).values.reshape(h, w)


def salience_map(page: PageEmbedding) -> torch.Tensor:
    """(h_e, w_e) query-independent map: 1 - cos(patch, mean patch) -- see the module docstring."""
    h, w = page.grid
    patches = F.normalize(page.vectors[page.patch_rows], dim=-1)
    mean = F.normalize(patches.mean(dim=0), dim=0)
    return (1.0 - patches @ mean).reshape(h, w)


def to_grid(importance: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Resample a 2-D map to ``grid`` (h_r, w_r); returns it flattened row-major (float32)."""
    h_r, w_r = (int(x) for x in grid)
    if h_r < 1 or w_r < 1:
        raise ValueError(f"target grid must be positive, got {grid}")
    m = importance.to(torch.float32)
    if tuple(m.shape) != (h_r, w_r):
        shrinking = m.shape[0] > h_r or m.shape[1] > w_r
        m = F.interpolate(m[None, None], size=(h_r, w_r), mode="bilinear", align_corners=False, antialias=shrinking)[0, 0]
    return m.reshape(-1).contiguous()


def query_importance(query: torch.Tensor, page: PageEmbedding, grid: Grid | None = None) -> ImportanceMap:
    """Query-dependent importance of each reranker visual token of ``page`` (grid: the reranker's
    ``visual_grid(page)``; None = the embedder's own grid)."""
    grid = tuple(grid or page.grid)
    return ImportanceMap(to_grid(similarity_map(query, page), grid).reshape(grid))


def page_importance(page: PageEmbedding, grid: Grid | None = None) -> ImportanceMap:
    """Query-independent importance of each reranker visual token of ``page`` (for index-time pruning)."""
    grid = tuple(grid or page.grid)
    return ImportanceMap(to_grid(salience_map(page), grid).reshape(grid))


def query_importances(
    query: torch.Tensor, pages: Sequence[PageEmbedding], grids: Sequence[Grid | None] | None = None
) -> list[ImportanceMap]:
    """:func:`query_importance` for each page (``grids`` aligned with ``pages``)."""
    grids = list(grids) if grids is not None else [None] * len(pages)
    if len(grids) != len(pages):
        raise ValueError(f"{len(grids)} grids for {len(pages)} pages")
    return [query_importance(query, p, g) for p, g in zip(pages, grids)]


def _query(query: torch.Tensor, dim: int) -> torch.Tensor:
    q = torch.as_tensor(query).detach().to("cpu", torch.float32)
    if q.ndim != 2 or q.shape[0] == 0 or q.shape[1] != dim:
        raise InvalidQueryError(f"query embedding must be (Tq, {dim}) with Tq >= 1, got {tuple(q.shape)}")
    return q
