"""Ingestion: PDFs, image files and folders -> Pages with stable ids, plus a per-file report of what failed.

One bad file never stops a batch: encrypted, corrupt or empty PDFs and unreadable images are reported in
``IngestReport.errors`` (PdfError / InvalidImageError) and everything else is still ingested. Pages whose
content hash was already seen (in this batch, or in ``known``) are skipped and listed in ``duplicates``.

Page ids are ``{document}-p{page:04d}-{hash12}`` for PDF pages and ``{document}-{hash12}`` for image files:
the document is the file name stem (sanitised), the page number is 1-based and hash12 is the first 12 hex
digits of the page's content hash, so the same file yields the same ids on every run and two different
pages never share one.

PDF pages are rendered with pypdfium2 at ``dpi`` (capped by ``pixel_budget`` when given) and kept as PNG
bytes -- or, with ``image_dir``, written there as PNG files so pages stay loadable after the process ends.
The content hash of a PDF page is the sha256 of that PNG.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ..errors import InvalidImageError, PdfError
from ..fileio import write_bytes
from .image import DEFAULT_MAX_IMAGE_PIXELS, PixelBudget, check_image_size, load_image
from .page import Page

__all__ = ["IMAGE_EXTENSIONS", "Duplicate", "IngestError", "IngestReport", "ingest", "reload_page", "render_pdf"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
_PDF_MAGIC = b"%PDF-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class IngestError:
    """A file (or one page of a PDF) that could not be ingested."""

    source: str
    error: Exception
    page: int | None = None  # 1-based PDF page number when only that page failed

    def __str__(self) -> str:
        return str(self.error)  # messages name the file (and page) already


@dataclass(frozen=True)
class Duplicate:
    """A page skipped because a page with the same content was already ingested (or known)."""

    source: str
    page: int | None
    content_hash: str
    duplicate_of: str  # id of the page that was kept


@dataclass
class IngestReport:
    pages: list[Page] = field(default_factory=list)
    errors: list[IngestError] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        return f"{len(self.pages)} pages, {len(self.errors)} errors, {len(self.duplicates)} duplicates skipped"


def ingest(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    dpi: float | None = 144.0,
    pixel_budget: PixelBudget | None = None,
    image_dir: str | os.PathLike[str] | None = None,
    known: Mapping[str, str] | None = None,
    recursive: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    show_progress: bool = True,
) -> IngestReport:
    """Ingest PDFs, image files and folders (walked in sorted order; only PDFs and images are picked up).

    dpi / pixel_budget: PDF render resolution; the budget caps the pixels of each rendered page.
    image_dir: where rendered PDF pages are written as PNG (created if needed); None keeps them in memory.
    known: content hash -> page id of pages already indexed; such pages are reported as duplicates.
    """
    if dpi is None and pixel_budget is None:
        raise ValueError("give dpi, pixel_budget or both")
    if dpi is not None and dpi <= 0:
        raise ValueError(f"dpi must be positive, got {dpi!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out_dir = Path(image_dir) if image_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    report = IngestReport()
    seen: dict[str, str] = dict(known or {})
    files = list(_expand(paths, recursive, report))
    for path in tqdm(files, desc="ingest", unit="file", disable=not show_progress or len(files) < 2):
        if _is_pdf(path):
            _ingest_pdf(path, dpi, pixel_budget, out_dir, max_image_pixels, seen, report)
        else:
            _ingest_image(path, max_image_pixels, seen, report)
    return report


def render_pdf(
    path: str | os.PathLike[str],
    *,
    dpi: float | None = 144.0,
    pixel_budget: PixelBudget | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    pages: Iterable[int] | None = None,
) -> Iterable[tuple[int, int, Image.Image | Exception]]:
    """Yield (page number from 1, page count, RGB image or the error that page raised) for each page, or for
    the 1-based page numbers in ``pages`` (out-of-range ones yield a PdfError).

    Raises PdfError (before yielding anything) when the document cannot be opened or has no pages.
    """
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    name = os.fspath(path)
    try:
        if os.path.getsize(name) == 0:
            raise PdfError(f"{name}: empty file (0 bytes)")
    except OSError as exc:
        raise PdfError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    # PDFium's last error is global and only set on some failures (not for an empty page tree): make it a
    # known value first (a missing file: FPDF_ERR_FILE), so a stale error of another document never shows here.
    pdfium_c.FPDF_LoadDocument(b"/nonexistent/minirerank-reset-pdfium-error", None)
    try:
        pdf = pdfium.PdfDocument(name)
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        if code == pdfium_c.FPDF_ERR_PASSWORD:
            raise PdfError(f"{name}: PDF is encrypted and needs a password; decrypt it first") from exc
        if code == pdfium_c.FPDF_ERR_SECURITY:
            raise PdfError(f"{name}: PDF uses an unsupported security handler") from exc
        if code in (pdfium_c.FPDF_ERR_SUCCESS, pdfium_c.FPDF_ERR_FILE):  # no error set: an empty page tree
            raise PdfError(f"{name}: PDF has no pages") from exc
        if code == pdfium_c.FPDF_ERR_FORMAT:
            raise PdfError(f"{name}: not a valid PDF (corrupt or truncated)") from exc
        raise PdfError(f"{name}: cannot open PDF ({exc})") from exc
    try:
        count = len(pdf)
        if count == 0:
            raise PdfError(f"{name}: PDF has no pages")
        for i in (range(count) if pages is None else (n - 1 for n in pages)):
            if not 0 <= i < count:
                yield i + 1, count, PdfError(f"{name}: no page {i + 1} (the PDF has {count})")
                continue
            try:
                page = pdf[i]
                try:
                    w_pt, h_pt = page.get_size()
                    scale = _render_scale(w_pt, h_pt, dpi, pixel_budget, max_image_pixels)
                    image: Image.Image | Exception = page.render(scale=scale).to_pil().convert("RGB")
                finally:
                    page.close()
                check_image_size(image.size, max_image_pixels, f"{name}: page {i + 1}")
            except InvalidImageError as exc:  # e.g. a strip of a page the vision models cannot take
                image = exc
            except Exception as exc:  # one bad page (broken content stream...) must not sink the document
                image = PdfError(f"{name}: page {i + 1} cannot be rendered ({exc})")
            yield i + 1, count, image
    finally:
        pdf.close()


def reload_page(page_id: str, metadata: Mapping[str, Any], *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Page:
    """The Page that :func:`ingest` made, from its id and metadata (e.g. as stored in a PageIndex): the image
    file when there is one (``image_path``), else the PDF page rendered again with the recorded settings.
    Raises InvalidImageError / PdfError when the source is gone or unreadable."""
    meta = dict(metadata)
    if meta.get("image_path"):
        return Page.from_path(meta["image_path"], id=page_id, metadata=meta, max_image_pixels=max_image_pixels)
    render = meta.get("render")
    if not meta.get("source") or not meta.get("page") or not isinstance(render, Mapping):
        raise InvalidImageError(f"page {page_id!r}: metadata names no image file or PDF page to load it from")
    budget = PixelBudget(max_pixels=render["max_pixels"], min_pixels=1) if render.get("max_pixels") else None
    (_, _, image), = render_pdf(meta["source"], dpi=render.get("dpi"), pixel_budget=budget,
                                max_image_pixels=max_image_pixels, pages=[meta["page"]])
    if isinstance(image, Exception):
        raise image
    return Page(_png(image), id=page_id, metadata=meta, max_image_pixels=max_image_pixels)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _render_scale(
    w_pt: float, h_pt: float, dpi: float | None, budget: PixelBudget | None, max_image_pixels: int
) -> float:
    if w_pt <= 0 or h_pt <= 0:
        raise ValueError(f"page has an empty size {w_pt}x{h_pt} pt")
    limit = min(max_image_pixels, budget.max_pixels) if budget is not None else max_image_pixels
    # Largest scale s with (w*s + 1) * (h*s + 1) <= limit: PDFium rounds bitmap sides up, by < 1 pixel each.
    a, b, c = w_pt * h_pt, w_pt + h_pt, 1.0 - limit
    scale = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    return min(scale, dpi / 72.0) if dpi is not None else scale


def _expand(paths: Iterable[str | os.PathLike[str]], recursive: bool, report: IngestReport) -> Iterable[Path]:
    for p in paths:
        path = Path(p)
        if path.is_dir():
            walker = path.rglob("*") if recursive else path.glob("*")
            for f in sorted(walker):
                if f.is_file() and not f.name.startswith(".") and (f.suffix.lower() in IMAGE_EXTENSIONS or f.suffix.lower() == ".pdf"):
                    yield f
        elif path.is_file():
            yield path
        else:
            report.errors.append(IngestError(os.fspath(path), InvalidImageError(f"{path}: no such file or directory")))


def _is_pdf(path: Path) -> bool:
    if path.suffix.lower() == ".pdf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(_PDF_MAGIC)) == _PDF_MAGIC
    except OSError:
        return False


def _document_id(path: Path) -> str:
    return _UNSAFE.sub("_", path.stem).strip("._-") or "doc"


def _keep(page: Page, source: str, number: int | None, seen: dict[str, str], report: IngestReport) -> None:
    kept = seen.get(page.content_hash)
    if kept is not None:
        report.duplicates.append(Duplicate(source, number, page.content_hash, kept))
        return
    seen[page.content_hash] = page.id
    report.pages.append(page)


def _ingest_pdf(path, dpi, budget, out_dir, max_image_pixels, seen, report) -> None:
    source, doc = os.path.abspath(path), _document_id(path)  # absolute: reload_page works from any cwd
    try:
        for number, count, image in render_pdf(path, dpi=dpi, pixel_budget=budget, max_image_pixels=max_image_pixels):
            if isinstance(image, Exception):
                report.errors.append(IngestError(source, image, number))
                continue
            png = _png(image)
            meta: dict[str, Any] = {
                "source": source, "document": doc, "page": number, "page_count": count,
                "width": image.width, "height": image.height,
                # how it was rendered, so reload_page() can render the identical image again
                "render": {"dpi": dpi, "max_pixels": budget.max_pixels if budget else None},
            }
            page = Page(png, metadata=meta, max_image_pixels=max_image_pixels)
            page_id = f"{doc}-p{number:04d}-{page.content_hash[:12]}"
            if out_dir is not None and page.content_hash not in seen:
                file = out_dir / f"{page_id}.png"
                write_bytes(file, png)
                meta["image_path"] = os.path.abspath(file)
                page = Page.from_path(file, id=page_id, metadata=meta, max_image_pixels=max_image_pixels)
            else:
                page = Page(png, id=page_id, metadata=meta, max_image_pixels=max_image_pixels)
            _keep(page, source, number, seen, report)
    except PdfError as exc:
        report.errors.append(IngestError(source, exc))


def _ingest_image(path: Path, max_image_pixels: int, seen: dict[str, str], report: IngestReport) -> None:
    source = os.path.abspath(path)
    try:
        image = load_image(path, max_image_pixels=max_image_pixels)  # decode now: errors belong in the report
        page = Page.from_path(path, max_image_pixels=max_image_pixels)
        meta = {"source": source, "document": _document_id(path), "width": image.width, "height": image.height,
                "image_path": source}
        page = Page.from_path(path, id=f"{_document_id(path)}-{page.content_hash[:12]}", metadata=meta,
                              max_image_pixels=max_image_pixels)
    except InvalidImageError as exc:
        report.errors.append(IngestError(source, exc))
        return
    _keep(page, source, None, seen, report)
