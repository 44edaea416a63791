"""Page images: safe loading, colour normalisation, pixel budgets, and the lazy Page type."""

from __future__ import annotations

from .image import DEFAULT_MAX_IMAGE_PIXELS, PixelBudget, fit_to_budget, load_image, smart_resize, to_rgb
from .ingest import IngestReport, ingest, reload_page
from .page import Page, as_pages

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IngestReport",
    "Page",
    "PixelBudget",
    "as_pages",
    "fit_to_budget",
    "ingest",
    "load_image",
    "reload_page",
    "smart_resize",
    "to_rgb",
]
