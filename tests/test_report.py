"""Visual report (minirerank_core.report): the kept-token mask matches the engine's choice, the heatmap leaves the
page's text readable, each panel names its source file and page, and the rendered PNG / HTML (also inline in
notebooks) show every page with its pruning heatmap and scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minirerank_core import (
    Candidate,
    InvalidImportanceError,
    MiniReranker,
    Page,
    RerankConfig,
)
from minirerank_core import testing as T
from minirerank_core.engine.prefill import select_top
from minirerank_core.report import (
    Report,
    ReportPage,
    _lines,
    _overlay,
    build_report,
    colormap,
    kept_mask,
    render_panel,
)


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
    assert brightness[1] > brightness[2] > brightness[3]  # light (low importance) to dark (high): a tint on paper
    assert c[1].min() > 150  # even the low end is light, so a tinted cell never hides text


def test_build_report_from_rerank_results(sparse, pages_and_maps, tmp_path):
    pages, maps = pages_and_maps
    cands = [Candidate(p, first_stage_score=12.5, first_stage_rank=2) if p.id == "p0" else p for p in pages]
    results = sparse.rerank("revenue growth", cands, importance=maps)
    report = build_report(sparse, "revenue growth", results)  # the maps travel with the results
    assert [p.page_id for p in report.pages] == [r.page_id for r in results]
    for p in report.pages:
        np.testing.assert_array_equal(p.importance, maps[p.page_id])
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


def test_wrong_sized_map_never_reaches_a_report(sparse, pages_and_maps):
    pages, maps = pages_and_maps
    bad = {k: v[:-1] for k, v in maps.items()}
    with pytest.raises(InvalidImportanceError, match="grid"):
        sparse.rerank("q", pages, importance=bad)


def _text_page(size=200, line_every=10):
    """A white page with black 2-px "text" lines every ``line_every`` px, and where those ink pixels are."""
    arr = np.full((size, size, 3), 255, dtype=np.uint8)
    ink = np.zeros((size, size), dtype=bool)
    for y in range(4, size, line_every):
        ink[y : y + 2, :] = True
    arr[ink] = 0
    return Image.fromarray(arr), ink


def _half_kept(page):
    """10x10 grid, importance high only in the left half (growing downwards): keep_ratio 0.5 keeps the left half."""
    imp = np.tile(np.array([1.0] * 5 + [0.0] * 5, dtype=np.float32), 10).reshape(10, 10)
    imp[:, :5] += np.linspace(0, 1, 10)[:, None]
    rp = ReportPage("x", page, 1, 0.0, grid=(10, 10), importance=imp.reshape(-1), keep_ratio=0.5)
    assert rp.kept.reshape(10, 10)[:, :5].all() and not rp.kept.reshape(10, 10)[:, 5:].any()
    return rp


def test_overlay_tints_kept_tokens_and_fades_dropped_ones():
    """Kept cells take a heat colour that differs with importance; dropped cells look alike, unlike any kept one."""
    rp = _half_kept(Image.new("RGB", (200, 200), "white"))
    arr = np.asarray(_overlay(rp, (200, 200))).astype(int)
    cells = arr.reshape(10, 20, 10, 20, 3)[:, 1:, :, 1:].mean(axis=(1, 3))  # (10, 10, 3): each cell's mean colour
    dropped, kept = cells[:, 5:], cells[:, :5]
    assert np.abs(dropped - dropped[0, 0]).max() <= 3  # alike (up to where the hatch lines fall)
    assert np.abs(kept[0, 0] - kept[-1, 0]).max() > 60  # low vs high importance look different
    assert (np.abs(kept - dropped[0, 0]).max(axis=-1) > 20).all()  # no kept cell looks dropped
    cell = arr[:20, 100:120]  # one dropped cell: white paper with a hatch
    assert (cell.min(axis=-1) < 230).any() and (cell.min(axis=-1) > 240).any()
    panel = render_panel(rp)
    assert panel.width == 300 and panel.height > 200


def test_page_text_stays_readable_under_the_heatmap():
    """Ink stays dark inside kept cells (even the most important, most strongly coloured ones), and clearly
    darker than the paper around it; in dropped cells it is faded but still visible."""
    page, ink = _text_page()
    rp = _half_kept(page)
    arr = np.asarray(_overlay(rp, (200, 200))).astype(int)
    kept_px = np.zeros((200, 200), dtype=bool)
    kept_px[:, :100] = True
    borders = np.zeros((200, 200), dtype=bool)
    borders[::20, :] = borders[:, ::20] = True  # the white cell borders
    for cells, where in ((kept_px, "kept"), (~kept_px, "dropped")):
        text = arr[ink & cells & ~borders].max(axis=-1)  # brightest channel of each ink pixel
        paper = arr[~ink & cells & ~borders].mean(axis=-1)
        if where == "kept":
            assert text.max() <= 40, "ink must stay dark inside kept (tinted) cells"
            # the most important row (bottom) is tinted the most, and its ink is still dark against its paper
            bottom = arr[180:200, :100][~ink[180:200, :100] & ~borders[180:200, :100]].mean()
            assert bottom < 200 and bottom - text.max() > 100
        else:
            assert 100 <= text.min() and text.max() <= 200, "pruned ink is faded, not erased"
            assert np.median(paper) - text.max() > 40
    # the strongest tint darkens paper but keeps every channel of it well above the ink
    assert arr[190, :100][~borders[190, :100]].min() > 60


def test_panel_header_names_source_file_and_page():
    page, _ = _text_page()
    rp = ReportPage("doc-p3-abc", page, 2, 1.5, metadata={"source": "/data/reports/annual report 2023.pdf", "page": 3})
    assert rp.location == "annual report 2023.pdf, page 3"
    texts = [t for t, _, _ in _lines(rp)]
    assert "annual report 2023.pdf, page 3" in texts and "doc-p3-abc" in texts
    # an image file (no page number) / a page number alone / nothing known
    assert ReportPage("a", page, 1, 0.0, metadata={"image_path": "/x/scan.png"}).location == "scan.png"
    assert ReportPage("a", page, 1, 0.0, metadata={"page": 5}).location == "page 5"
    bare = ReportPage("a", page, 1, 0.0)
    assert bare.location is None and len(_lines(bare)) == len(texts) - 1
    long = ReportPage("a", page, 1, 0.0, metadata={"source": "x" * 80 + ".pdf", "page": 12})
    assert any(t.startswith("...") and t.endswith(".pdf, page 12") and len(t) <= 40 for t, _, _ in _lines(long))


def test_build_report_labels_pages_with_source_and_page(sparse, pages_and_maps, tmp_path):
    pages, maps = pages_and_maps
    src = tmp_path / "scan-7.png"
    pages[1].image().save(src)
    cands = [Candidate(pages[0], first_stage_score=3.0, first_stage_rank=1,
                       metadata={"source": "/docs/report.pdf", "page": 4}),
             Page(src, id="from-file"), pages[2]]
    results = sparse.rerank("q", cands, importance=[maps["p0"], maps["p1"], maps["p2"]])
    report = build_report(sparse, "q", results)
    where = {p.page_id: p.location for p in report.pages}
    assert where == {"p0": "report.pdf, page 4", "from-file": "scan-7.png", "p2": None}
    for p in report.pages:
        texts = [t for t, _, _ in _lines(p)]
        assert (where[p.page_id] in texts) if where[p.page_id] else not any("page " in t for t in texts[2:3])
    fragment = report._repr_html_()  # what a notebook shows: the table (with the source) and the image
    assert "report.pdf, page 4" in fragment and "scan-7.png" in fragment
    assert fragment.count("<tr>") == 1 + len(results) and "data:image/png;base64," in fragment
    assert "<html" not in fragment


def test_report_without_maps(sparse, pages_and_maps):
    pages, _ = pages_and_maps
    dense = MiniReranker(sparse.model, sparse.processor)
    results = dense.rerank("q", pages, top_n=2)
    report = build_report(dense, "q", results)
    assert all(p.importance is None and p.kept is None for p in report.pages)
    assert report.image().width == 2 * 300
    assert isinstance(Report("q", []).image(), Image.Image)


def test_legend_fits_narrow_reports():
    """One column (300 px): the legend wraps onto two rows with a shorter label instead of running off the image."""
    from minirerank_core.report import _legend

    wide, narrow = _legend(900), _legend(300)
    assert wide.height < narrow.height and narrow.width == 300
    right_edge = np.asarray(narrow)[:, -4:].astype(int)  # nothing drawn in the last pixels: the text fits
    assert (right_edge >= 250).all()
