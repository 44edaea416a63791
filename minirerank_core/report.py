"""Visual report of one query's reranking: each top page with its pruning heatmap and its scores.

For every page: the page image, the first stage's importance map on the reranker's visual-token grid as a
heatmap over the visual tokens the query attends to, the pruned (dropped) tokens greyed out, and the rerank
score, P(yes), first-stage score and how many visual tokens were kept. Written as PNG (one image) or HTML
(a table of scores plus the panels), and shown inline in notebooks (``Report`` has ``_repr_png_`` /
``_repr_html_``). Pure PIL + numpy: no plotting library needed.

    report = build_report(reranker, "query", results, importance=imps)   # results from reranker.rerank()
    report = build_pipeline_report(pipeline, "query", pipeline.search("query"))   # maps from the first stage
    report.save("report.png")                                            # or "report.html"
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .pages import Page, as_pages

__all__ = ["Report", "ReportPage", "build_pipeline_report", "build_report", "kept_mask", "render_panel"]

PANEL_WIDTH = 300
PAGE_MAX_HEIGHT = 380
_PAD = 10
_BG = (255, 255, 255)
_INK = (25, 25, 25)
_MUTED = (110, 110, 110)
_DROPPED = (60, 60, 70)
_CMAP_START = 0.3
# Anchors of a perceptually ordered "inferno"-like colour map (dark purple -> red -> yellow).
_CMAP_ANCHORS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]],
    dtype=np.float32,
)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 (..., 3)."""
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0) * (len(_CMAP_ANCHORS) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_CMAP_ANCHORS) - 1)
    t = (v - lo)[..., None]
    return ((1 - t) * _CMAP_ANCHORS[lo] + t * _CMAP_ANCHORS[hi]).astype(np.uint8)


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
    (None: no pruning map). ``keep_ratio``: the reranker's query-time keep ratio."""

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


def _overlay(page: ReportPage, size: tuple[int, int]) -> Image.Image:
    """The page scaled to ``size`` with the importance heatmap on kept tokens and dropped tokens greyed."""
    base = page.image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    if page.importance is None or page.grid is None:
        return base
    h, w = page.grid
    imp = np.asarray(page.importance, dtype=np.float32).reshape(h, w)
    kept = page.kept.reshape(h, w)
    # colour by rank among the kept tokens (the dropped ones are grey anyway), starting above the colour map's
    # near-black end so the least important kept token still reads as colour, not as the dropped grey
    lo, hi = float(np.nanmin(imp[kept])), float(np.nanmax(imp[kept]))
    norm = (imp - lo) / (hi - lo) if hi > lo else np.full_like(imp, 0.5)
    heat = colormap(_CMAP_START + (1 - _CMAP_START) * np.clip(norm, 0.0, 1.0))  # (h, w, 3)
    alpha = np.where(kept, 0.5, 0.65).astype(np.float32)
    color = np.where(kept[..., None], heat, np.array(_DROPPED, dtype=np.uint8))
    # nearest-neighbour upsampling keeps token cells crisp
    color_img = Image.fromarray(color.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    alpha_img = Image.fromarray((alpha * 255).astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    out = Image.composite(color_img, base, alpha_img)
    if min(size[0] / w, size[1] / h) >= 10:  # a cell grid only when cells are big enough to see
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
    lines = [(f"#{page.rank}  score {page.score:+.3f}   P(yes) {page.probability:.2f}", _INK, 16)]
    lines.append((_ellipsis(page.page_id, 40), _MUTED, 13))
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


def render_panel(page: ReportPage, width: int = PANEL_WIDTH, max_page_height: int = PAGE_MAX_HEIGHT) -> Image.Image:
    """One page's panel: header lines (rank, scores, kept tokens) above the page with its heatmap."""
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


_LEGEND = "first-stage similarity of kept visual tokens (low -> high)"


def _legend(width: int) -> Image.Image:
    img = Image.new("RGB", (width, 34), _BG)
    draw = ImageDraw.Draw(img)
    font = _font(13)
    bar_w = 120
    bar = colormap(np.linspace(_CMAP_START, 1, bar_w)[None, :].repeat(12, axis=0))
    img.paste(Image.fromarray(bar), (_PAD, 11))
    draw.text((_PAD + bar_w + 8, 9), _LEGEND, fill=_INK, font=font)
    x = _PAD + bar_w + 8 + int(draw.textlength(_LEGEND, font=font)) + 24
    if x + 160 < width:
        draw.rectangle([x, 11, x + 24, 23], fill=_DROPPED)
        draw.text((x + 32, 9), "pruned (query does not attend)", fill=_INK, font=font)
    return img


@dataclass
class Report:
    """A query and its ranked pages; ``image()`` renders it, ``save()`` writes PNG or HTML."""

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
        height = title_h + (legend.height if legend else 0) + sum(rows_h) + _PAD
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

    def to_html(self) -> str:
        rows = []
        for p in self.pages:
            kept = p.kept
            kept_txt = f"{int(kept.sum())}/{kept.size}" if kept is not None else "all"
            first = "" if p.retrieval_score is None else f"{p.retrieval_score:.4f}"
            rows.append(
                f"<tr><td>{p.rank}</td><td><code>{html.escape(p.page_id)}</code></td><td>{p.score:+.4f}</td>"
                f"<td>{p.probability:.3f}</td><td>{first}</td><td>{kept_txt}</td></tr>"
            )
        buf = io.BytesIO()
        self.image().save(buf, format="PNG")
        png = base64.b64encode(buf.getvalue()).decode()
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}: {html.escape(self.query)}</title>"
            "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:nth-child(2){text-align:left}"
            "img{max-width:100%}</style></head><body>"
            f"<h2>{html.escape(self.title)}</h2><p>Query: <b>{html.escape(self.query)}</b></p>"
            "<table><tr><th>rank</th><th>page</th><th>score</th><th>P(yes)</th><th>first stage</th>"
            f"<th>visual tokens kept</th></tr>{''.join(rows)}</table>"
            f"<p><img alt='pages with pruning heatmaps' src='data:image/png;base64,{png}'></p></body></html>"
        )

    def save(self, path: str | Path) -> Path:
        """Write ``.png`` (the rendered image) or ``.html`` (score table + image, self-contained)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".png", ".html", ".htm"):
            raise ValueError(f"report path must end in .png or .html, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".png":
            self.image().save(path, format="PNG")
        else:
            path.write_text(self.to_html(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"Report(query={self.query!r}, pages={[p.page_id for p in self.pages]})"

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.image().save(buf, format="PNG")
        return buf.getvalue()


def build_report(
    reranker: Any,
    query: str,
    results: Sequence[Any],
    *,
    importance: Sequence[Any] | Mapping[str, Any] | None = None,
    retrieval: Mapping[str, tuple[float, int]] | None = None,
    keep_ratio: float | None = None,
    stored: Mapping[str, Any] | None = None,
    title: str = "minirerank",
    columns: int = 4,
) -> Report:
    """A report for ``results`` (RerankResult objects from ``reranker.rerank(..)``, each with its ``page``).

    importance: the first stage's maps on the reranker's grid, by page id or aligned with ``results``
        (RerankPipeline passes them); None shows the pages without a heatmap.
    retrieval: page id -> (first-stage score, first-stage rank), shown when given.
    keep_ratio: defaults to the reranker's ``config.keep_ratio``.
    stored: page id -> indices of the visual tokens kept by index-time pruning (index_keep_ratio < 1).
    """
    if keep_ratio is None:
        keep_ratio = float(getattr(getattr(reranker, "config", None), "keep_ratio", 1.0))
    pages = []
    for i, r in enumerate(results):
        page = r.page if isinstance(getattr(r, "page", None), Page) else as_pages([r.page])[0]
        if isinstance(importance, Mapping):
            imp = importance.get(r.page_id)
        elif importance is not None:
            imp = list(importance)[i]
        else:
            imp = None
        grid = None
        if imp is not None:
            imp = np.asarray(imp.detach().cpu() if hasattr(imp, "detach") else imp, dtype=np.float32).reshape(-1)
            grid = tuple(reranker.visual_grid(page))
            if grid[0] * grid[1] != imp.size:
                raise ValueError(
                    f"page {r.page_id!r}: importance has {imp.size} values but the reranker's grid is {grid[0]}x{grid[1]}"
                )
        first = (retrieval or {}).get(r.page_id)
        pages.append(
            ReportPage(
                page_id=r.page_id, image=page.image(), rank=int(r.rank), score=float(r.score), grid=grid,
                importance=imp, keep_ratio=keep_ratio,
                retrieval_score=None if first is None else float(first[0]),
                retrieval_rank=None if first is None else int(first[1]),
                metadata=dict(page.metadata),
                stored=None if stored is None or stored.get(r.page_id) is None else np.asarray(stored[r.page_id]),
            )
        )
    return Report(query=query, pages=pages, title=title, columns=columns)


def build_pipeline_report(pipeline: Any, query: str, results: Sequence[Any], *, title: str = "minirerank") -> Report:
    """A report for ``results`` of ``pipeline.search(query, ...)``: the query's first-stage similarity maps on
    the reranker's grid (the ones the reranker pruned with), index-time pruning when the reranker uses it, and
    first-stage scores and ranks."""
    from .engine.prefill import select_top
    from .retrieval.importance import page_importance, query_importance

    reranker = pipeline.reranker
    q = pipeline.embedder.encode_query(query)
    maps, stored = {}, {}
    index_keep = float(getattr(getattr(reranker, "config", None), "index_keep_ratio", 1.0))
    for r in results:
        emb = pipeline.index.embedding(r.page_id)
        grid = tuple(reranker.visual_grid(r.page))
        maps[r.page_id] = query_importance(q, emb, grid)
        if index_keep < 1.0:
            stored[r.page_id] = select_top(page_importance(emb, grid), index_keep).numpy()
    retrieval = {r.page_id: (r.first_stage_score, r.first_stage_rank) for r in results}
    return build_report(reranker, query, results, importance=maps, retrieval=retrieval, stored=stored or None, title=title)
