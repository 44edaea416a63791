"""Page renderer: text blocks (headings, paragraphs, simple tables) -> a page image plus every drawn word's box.

Layouts vary by a seeded style: font family (DejaVu Sans / Serif / Mono, STIX), body and heading sizes, margins,
one or two columns, line spacing, ink and paper tints. The fonts are the TrueType files matplotlib ships, so no
system fonts are needed. The renderer reports exactly which words it drew and where, which the data stage uses
for queries (only text visible on the page) and the reading pretraining uses as dense targets.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# (regular, bold) font files per family, from matplotlib's mpl-data/fonts/ttf.
FAMILIES = {
    "sans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"),
    "serif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"),
    "mono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"),
    "stix": ("STIXGeneral.ttf", "STIXGeneralBol.ttf"),
}


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=128)
def load_font(family: str, bold: bool, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / FAMILIES[family][int(bold)]), size)


@dataclass(frozen=True)
class PageStyle:
    family: str = "sans"
    body_size: int = 15
    heading_size: int = 20
    margin: int = 18
    columns: int = 1
    gutter: int = 12
    line_spacing: float = 1.25
    ink: tuple[int, int, int] = (0, 0, 0)
    paper: tuple[int, int, int] = (255, 255, 255)
    grid: int = 0  # >0: typewriter layout, one glyph per `grid`-px slot, lines of 2*grid px, aligned to the page grid

    def to_dict(self) -> dict:
        return asdict(self)


def sample_style(rng: random.Random, width: int = 320, body_sizes: tuple[int, int] = (14, 18), grid_frac: float = 0.0,
                 grid_px: int = 16) -> PageStyle:
    family = rng.choice(list(FAMILIES))
    if rng.random() < grid_frac:
        # Typewriter layout aligned to the vision tower's patches: one glyph per `grid_px`-wide slot, lines of
        # 2 * grid_px; with grid_px = 16 every 16-px patch holds exactly one glyph and every 32-px merged visual
        # token exactly two glyphs of one line.
        ink = rng.choice([(0, 0, 0), (20, 20, 20), (30, 30, 60), (50, 40, 30)])
        paper = rng.choice([(255, 255, 255), (255, 255, 255), (250, 248, 240), (244, 246, 250)])
        scale = grid_px / 16
        size = round((rng.randint(20, 22) if family == "mono" else rng.randint(17, 19)) * scale)
        return PageStyle(family=family, body_size=size, heading_size=size, margin=2 * grid_px, columns=1,
                         gutter=2 * grid_px, line_spacing=1.0, ink=ink, paper=paper, grid=grid_px)
    body = rng.randint(*body_sizes)
    columns = 2 if (width >= 300 and body <= 15 and rng.random() < 0.3) else 1
    ink = rng.choice([(0, 0, 0), (20, 20, 20), (30, 30, 60), (50, 40, 30)])
    paper = rng.choice([(255, 255, 255), (255, 255, 255), (250, 248, 240), (244, 246, 250)])
    return PageStyle(family=family, body_size=body, heading_size=body + rng.randint(3, 7), margin=rng.randint(12, 26),
                     columns=columns, gutter=rng.randint(10, 16), line_spacing=rng.choice([1.15, 1.25, 1.35, 1.5]),
                     ink=ink, paper=paper)


# --- blocks -------------------------------------------------------------------------------------------------
@dataclass
class Block:
    kind: str  # "heading" | "para" | "table"
    text: str = ""
    rows: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Word:
    text: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in page pixels
    kind: str  # "heading" | "body" | "table"


@dataclass
class RenderedPage:
    image: Image.Image
    words: list[Word]
    rest: list[Block]  # blocks (or the unfinished remainder of one) that did not fit

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)


class _Cursor:
    def __init__(self, style: PageStyle, width: int, height: int):
        self.s = style
        self.width, self.height = width, height
        inner = width - 2 * style.margin - (style.columns - 1) * style.gutter
        self.col_w = inner // style.columns
        self.col = 0
        self.y = style.margin
        self.bottom = height - style.margin

    @property
    def x0(self) -> int:
        return self.s.margin + self.col * (self.col_w + self.s.gutter)

    def need(self, h: int) -> bool:
        """Make room for a line of height h: move to the next column if needed; False when the page is full."""
        if self.y + h <= self.bottom:
            return True
        if self.col + 1 < self.s.columns:
            self.col += 1
            self.y = self.s.margin
            return self.y + h <= self.bottom
        return False


def _length(font, text: str, grid: int) -> float:
    return len(text) * grid if grid else font.getlength(text)


def _draw_text(draw, xy, text: str, font, fill, grid: int, line_h: int) -> tuple[int, int, int, int]:
    """Draw `text` at xy; returns its box. In grid mode each glyph is centred in its own slot."""
    x, y = xy
    if not grid:
        draw.text((x, y), text, font=font, fill=fill)
        return tuple(int(v) for v in draw.textbbox((x, y), text, font=font))
    asc, desc = font.getmetrics()
    top = y + (line_h - (asc + desc)) / 2
    for i, ch in enumerate(text):
        w = font.getlength(ch)
        draw.text((x + i * grid + (grid - w) / 2, top), ch, font=font, fill=fill)
    return (int(x), int(y), int(x + len(text) * grid), int(y + line_h))


def _split_wide(word: str, font, max_w: int, grid: int = 0) -> list[str]:
    """A word wider than the column, cut into pieces that fit (prefer cuts after '.' or '_')."""
    if _length(font, word, grid) <= max_w:
        return [word]
    pieces, cur = [], ""
    for ch in word:
        if cur and _length(font, cur + ch, grid) > max_w:
            cut = max(cur.rfind("."), cur.rfind("_"))
            if cut > 0:
                pieces.append(cur[: cut + 1])
                cur = cur[cut + 1 :]
            else:
                pieces.append(cur)
                cur = ""
        cur += ch
    if cur:
        pieces.append(cur)
    return pieces


def _flow_words(draw, cur: _Cursor, words: list[str], font, line_h: int, kind: str, out: list[Word], ink, grid: int = 0) -> int:
    """Draw words left to right, wrapping; returns how many words were drawn (the rest did not fit)."""
    space = grid if grid else font.getlength(" ")
    i = 0
    x = None
    ascent = font.getmetrics()[0]
    while i < len(words):
        if x is None:
            if not cur.need(line_h):
                return i
            x = cur.x0
        w = words[i]
        wl = _length(font, w, grid)
        if x > cur.x0 and x + wl > cur.x0 + cur.col_w:
            cur.y += line_h
            x = None
            continue
        bb = _draw_text(draw, (x, cur.y), w, font, ink, grid, line_h)
        if not grid:
            bb = (bb[0], int(min(bb[1], cur.y + ascent // 3)), bb[2], bb[3])
        out.append(Word(w, bb, kind))
        x += wl + space
        i += 1
    if x is not None:
        cur.y += line_h
    return i


def render_blocks(blocks: list[Block], style: PageStyle, width: int = 320, height: int = 448) -> RenderedPage:
    """Lay `blocks` out on one page until it is full."""
    img = Image.new("RGB", (width, height), style.paper)
    draw = ImageDraw.Draw(img)
    cur = _Cursor(style, width, height)
    body = load_font(style.family, False, style.body_size)
    bold = load_font(style.family, True, style.heading_size)
    cell_font = load_font(style.family, False, max(12, style.body_size - 2))
    cell_bold = load_font(style.family, True, max(12, style.body_size - 2))
    words: list[Word] = []
    g = style.grid
    body_h = 2 * g if g else int(style.body_size * style.line_spacing)
    head_h = 2 * g if g else int(style.heading_size * 1.2)
    gap = (2 * g if g < 16 else 0) if g else body_h // 2
    if g:
        cell_font, cell_bold = body, bold
    for bi, block in enumerate(blocks):
        if block.kind == "heading":
            toks = [p for w in block.text.split() for p in _split_wide(w, bold, cur.col_w, g)]
            if not cur.need(head_h + body_h):  # never strand a heading at the bottom
                return RenderedPage(img, words, blocks[bi:])
            cur.y += 0 if g else 2
            n = _flow_words(draw, cur, toks, bold, head_h, "heading", words, style.ink, g)
            if n < len(toks):
                return RenderedPage(img, words, blocks[bi + 1 :])
            cur.y += 0 if g else body_h // 3
        elif block.kind == "para":
            toks = [p for w in block.text.split() for p in _split_wide(w, body, cur.col_w, g)]
            n = _flow_words(draw, cur, toks, body, body_h, "body", words, style.ink, g)
            if n < len(toks):
                rest = [Block("para", " ".join(toks[n:]))] + blocks[bi + 1 :]
                return RenderedPage(img, words, rest)
            cur.y += gap
        elif block.kind == "table":
            done = _draw_table(draw, cur, block.rows, cell_font, cell_bold, style, words)
            if done < len(block.rows):
                rest = ([Block("table", rows=[block.rows[0]] + block.rows[done:])] if done > 1 else []) + blocks[bi + 1 :]
                return RenderedPage(img, words, rest)
            cur.y += gap
        else:
            raise ValueError(f"unknown block kind {block.kind!r}")
    return RenderedPage(img, words, [])


def _draw_table(draw, cur: _Cursor, rows, font, bold, style: PageStyle, out: list[Word]) -> int:
    """A two-column ruled table, header row in bold; returns how many rows were drawn."""
    g = style.grid
    pad = 0 if g else 3
    line_h = 2 * g if g else int(font.size * 1.2)
    row_h = line_h + 2 * pad
    left_w = (int(cur.col_w * 0.42) // g * g) if g else int(cur.col_w * 0.42)
    line = tuple(min(255, c + 120) for c in style.ink)
    for r, (a, b) in enumerate(rows):
        f = bold if r == 0 else font
        cells = []
        for text, x0, w in ((a, cur.x0, left_w), (b, cur.x0 + left_w, cur.col_w - left_w)):
            inner = w - 2 * (pad if not g else g)
            toks, lines, cur_line = text.split(), [], []
            for t in toks:
                if cur_line and _length(f, " ".join(cur_line + [t]), g) > inner:
                    lines.append(cur_line)
                    cur_line = []
                cur_line.append(t)
            if cur_line:
                lines.append(cur_line)
            cells.append((lines[:2], x0, w))  # at most two lines per cell
        n_lines = max(1, max(len(c[0]) for c in cells))
        h = row_h + (n_lines - 1) * line_h
        if not cur.need(h):
            return r
        y0 = cur.y
        draw.rectangle([cur.x0, y0, cur.x0 + cur.col_w, y0 + h], outline=line)
        draw.line([cur.x0 + left_w, y0, cur.x0 + left_w, y0 + h], fill=line)
        for lines, x0, w in cells:
            y = y0 + pad
            for ln in lines:
                x = x0 + (g if g else pad)
                for t in ln:
                    if x + _length(f, t, g) > x0 + w - (g if g else pad):
                        break
                    bb = _draw_text(draw, (x, y), t, f, style.ink, g, line_h)
                    out.append(Word(t, bb, "table"))
                    x += _length(f, t + " ", g)
                y += line_h
        cur.y = y0 + h
    return len(rows)
