"""Handing the reranked pages to the answering model: one user turn with each page's label and its image, in rank
order, then the question. Framework-free: the LlamaIndex and LangChain helpers turn these parts into their own
message types (ChatMessage with TextBlock / ImageBlock; HumanMessage with text / image content blocks), so both
frameworks send the model the same turn.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from PIL import Image, UnidentifiedImageError

from ..errors import InvalidImageError
from ..pages import Page
from ..validation import check_choice, check_query
from .images import collect_pages
from .reranking import POLICIES

#: What the model is told before the pages (override with ``instruction=``).
DEFAULT_INSTRUCTION = (
    "Answer the question from the page images below. They are ranked most relevant first; each image follows its "
    "label. Cite the pages you use by their labels."
)
# Formats every multimodal chat API accepts as they are; other files (TIFF, BMP...) and in-memory pages go as PNG.
_PASS_THROUGH = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


@dataclass(frozen=True)
class EncodedImage:
    """An encoded page image for an LLM request."""

    data: bytes
    mime_type: str

    @property
    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    def data_url(self) -> str:
        return f"data:{self.mime_type};base64,{self.base64}"


#: One part of the user turn: text, or a page image.
Part = Union[str, EncodedImage]


def encode_page(page: Page) -> EncodedImage:
    """The page's image as the answering model receives it: an image file in a format every multimodal API takes
    (PNG, JPEG, GIF, WEBP) as its own bytes; any other file, and a page held in memory, as PNG."""
    if page.source is not None:
        try:
            data = Path(page.source).read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
        except (OSError, UnidentifiedImageError) as exc:
            raise InvalidImageError(f"{page.source}: cannot read the page image ({exc})") from exc
        if fmt in _PASS_THROUGH:
            return EncodedImage(data, _PASS_THROUGH[fmt])
    buf = io.BytesIO()
    page.image().save(buf, format="PNG", compress_level=3)
    return EncodedImage(buf.getvalue(), "image/png")


def item_label(metadata: Mapping[str, Any] | None, fallback: str) -> str:
    """A short label for a page ("report.pdf, page 3"): the file name of ``metadata["source"]`` (else
    ``file_path`` / ``image_path``) and ``metadata["page"]`` as minirerank's retrievers write them; ``fallback``
    (an id) when no file is named."""
    md = metadata or {}
    source = md.get("source") or md.get("file_path") or md.get("image_path")
    name = os.path.basename(str(source).rstrip("/")) if source else fallback
    page = md.get("page")
    return f"{name}, page {page}" if page is not None else name


def prompt_parts(
    query: str,
    items: Sequence[Any],
    to_page: Callable[[Any, str], Page],
    item_id: Callable[[Any, int], str],
    label: Callable[[Any, int], str],
    kind: str,
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    on_missing_image: str = "raise",
) -> list[Part]:
    """The user turn for ``query`` over ``items`` (nodes or documents, best first), as parts in order:
    the instruction, then for each page "[i] label" and its image, then "Question: ...". An item without a readable
    image raises InvalidImageError naming it, or is left out with a MissingImageWarning (``on_missing_image="skip"``)."""
    query = check_query(query)
    policy = check_choice("on_missing_image", on_missing_image, POLICIES)
    pages, kept = collect_pages(items, to_page, item_id, policy, kind)  # type: ignore[arg-type]
    parts: list[Part] = [instruction] if instruction else []
    for n, (page, i) in enumerate(zip(pages, kept), start=1):
        parts += [f"[{n}] {label(items[i], i)}", encode_page(page)]
    parts.append(f"Question: {query}")
    return parts


__all__ = ["DEFAULT_INSTRUCTION", "EncodedImage", "Part", "encode_page", "item_label", "prompt_parts"]
