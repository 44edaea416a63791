"""Index-time token pooling: fewer vectors per page, and the map from grid cells back to them.

colpali-engine's ``HierarchicalTokenPooler`` (Ward clustering of a page's vectors by cosine distance; each cluster
replaced by its L2-normalised mean; ``pool_factor`` f keeps at most n // f clusters) shrinks the index, the ANN
structure and the exact re-scoring about f times, at a small cost in retrieval quality.

Only the image-patch rows are pooled; the prompt rows (a handful per page) are kept as they are. The pruning maps
need every cell of the page's patch grid to name a row: a pooled row stands for all the patches of its cluster, so
``patch_rows[cell]`` becomes the pooled row of the cell's cluster (cells of one cluster share a row, and a cluster
need not be contiguous: Ward groups alike patches, e.g. all the blank margin). ``similarity_map`` then gives each
cell its cluster's similarity with the query and ``salience_map`` weighs a cluster by the cells it covers; the maps
stay on the embedder's grid (h, w) and are resampled onto the reranker's grid exactly as without pooling.
"""

from __future__ import annotations

import torch

from ..validation import check_positive_int
from .embedding import PageEmbedding


def pool_embedding(page: PageEmbedding, factor: int) -> PageEmbedding:
    """``page`` with its patch vectors pooled by colpali-engine's hierarchical pooler (at most ``n // factor``
    pooled patch rows for n distinct patch rows); grid, id, hash and metadata unchanged. ``factor`` 1 returns the
    page itself. A page pooled again pools its distinct pooled rows."""
    factor = check_positive_int("pool_factor", factor)
    distinct, cell_of = torch.unique(page.patch_rows, return_inverse=True)  # sorted distinct patch rows
    if factor == 1 or distinct.numel() < 2:
        return page
    from colpali_engine.compression import HierarchicalTokenPooler  # scipy: loaded only when pooling

    out = HierarchicalTokenPooler().pool_embeddings([page.vectors[distinct]], pool_factor=factor,
                                                    return_dict=True, num_workers=1)
    pooled, clusters = out.pooled_embeddings[0], out.cluster_id_to_indices[0]
    # colpali stacks the non-empty clusters in cluster-id order: pooled row j is the j-th non-empty cluster
    member_to_pooled = torch.full((distinct.numel(),), -1, dtype=torch.int64)
    j = 0
    for cid in sorted(clusters):
        members = clusters[cid][0]
        if members.numel():
            member_to_pooled[members] = j
            j += 1
    if j != pooled.shape[0] or bool((member_to_pooled < 0).any()):
        raise RuntimeError(f"page {page.page_id!r}: colpali-engine's pooler returned clusters that do not cover the "
                           "patches once each (an incompatible colpali-engine version?)")
    keep = torch.ones(page.vectors.shape[0], dtype=torch.bool)
    keep[distinct] = False
    prompt = page.vectors[keep]
    return PageEmbedding(
        page.page_id,
        torch.cat([prompt, pooled.to(torch.float32)]),
        prompt.shape[0] + member_to_pooled[cell_of],
        page.grid,
        page.content_hash,
        dict(page.metadata),
    )


def pool_embeddings(pages: list[PageEmbedding], factor: int) -> list[PageEmbedding]:
    return [pool_embedding(p, factor) for p in pages]


__all__ = ["pool_embedding", "pool_embeddings"]
