"""Visual report (minirerank_core.report): the kept-token mask matches the engine's choice, and the rendered
PNG / HTML show every page with its pruning heatmap and scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minirerank_core import MiniReranker, Page, RerankConfig
from minirerank_core import testing as T
from minirerank_core.engine.prefill import select_top
from minirerank_core.report import Report, ReportPage, _overlay, build_report, colormap, kept_mask, render_panel


@pytest.fixture(scope="module")
def sparse(tiny):
    model, proc = tiny("qwen3_vl")
    return MiniReranker(model, proc, RerankConfig(keep_ratio=0.25))


@pytest.fixture(scope="module")
def pages_and_maps(sparse):
    pages = [Page(T.random_page_image(w, h, seed=50 + i), id=f"p{i}") for i, (w, h) in enumerate([(200, 150), (120, 260), (160, 160)])]
    maps = {}
    for p in pages:
        h, w = sparse.visual_grid(p)
        yy, xx = np.mgrid[0:h, 0:w]
        maps[p.id] = (np.sin(xx / 2.0) + np.cos(yy / 3.0)).reshape(-1).astype(np.float32)
    return pages, maps


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 1.0])
def test_kept_mask_is_the_engines_selection(ratio):
    imp = torch.randn(97, generator=torch.Generator().manual_seed(3))
    mask = kept_mask(imp.numpy(), ratio)
    assert np.flatnonzero(mask).tolist() == select_top(imp, ratio).tolist()


def test_kept_mask_respects_index_time_pruning():
    imp = np.arange(20, dtype=np.float32)
    stored = [0, 2, 4, 6, 8, 10, 12, 14]  # odd tokens were dropped before the prefill
    mask = kept_mask(imp, 0.5, stored=stored)
    assert np.flatnonzero(mask).tolist() == [8, 10, 12, 14]


def test_colormap_is_ordered_and_clipped():
    c = colormap(np.array([-1.0, 0.0, 0.5, 1.0, 2.0])).astype(int)
    assert (c[0] == c[1]).all() and (c[3] == c[4]).all()
    brightness = c.sum(axis=1)
    assert brightness[1] < brightness[2] < brightness[3]


def test_build_report_from_rerank_results(sparse, pages_and_maps, tmp_path):
    pages, maps = pages_and_maps
    results = sparse.rerank("revenue growth", pages, importance=maps)
    report = build_report(sparse, "revenue growth", results, importance=maps, retrieval={"p0": (12.5, 2)})
    assert [p.page_id for p in report.pages] == [r.page_id for r in results]
    assert [p.score for p in report.pages] == pytest.approx([r.score for r in results])
    for p in report.pages:
        n = p.grid[0] * p.grid[1]
        assert p.kept.sum() == max(1, round(0.25 * n))
    p0 = next(p for p in report.pages if p.page_id == "p0")
    assert p0.retrieval_score == 12.5 and p0.retrieval_rank == 2

    png = report.save(tmp_path / "r.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width == 3 * 300
    html = report.save(tmp_path / "r.html").read_text()
    assert all(f"<code>{p.page_id}</code>" in html for p in report.pages)
    assert html.count("<tr>") == 1 + len(pages) and "data:image/png;base64," in html
    assert report._repr_png_().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match=".png or .html"):
        report.save(tmp_path / "r.gif")


def test_wrong_sized_map_is_rejected(sparse, pages_and_maps):
    pages, maps = pages_and_maps
    results = sparse.rerank("q", pages, importance=maps)
    bad = {k: v[:-1] for k, v in maps.items()}
    with pytest.raises(ValueError, match="grid"):
        build_report(sparse, "q", results, importance=bad)


def test_overlay_colours_kept_tokens_and_greys_dropped_ones():
    """A white page whose importance is high only in the left half of a 10x10 grid: with keep_ratio 0.5 the
    left cells carry heatmap colours (differing with importance) and the right cells one uniform grey."""
    page = Image.new("RGB", (200, 200), "white")
    imp = np.tile(np.array([1.0] * 5 + [0.0] * 5, dtype=np.float32), 10).reshape(10, 10)
    imp[:, :5] += np.linspace(0, 1, 10)[:, None]  # importance grows down the kept half
    rp = ReportPage("x", page, 1, 0.0, grid=(10, 10), importance=imp.reshape(-1), keep_ratio=0.5)
    assert rp.kept.reshape(10, 10)[:, :5].all() and not rp.kept.reshape(10, 10)[:, 5:].any()
    arr = np.asarray(_overlay(rp, (200, 200))).astype(int)
    centre = arr[10::20, 10::20]  # (10, 10, 3): the centre pixel of every token cell
    dropped, kept = centre[:, 5:], centre[:, :5]
    assert np.abs(dropped - dropped[0, 0]).max() <= 1  # uniform grey
    assert (dropped[0, 0] < 200).all() and abs(dropped[0, 0, 0] - dropped[0, 0, 2]) < 20
    assert np.abs(kept[0, 0] - kept[-1, 0]).max() > 60  # low vs high importance look different
    assert (np.abs(kept - dropped[0, 0]).max(axis=-1) > 30).all()  # no kept cell looks dropped
    panel = render_panel(rp)
    assert panel.width == 300 and panel.height > 200


def test_report_without_maps(sparse, pages_and_maps):
    pages, _ = pages_and_maps
    dense = MiniReranker(sparse.model, sparse.processor)
    results = dense.rerank("q", pages, top_n=2)
    report = build_report(dense, "q", results)
    assert all(p.importance is None and p.kept is None for p in report.pages)
    assert report.image().width == 2 * 300
    assert isinstance(Report("q", []).image(), Image.Image)
