"""Visual report of one query's reranking: each top page with its pruning heatmap and its scores.

For every page: a header (rank, rerank score, P(yes), the page's source file and page number when known, the
first-stage score and rank, how many visual tokens the query attended to) above the page image with the first
stage's importance map on the reranker's visual-token grid. The heatmap keeps the page readable: a kept token's
cell is tinted by multiplying the page with a light heat colour (dark text stays dark, the paper takes the
colour), and a pruned token's cell is faded towards white and hatched. Written as PNG (one image) or HTML (a
table of scores plus the panels), and shown inline in notebooks (``Report`` has ``_repr_html_``, the table and
the image, and ``_repr_png_``). Pure PIL + numpy: no plotting library needed.

    report = build_report(reranker, "query", pipeline.search("query"))   # or results of reranker.rerank(...)
    report.save("report.png")                                            # or "report.html"
    report                                                               # in a notebook: table + image
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .engine.prefill import select_top
from .pages import Page, as_pages
from .rerankers.base import Reranker, RerankResult

__all__ = ["Report", "ReportPage", "build_report", "kept_mask", "render_panel"]

PANEL_WIDTH = 300
PAGE_MAX_HEIGHT = 380
_PAD = 10
_BG = (255, 255, 255)
_INK = (25, 25, 25)
_MUTED = (110, 110, 110)
# Anchors of a sequential "YlOrRd"-like colour map: light yellow (least important kept token) -> orange -> deep red.
# Light at the low end and multiplied onto the page (see _TINT), so every kept cell keeps its dark text readable.
_CMAP_ANCHORS = np.array(
    [[255, 237, 160], [254, 217, 118], [254, 178, 76], [253, 141, 60], [252, 78, 42], [227, 26, 28], [177, 0, 38]],
    dtype=np.float32,
)
_TINT = 0.6  # kept token: page * (1 - _TINT * (1 - colour)); white paper takes 60% of the colour, ink stays dark
_FADE = 0.6  # pruned token: moved this far towards white (text turns light grey, still legible)
_HATCH = (150, 150, 165)  # diagonal hatch over pruned tokens
_HATCH_STEP = 7  # pixels between hatch lines
_HATCH_ALPHA = 0.45


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 (..., 3): light yellow (0) to deep red (1), darker as values grow."""
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0) * (len(_CMAP_ANCHORS) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_CMAP_ANCHORS) - 1)
    t = (v - lo)[..., None]
    return ((1 - t) * _CMAP_ANCHORS[lo] + t * _CMAP_ANCHORS[hi]).astype(np.uint8)


def tint(colour: np.ndarray) -> np.ndarray:
    """The per-channel factor (float32 in [0, 1]) a kept token's cell is multiplied by for heat ``colour``."""
    return 1.0 - _TINT * (1.0 - np.asarray(colour, dtype=np.float32) / 255.0)


def kept_mask(importance: Any, keep_ratio: float, stored: Sequence[int] | None = None) -> np.ndarray:
    """Which visual tokens the query attends to, exactly as the reranker chooses them: among the ``stored``
    tokens (all of them unless index-time pruning dropped some), the top ``keep_ratio`` fraction by importance
    (at least one). Returns a bool array the length of ``importance`` (row-major over the grid)."""
    imp = np.asarray(importance, dtype=np.float32).reshape(-1)
    n = imp.size
    stored_idx = np.arange(n) if stored is None else np.asarray(stored, dtype=np.int64).reshape(-1)
    mask = np.zeros(n, dtype=bool)
    m = stored_idx.size
    k = max(1, min(m, round(keep_ratio * m)))
    if k == m:
        mask[stored_idx] = True
        return mask
    import torch  # same selection (torch.topk) as the engine's select_top, so ties break the same way

    top = torch.topk(torch.from_numpy(imp[stored_idx]), k, sorted=False).indices.numpy()
    mask[stored_idx[top]] = True
    return mask


@dataclass
class ReportPage:
    """One page of a report. ``importance``: the first stage's map on the reranker's ``grid`` (h, w), row-major
    (None: no pruning map). ``keep_ratio``: the reranker's query-time keep ratio. ``metadata``: the page's and
    the result's metadata; its ``"source"`` (file) and ``"page"`` (number) label the panel when present."""

    page_id: str
    image: Image.Image
    rank: int
    score: float
    grid: tuple[int, int] | None = None
    importance: np.ndarray | None = None
    keep_ratio: float = 1.0
    retrieval_score: float | None = None
    retrieval_rank: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    stored: np.ndarray | None = None  # tokens kept by index-time pruning (None: all were cached)

    @property
    def probability(self) -> float:
        return 1.0 / (1.0 + math.exp(-self.score)) if -700 < self.score < 700 else float(self.score > 0)

    @property
    def kept(self) -> np.ndarray | None:
        if self.importance is None:
            return None
        return kept_mask(self.importance, self.keep_ratio, self.stored)

    @property
    def source(self) -> str | None:
        """The file name of the page's source (``metadata["source"]``, else its image file), or None."""
        src = self.metadata.get("source") or self.metadata.get("image_path")
        if not src:
            return None
        return os.path.basename(str(src).rstrip("/\\")) or str(src)

    @property
    def page_number(self) -> int | str | None:
        """``metadata["page"]`` (1-based page of a PDF), or None."""
        page = self.metadata.get("page")
        return None if page is None or page == "" else page

    @property
    def location(self) -> str | None:
        """"report.pdf, page 3" / "scan.png" / "page 3": where the page comes from, None when unknown."""
        src, page = self.source, self.page_number
        if src and page is not None:
            return f"{src}, page {page}"
        if src:
            return src
        return f"page {page}" if page is not None else None


def _cells(n_cells: int, n_pixels: int) -> np.ndarray:
    """The token cell (0 .. n_cells - 1) of each pixel along one axis (nearest-neighbour upsampling)."""
    return np.minimum(np.arange(n_pixels) * n_cells // n_pixels, n_cells - 1)


def _overlay(page: ReportPage, size: tuple[int, int]) -> Image.Image:
    """The page scaled to ``size`` with the importance heatmap drawn so the page stays readable: each kept token's
    cell multiplied by a light heat colour (paper takes the colour, dark text stays dark) and each pruned token's
    cell faded towards white and hatched."""
    base = page.image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    if page.importance is None or page.grid is None:
        return base
    h, w = page.grid
    imp = np.asarray(page.importance, dtype=np.float32).reshape(h, w)
    kept = page.kept.reshape(h, w)
    # colour scaled over the kept tokens: the least important kept token gets the light end of the colour map
    lo, hi = float(np.nanmin(imp[kept])), float(np.nanmax(imp[kept]))
    norm = (imp - lo) / (hi - lo) if hi > lo else np.full_like(imp, 0.5)
    factor = np.where(kept[..., None], tint(colormap(np.clip(norm, 0.0, 1.0))), 1.0).astype(np.float32)  # (h, w, 3)
    rows, cols = _cells(h, size[1]), _cells(w, size[0])
    kept_px = kept[rows][:, cols]  # (H, W)
    arr = np.asarray(base, dtype=np.float32) * factor[rows][:, cols]
    fade = np.where(kept_px, 0.0, _FADE)[..., None]
    arr = arr + (255.0 - arr) * fade
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    hatch = (~kept_px) & ((xx + yy) % _HATCH_STEP == 0)
    arr[hatch] = (1 - _HATCH_ALPHA) * arr[hatch] + _HATCH_ALPHA * np.array(_HATCH, dtype=np.float32)
    out = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if min(size[0] / w, size[1] / h) >= 10:  # cell borders only when cells are big enough to see
        draw = ImageDraw.Draw(out)
        for i in range(1, h):
            y = round(i * size[1] / h)
            draw.line([(0, y), (size[0], y)], fill=(255, 255, 255), width=1)
        for j in range(1, w):
            x = round(j * size[0] / w)
            draw.line([(x, 0), (x, size[1])], fill=(255, 255, 255), width=1)
    return out


def _fit(image_size: tuple[int, int], max_w: int, max_h: int) -> tuple[int, int]:
    w, h = image_size
    s = min(max_w / w, max_h / h)
    return max(1, round(w * s)), max(1, round(h * s))


def _lines(page: ReportPage) -> list[tuple[str, tuple[int, int, int], int]]:
    """The panel header: (text, colour, font size) per line."""
    lines = [(f"#{page.rank}  score {page.score:+.3f}   P(yes) {page.probability:.2f}", _INK, 16)]
    lines.append((_ellipsis(page.page_id, 40), _MUTED, 13))
    location = page.location
    if location is not None:
        lines.append((_ellipsis_start(location, 40), _INK, 13))
    if page.retrieval_score is not None:
        r = f" (first-stage rank {page.retrieval_rank})" if page.retrieval_rank is not None else ""
        lines.append((f"first stage {page.retrieval_score:.3f}{r}", _MUTED, 13))
    if page.importance is not None and page.grid is not None:
        n = page.grid[0] * page.grid[1]
        k = int(page.kept.sum())
        lines.append((f"kept {k}/{n} visual tokens ({100 * k / n:.0f}%)", _MUTED, 13))
    else:
        lines.append(("no pruning map: all visual tokens used", _MUTED, 13))
    return lines


def _ellipsis(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _ellipsis_start(text: str, n: int) -> str:
    """Shortened at the start, so a long file name keeps its end (extension, page number)."""
    return text if len(text) <= n else "..." + text[-(n - 3) :]


def render_panel(page: ReportPage, width: int = PANEL_WIDTH, max_page_height: int = PAGE_MAX_HEIGHT) -> Image.Image:
    """One page's panel: header lines (rank, scores, source and page, kept tokens) above the page with its heatmap."""
    lines = _lines(page)
    header_h = sum(size + 6 for _, _, size in lines) + _PAD
    pw, ph = _fit(page.image.size, width - 2 * _PAD, max_page_height)
    panel = Image.new("RGB", (width, header_h + ph + 2 * _PAD), _BG)
    draw = ImageDraw.Draw(panel)
    y = _PAD
    for text, color, size in lines:
        draw.text((_PAD, y), text, fill=color, font=_font(size))
        y += size + 6
    x0 = (width - pw) // 2
    panel.paste(_overlay(page, (pw, ph)), (x0, header_h))
    draw.rectangle([x0 - 1, header_h - 1, x0 + pw, header_h + ph], outline=(200, 200, 200))
    return panel


_LEGEND = ("first-stage similarity of the tokens the query attends to (low -> high)", "first-stage similarity (low -> high)",
           "similarity (low -> high)")
_LEGEND_PRUNED = "pruned (not attended)"


def _legend(width: int) -> Image.Image:
    """The colour bar (as it looks on white paper) and the pruned-token swatch: on one row when they fit, else on
    two, with the longest label that fits the width."""
    font = _font(13)
    bar_w, row_h = 120, 22
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = next((t for t in _LEGEND if _PAD + bar_w + 8 + probe.textlength(t, font=font) + _PAD <= width), _LEGEND[-1])
    first_w = _PAD + bar_w + 8 + int(probe.textlength(label, font=font)) + 24
    second_w = 24 + 8 + int(probe.textlength(_LEGEND_PRUNED, font=font)) + _PAD
    two_rows = first_w + second_w > width
    img = Image.new("RGB", (width, 12 + row_h * (2 if two_rows else 1)), _BG)
    draw = ImageDraw.Draw(img)
    bar = (255 * tint(colormap(np.linspace(0, 1, bar_w)[None, :].repeat(12, axis=0)))).round().astype(np.uint8)
    img.paste(Image.fromarray(bar), (_PAD, 11))
    draw.rectangle([_PAD - 1, 10, _PAD + bar_w, 23], outline=(200, 200, 200))
    draw.text((_PAD + bar_w + 8, 9), label, fill=_INK, font=font)
    x, y = (_PAD, 11 + row_h) if two_rows else (first_w, 11)
    swatch = ReportPage("", Image.new("RGB", (24, 12), _BG), 0, 0.0, grid=(1, 2), importance=np.array([1.0, 0.0]),
                        keep_ratio=0.5)
    img.paste(_overlay(swatch, (48, 12)).crop((24, 0, 48, 12)), (x, y))
    draw.rectangle([x - 1, y - 1, x + 24, y + 12], outline=(200, 200, 200))
    draw.text((x + 32, y - 2), _LEGEND_PRUNED, fill=_INK, font=font)
    return img


_CELL_STYLE = "border:1px solid #ccc;padding:4px 8px;text-align:"


@dataclass
class Report:
    """A query and its ranked pages; ``image()`` renders it, ``save()`` writes PNG or HTML, and a notebook shows
    it inline (``_repr_html_``: the score table and the image; ``_repr_png_``: the image)."""

    query: str
    pages: list[ReportPage]
    title: str = "minirerank"
    columns: int = 4

    def image(self) -> Image.Image:
        cols = max(1, min(self.columns, len(self.pages) or 1))
        panels = [render_panel(p) for p in self.pages]
        width = cols * PANEL_WIDTH
        title_font = _font(18)
        wrapped = textwrap.wrap(f'{self.title}  |  query: "{self.query}"', width=max(20, width // 10)) or [""]
        title_h = _PAD + len(wrapped) * 24
        legend = _legend(width) if any(p.importance is not None for p in self.pages) else None
        rows = [panels[i : i + cols] for i in range(0, len(panels), cols)]
        rows_h = [max(p.height for p in row) for row in rows]
        height = title_h + (legend.height if legend else 0) + sum(rows_h) + _PAD + (0 if panels else 30)
        out = Image.new("RGB", (width, height), _BG)
        draw = ImageDraw.Draw(out)
        for i, line in enumerate(wrapped):
            draw.text((_PAD, _PAD + 24 * i), line, fill=_INK, font=title_font)
        y = title_h
        if legend:
            out.paste(legend, (0, y))
            y += legend.height
        for row, rh in zip(rows, rows_h):
            for j, panel in enumerate(row):
                out.paste(panel, (j * PANEL_WIDTH, y))
            y += rh
        if not panels:
            draw.text((_PAD, y), "no pages", fill=_MUTED, font=_font(14))
        return out

    def _png(self, compact: bool = False) -> bytes:
        """The image as PNG; ``compact``: a 256-colour palette (about a third of the size, for notebook outputs)."""
        image = self.image()
        if compact:
            image = image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        return buf.getvalue()

    def _table(self) -> str:
        """The score table (inline styles, so it looks the same in a notebook and in a saved file)."""
        columns = ("rank", "page", "source", "score", "P(yes)", "first stage", "visual tokens kept")
        left = {"page", "source"}

        def row(tag: str, cells: Sequence[str]) -> str:
            return "<tr>" + "".join(f"<{tag} style='{_CELL_STYLE}{'left' if col in left else 'right'}'>{c}</{tag}>"
                                    for col, c in zip(columns, cells)) + "</tr>"

        rows = [row("th", columns)]
        for p in self.pages:
            kept = p.kept
            kept_txt = f"{int(kept.sum())}/{kept.size}" if kept is not None else "all"
            first = "" if p.retrieval_score is None else f"{p.retrieval_score:.4f}"
            if p.retrieval_rank is not None:
                first += f" (#{p.retrieval_rank})"
            rows.append(row("td", [str(p.rank), f"<code>{html.escape(p.page_id)}</code>", html.escape(p.location or ""),
                                   f"{p.score:+.4f}", f"{p.probability:.3f}", first, kept_txt]))
        return f"<table style='border-collapse:collapse'>{''.join(rows)}</table>"

    def _fragment(self, compact: bool = False) -> str:
        png = base64.b64encode(self._png(compact)).decode()
        return (f"<p>Query: <b>{html.escape(self.query)}</b></p>{self._table()}"
                f"<p><img style='max-width:100%' alt='pages with pruning heatmaps' src='data:image/png;base64,{png}'></p>")

    def to_html(self) -> str:
        """A self-contained HTML page: the score table and the rendered image."""
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}: {html.escape(self.query)}</title>"
            "<style>body{font-family:sans-serif;margin:1.5em}</style></head><body>"
            f"<h2>{html.escape(self.title)}</h2>{self._fragment()}</body></html>"
        )

    def save(self, path: str | Path) -> Path:
        """Write ``.png`` (the rendered image) or ``.html`` (score table + image, self-contained)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".png", ".html", ".htm"):
            raise ValueError(f"report path must end in .png or .html, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".png":
            path.write_bytes(self._png())
        else:
            path.write_text(self.to_html(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"Report(query={self.query!r}, pages={[p.page_id for p in self.pages]})"

    # Jupyter: the score table and the image. The inline image is a 256-colour PNG (notebooks that keep their
    # outputs stay small, and the HTML and PNG representations both carry it); save() writes full colour.
    def _repr_html_(self) -> str:
        return self._fragment(compact=True)

    def _repr_png_(self) -> bytes:
        return self._png(compact=True)


def build_report(
    reranker: Reranker,
    query: str,
    results: Sequence[RerankResult],
    *,
    keep_ratio: float | None = None,
    title: str = "minirerank",
    columns: int = 4,
) -> Report:
    """A report for ``results`` of ``reranker.rerank(..)`` or ``RerankPipeline.search(..)``: each page with the map
    the reranker pruned with (carried by the result), the tokens index-time pruning dropped, the rerank score,
    the page's source file and page number when known and, for first-stage candidates, the first-stage score and
    rank. ``keep_ratio`` defaults to the reranker's."""
    keep = reranker.pruning.keep_ratio if keep_ratio is None else float(keep_ratio)
    index_keep = reranker.pruning.index_keep_ratio
    pages = []
    for r in results:
        page = r.page if isinstance(r.page, Page) else as_pages([r.page])[0]
        imp = None if r.importance is None else r.importance.flat().numpy()
        grid = None if r.importance is None else r.importance.grid
        stored = None
        if index_keep < 1.0 and r.index_importance is not None:
            stored = select_top(r.index_importance.flat(), index_keep).numpy()
        metadata = {**page.metadata, **r.metadata}
        if not metadata.get("source") and page.source:
            metadata["source"] = page.source  # a page read from a file: that file
        pages.append(
            ReportPage(
                page_id=r.page_id, image=page.image(), rank=int(r.rank), score=float(r.score), grid=grid,
                importance=imp, keep_ratio=keep, retrieval_score=r.first_stage_score, retrieval_rank=r.first_stage_rank,
                metadata=metadata, stored=stored,
            )
        )
    return Report(query=query, pages=pages, title=title, columns=columns)
