"""Page: a document page image with a stable id, loaded lazily so large collections stay cheap."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any, Union

from PIL import Image

from ..errors import DuplicatePageIdError, InvalidImageError
from ..validation import check_positive_int
from .image import (
    DEFAULT_MAX_IMAGE_PIXELS,
    _os_error_reason,
    load_image,
)

__all__ = ["Page", "PageLike", "as_pages"]

PageLike = Union["Page", str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image]

_B64_CHARS = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_URLSAFE_TO_STD = str.maketrans("-_", "+/")
_HASH_CHUNK = 1 << 20


def _has_image_magic(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a file) starts like PNG, JPEG, GIF, BMP, TIFF or WEBP."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")):
        return True
    if head.startswith(b"RIFF"):
        return head[8:12] == b"WEBP"
    # "BM" is only two bytes: also require BMP's zeroed reserved field so short strings are not misread.
    return head.startswith(b"BM") and len(head) >= 10 and head[6:10] == b"\x00\x00\x00\x00"


def _compact_b64(text: str) -> str:
    # Tolerate line-wrapped, URL-safe and unpadded base64: all are common in JSON payloads.
    compact = "".join(text.split()).translate(_URLSAFE_TO_STD)
    return compact + "=" * (-len(compact) % 4)


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(_compact_b64(text), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"<base64 string, {len(text)} chars>: not valid base64 ({exc})") from exc


def looks_like_base64_image(text: str) -> bool:
    compact = "".join(text.split())
    if len(compact) < 16 or not _B64_CHARS.fullmatch(compact):
        return False
    try:  # decoding 24 chars (18 bytes) is enough for every magic number we check
        head = base64.b64decode(_compact_b64(compact[:24]), validate=True)
    except (binascii.Error, ValueError):
        return False
    return _has_image_magic(head)


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise InvalidImageError(f"<data URL, {len(url)} chars>: no ',' between header and data")
    if header.lower().endswith(";base64"):
        return _b64decode(payload)
    return urllib.parse.unquote_to_bytes(payload)  # percent-encoded data URL (RFC 2397)


def _is_data_url(text: str) -> bool:
    return text[:5].lower() == "data:"


def _fspath(path: str | os.PathLike[str]) -> str:
    result = os.fspath(path)
    if not isinstance(result, str):
        raise TypeError("bytes paths are not supported; pass the path as str or pathlib.Path")
    return result


def _check_id(page_id: object) -> str:
    if not isinstance(page_id, str) or not page_id.strip():
        raise ValueError(f"page id must be a non-empty str, got {page_id!r}")
    return page_id


class Page:
    """A document page image with a stable id and lazy loading.

    ``image`` is a path, encoded image bytes, a base64 string (raw or a ``data:image/...;base64,`` URL) or a
    PIL image. A str is a path unless it starts with ``data:``, or is not an existing path and decodes as
    base64 to bytes that start with an image magic number (PNG, JPEG, GIF, BMP, TIFF, WEBP).

    Nothing is read from disk on construction: file errors surface from :meth:`image` and
    :attr:`content_hash` (malformed base64 is rejected at once, as it is already in memory). The image is
    not cached unless :meth:`load` is called, so thousands of pages do not sit in memory. Equality and
    hashing are by identity; use :attr:`id` to compare pages.
    """

    __slots__ = ("_path", "_data", "_pil", "_id", "_hash", "_cached", "_metadata", "_max_image_pixels")

    def __init__(
        self,
        image: str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image,
        *,
        id: str | None = None,  # noqa: A002 - the public keyword is "id"
        metadata: Mapping[str, Any] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        path: str | None = None
        data: bytes | None = None
        pil: Image.Image | None = None
        if isinstance(image, Image.Image):
            pil = image
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        elif isinstance(image, str) and _is_data_url(image):
            data = _decode_data_url(image)
        elif isinstance(image, str) and not os.path.exists(image) and looks_like_base64_image(image):
            data = _b64decode(image)
        elif isinstance(image, (str, os.PathLike)):
            path = _fspath(image)
        else:
            raise TypeError(
                "Page image must be a path, bytes, a base64 string or a PIL image, "
                f"not {type(image).__name__}"
            )
        self._init(path, data, pil, id, metadata, max_image_pixels)

    def _init(
        self,
        path: str | None,
        data: bytes | None,
        pil: Image.Image | None,
        page_id: str | None,
        metadata: Mapping[str, Any] | None,
        max_image_pixels: int,
    ) -> None:
        self._path, self._data, self._pil = path, data, pil
        self._id = None if page_id is None else _check_id(page_id)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping, not {type(metadata).__name__}")
        self._metadata: dict[str, Any] = dict(metadata or {})
        self._max_image_pixels = check_positive_int("max_image_pixels", max_image_pixels)
        self._hash: str | None = None
        self._cached: Image.Image | None = None

    # -- explicit constructors (no guessing about what a str means) --

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike[str],
        *,
        id: str | None = None,  # noqa: A002
        metadata: Mapping[str, Any] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> Page:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        page = cls.__new__(cls)  # skip __init__'s str sniffing: this is a path, even if it looks like base64
        page._init(_fspath(path), None, None, id, metadata, max_image_pixels)
        return page

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        id: str | None = None,  # noqa: A002
        metadata: Mapping[str, Any] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> Page:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        return cls(data, id=id, metadata=metadata, max_image_pixels=max_image_pixels)

    @classmethod
    def from_base64(
        cls,
        data: str | bytes,
        *,
        id: str | None = None,  # noqa: A002
        metadata: Mapping[str, Any] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> Page:
        """From base64 text or a ``data:`` URL; raises InvalidImageError at once if it does not decode."""
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).decode("ascii", errors="replace")
        if not isinstance(data, str):
            raise TypeError(f"base64 data must be str or bytes, not {type(data).__name__}")
        raw = _decode_data_url(data) if _is_data_url(data) else _b64decode(data)
        return cls(raw, id=id, metadata=metadata, max_image_pixels=max_image_pixels)

    @classmethod
    def from_image(
        cls,
        img: Image.Image,
        *,
        id: str | None = None,  # noqa: A002
        metadata: Mapping[str, Any] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> Page:
        if not isinstance(img, Image.Image):
            raise TypeError(f"img must be a PIL.Image.Image, not {type(img).__name__}")
        return cls(img, id=id, metadata=metadata, max_image_pixels=max_image_pixels)

    # -- properties --

    @property
    def id(self) -> str:
        """The given id, else ``"page-" + content_hash[:16]`` (reads the source once, on first use)."""
        if self._id is None:
            self._id = "page-" + self.content_hash[:16]
        return self._id

    @property
    def content_hash(self) -> str:
        """sha256 hex of the encoded bytes (the same file as path, bytes or base64 hashes the same); for a
        PIL image, of ``f"{mode}:{w}x{h}:"`` plus its raw pixels. Computed once, then cached."""
        if self._hash is None:
            self._hash = self._compute_hash()
        return self._hash

    @property
    def metadata(self) -> dict[str, Any]:
        return self._metadata

    @property
    def source(self) -> str | None:
        """The file path, or None for pages made from bytes, base64 or a PIL image."""
        return self._path

    @property
    def max_image_pixels(self) -> int:
        return self._max_image_pixels

    # -- loading --

    def image(self) -> Image.Image:
        """The page as a decoded RGB image (EXIF orientation applied); freshly loaded unless :meth:`load` ran."""
        if self._cached is not None:
            return self._cached
        source = self._pil if self._pil is not None else self._data if self._data is not None else self._path
        assert source is not None
        return load_image(source, max_image_pixels=self._max_image_pixels)

    def load(self) -> Page:
        """Decode the image now and keep it in memory for later :meth:`image` calls; returns self."""
        if self._cached is None:
            self._cached = self.image()
        return self

    def _compute_hash(self) -> str:
        digest = hashlib.sha256()
        if self._pil is not None:
            img = self._pil
            digest.update(f"{img.mode}:{img.width}x{img.height}:".encode())
            try:
                digest.update(img.tobytes())
            except Exception as exc:  # a lazily opened PIL image can still fail to decode here
                raise InvalidImageError(f"{self._describe()}: cannot decode image ({exc})") from exc
        elif self._data is not None:
            digest.update(self._data)
        else:
            assert self._path is not None
            if os.path.isdir(self._path):
                raise InvalidImageError(f"{self._path}: is a directory, not an image file")
            try:
                with open(self._path, "rb") as fp:
                    while chunk := fp.read(_HASH_CHUNK):  # stream: pages can be tens of MB
                        digest.update(chunk)
            except OSError as exc:
                raise InvalidImageError(f"{self._path}: {_os_error_reason(exc)}") from exc
        return digest.hexdigest()

    def _describe(self) -> str:
        if self._path is not None:
            path = self._path if len(self._path) <= 60 else "..." + self._path[-57:]
            return f"path={path!r}"
        if self._data is not None:
            return f"bytes={len(self._data)}"
        assert self._pil is not None
        return f"image={self._pil.mode} {self._pil.width}x{self._pil.height}"

    def __repr__(self) -> str:
        # Never triggers I/O: an id that is not computed yet shows as pending.
        if self._id is not None:
            shown = repr(self._id)
        elif self._hash is not None:
            shown = repr("page-" + self._hash[:16])
        else:
            shown = "<pending>"
        return f"Page(id={shown}, {self._describe()})"


def as_pages(items: Iterable[PageLike], *, allow_duplicates: bool = False) -> list[Page]:
    """Coerce pages, paths, bytes, base64 strings and PIL images to a list of Pages.

    Unless ``allow_duplicates``, two items sharing an id raise DuplicatePageIdError. Checking ids means
    computing content hashes of pages without an explicit id, which reads their files once.
    """
    if isinstance(items, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, Page)):
        raise TypeError("as_pages() expects an iterable of pages, not a single page; wrap it in a list")
    pages = [item if isinstance(item, Page) else Page(item) for item in items]
    if not allow_duplicates:
        first_index: dict[str, int] = {}
        for index, page in enumerate(pages):
            earlier = first_index.setdefault(page.id, index)
            if earlier != index:
                raise DuplicatePageIdError(
                    f"pages {earlier} and {index} share the id {page.id!r}; give them distinct ids, "
                    "drop the duplicate, or pass allow_duplicates=True"
                )
    return pages
