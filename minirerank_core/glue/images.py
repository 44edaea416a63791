"""Reading the image a framework node or document refers to into a minirerank Page (nothing is downloaded)."""

from __future__ import annotations

import logging
import os
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import InvalidImageError, MissingImageWarning
from ..pages import Page
from ..pages.ingest import IMAGE_EXTENSIONS

logger = logging.getLogger("minirerank.integrations")

MissingImagePolicy = Literal["raise", "skip"]


class NoImage(Exception):
    """Internal: the item carries no usable image; the message says why."""


def local_path_from_url(url: str) -> str:
    """The local path of a file:// URL; NoImage for any other scheme (nothing is downloaded)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        raise NoImage(
            f"image_url {url[:80]!r} is not a local file:// URL; minirerank never downloads images — "
            "fetch the image first and set image_path (or image as base64)"
        )
    if parsed.netloc not in ("", "localhost"):
        raise NoImage(f"image_url {url[:80]!r} names a remote host; only local file:// URLs are read")
    return urllib.request.url2pathname(parsed.path)


def page_from_path(path: str | os.PathLike[str], *, page_id: str, where: str) -> Page:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NoImage(f"{where} {path!r} does not exist" if not os.path.exists(path) else f"{where} {path!r} is not a file")
    return Page.from_path(path, id=page_id)


def page_from_base64(data: str | bytes, *, page_id: str, where: str) -> Page:
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode("ascii", errors="replace")
    if not data.strip():
        raise NoImage(f"{where} is empty")
    try:
        return Page.from_base64(data, id=page_id)
    except InvalidImageError as exc:
        raise InvalidImageError(f"{page_id}: {where} is not valid base64 image data ({exc})") from exc


def page_from_url(url: str, *, page_id: str, where: str) -> Page:
    """A data: URL or a local file:// URL."""
    if url[:5].lower() == "data:":
        return page_from_base64(url, page_id=page_id, where=f"{where} (data URL)")
    return page_from_path(local_path_from_url(url), page_id=page_id, where=where)


def is_image_file_name(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def collect_pages(
    items: Sequence[Any],
    to_page: Callable[[Any, str], Page],
    item_id: Callable[[Any, int], str],
    policy: MissingImagePolicy,
    kind: str,
) -> tuple[list[Page], list[int]]:
    """Pages for the items that have an image and the items' positions. A NoImage raises InvalidImageError
    (policy "raise") or is skipped with one MissingImageWarning per call (policy "skip")."""
    pages: list[Page] = []
    kept: list[int] = []
    skipped: list[str] = []
    for i, item in enumerate(items):
        ident = item_id(item, i)
        try:
            # internal ids are positional: candidates may share an id or have none; results map back by position
            pages.append(to_page(item, f"{i}:{ident}"))
            kept.append(i)
        except NoImage as exc:
            if policy == "raise":
                raise InvalidImageError(
                    f"{kind} {ident!r} has no readable page image: {exc}. Pass on_missing_image='skip' to drop "
                    f"such {kind}s with a warning instead"
                ) from None
            skipped.append(f"{ident!r} ({exc})")
    if skipped:
        msg = f"minirerank skipped {len(skipped)} {kind}(s) without a readable page image: " + "; ".join(skipped[:5])
        if len(skipped) > 5:
            msg += f"; and {len(skipped) - 5} more"
        warnings.warn(msg, MissingImageWarning, stacklevel=5)
        logger.info(msg)  # the warning is what users see; the log line is for traces
    return pages, kept


__all__ = ["MissingImagePolicy", "NoImage", "collect_pages", "is_image_file_name", "local_path_from_url",
           "page_from_base64", "page_from_path", "page_from_url"]
