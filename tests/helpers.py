"""Constants and small builders shared by the test modules (importable as tests.helpers)."""

import torch

from minirerank_core.retrieval import PageEmbedding

FAMILIES = ["qwen3_vl", "qwen2_vl", "qwen2_5_vl"]
# Three page sizes → three different visual grids (and query offsets) in one batch.
PAGE_SIZES = [(200, 150), (120, 260), (160, 160)]
MAX_PIXELS = 200 * 200
D = 32  # dimension of the synthetic index vectors


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def make_pages(n: int, seed: int = 0, prefix: str = "p", dim: int = D) -> list[PageEmbedding]:
    """Random unit-vector pages of 10-24 vectors; the last 3x4 = 12 rows are the patch grid."""
    g = torch.Generator().manual_seed(seed)
    pages = []
    for i in range(n):
        rows = int(torch.randint(14, 25, (1,), generator=g))
        v = unit(torch.randn(rows, dim, generator=g))
        pages.append(
            PageEmbedding(f"{prefix}{i}", v, torch.arange(rows - 12, rows), (3, 4), content_hash=f"{prefix}h{i}",
                          metadata={"n": i, "source": f"doc{i % 3}.pdf"})
        )
    return pages


def make_query(seed: int = 100, tokens: int = 6, dim: int = D) -> torch.Tensor:
    return unit(torch.randn(tokens, dim, generator=torch.Generator().manual_seed(seed)))


def ids(hits):
    return [h.page_id for h in hits]


def assert_same_hits(got, want, rel: float = 1e-5) -> None:
    """Same pages in the same order (ids, ranks and metadata exactly), scores equal within ``rel``: SIMD width,
    thread count and segment layout may change the last float bits of a MaxSim sum, never the result."""
    import pytest

    def rows(hits):
        return [(h[0], h[1]) if isinstance(h, (list, tuple)) else (h.page_id, h.score) for h in hits]

    g, w = rows(got), rows(want)
    assert [i for i, _ in g] == [i for i, _ in w]
    assert [s for _, s in g] == pytest.approx([s for _, s in w], rel=rel)
    for a, b in zip(got, want):
        if not isinstance(a, (list, tuple)) and not isinstance(b, (list, tuple)):
            assert (a.rank, a.metadata) == (b.rank, b.metadata)
