"""Safe page-image loading, colour-mode normalisation and Qwen-VL-style pixel budgeting.

Every failure to read an image becomes an InvalidImageError (or ImageTooLargeError) that names the source,
so a bad page in a batch of thousands can be found from the message alone.
"""

from __future__ import annotations

import functools
import io
import math
import operator
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageTooLargeError, InvalidImageError
from ..validation import check_positive_int

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageSource",
    "PixelBudget",
    "fit_to_budget",
    "load_image",
    "smart_resize",
    "to_rgb",
]

#: Decompression-bomb guard: an A4 page at 600 dpi is ~35 M pixels, so 64 M leaves headroom for real pages.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 200  # Qwen-VL image processors refuse longer/shorter sides beyond this ratio

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image]

# Raster formats a document page can plausibly come in. Restricting Image.open to these keeps exotic decoders
# (EPS runs Ghostscript, for one) away from untrusted input.
_ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000", "AVIF")

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_DIRECT_TO_RGB_MODES = frozenset({"1", "L", "P", "CMYK", "YCbCr", "HSV", "RGBX"})
_UINT16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})

# warnings.catch_warnings() swaps process-wide state; serialise our own uses of it.
_WARNINGS_LOCK = threading.Lock()


@functools.cache
def _formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin, so the filter below sees what this Pillow build can decode
    return tuple(f for f in _ALLOWED_FORMATS if f in Image.OPEN)


def _describe_source(source: object) -> str:
    """Short human-readable name of an image source for error messages (never dumps the bytes)."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes, {memoryview(source).nbytes} bytes>"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<{type(source).__name__}>"


def _os_error_reason(exc: OSError) -> str:
    """The reason part of a message for a failed file read."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot read file ({exc.strerror or exc})"


def check_image_size(size: tuple[int, int], max_image_pixels: int, name: str) -> None:
    """A page the models can take: not empty, aspect ratio at most MAX_ASPECT_RATIO, at most max_image_pixels."""
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name}: image has an empty size {width}x{height}")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise InvalidImageError(
            f"{name}: image is {width}x{height}, an aspect ratio of {ratio:.0f}; the vision models take at most "
            f"{MAX_ASPECT_RATIO} (crop or split it into pages)"
        )
    if width * height > max_image_pixels:
        raise ImageTooLargeError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_image_pixels:,} (possible decompression bomb); pass a larger max_image_pixels "
            "if this image is trusted"
        )


def _bomb_error(name: str, max_image_pixels: int, exc: Exception) -> ImageTooLargeError:
    # Pillow's own hard limit (2 * Image.MAX_IMAGE_PIXELS) fired before we could read the size ourselves.
    pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if max_image_pixels <= pil_limit:
        return ImageTooLargeError(
            f"{name}: image declares more than {pil_limit:,} pixels, over the limit of {max_image_pixels:,} "
            "(possible decompression bomb)"
        )
    return ImageTooLargeError(
        f"{name}: image declares more than {pil_limit:,} pixels, which Pillow refuses process-wide even though "
        f"max_image_pixels={max_image_pixels:,}; raise PIL.Image.MAX_IMAGE_PIXELS too if this image is trusted"
    )


@contextmanager
def _silence_pil_bomb_warning() -> Iterator[None]:
    # Our own size check, with our own error type, is what the caller should see, not Pillow's warning.
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def load_image(source: ImageSource, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Load a page image as a fully decoded RGB image with its EXIF orientation applied.

    ``source`` is a path, encoded image bytes, or a PIL image. The size declared in the header is checked
    against ``max_image_pixels`` before any pixel is decoded (ImageTooLargeError). Anything unreadable
    (missing, directory, empty, truncated, corrupt, unsupported) raises InvalidImageError naming the source.
    Multi-frame images (GIF, TIFF, ...) yield their first frame.
    """
    check_positive_int("max_image_pixels", max_image_pixels)
    name = _describe_source(source)

    if isinstance(source, Image.Image):
        check_image_size(source.size, max_image_pixels, name)
        return to_rgb(_decode(source, name, max_image_pixels))

    if isinstance(source, (bytes, bytearray, memoryview)):
        if memoryview(source).nbytes == 0:
            raise InvalidImageError(f"{name}: empty data")
        return _open_and_decode(io.BytesIO(source), name, max_image_pixels)

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):  # checked up front: open() on a directory fails differently per OS
            raise InvalidImageError(f"{name}: is a directory, not an image file")
        try:
            fp = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise InvalidImageError(f"{name}: {_os_error_reason(exc)}") from exc
        with fp:
            if os.fstat(fp.fileno()).st_size == 0:
                raise InvalidImageError(f"{name}: file is empty (0 bytes)")
            return _open_and_decode(fp, name, max_image_pixels)

    raise TypeError(
        f"image source must be a path, bytes or a PIL image, not {type(source).__name__}"
    )


def _open_and_decode(fp: IO[bytes], name: str, max_image_pixels: int) -> Image.Image:
    try:
        with _silence_pil_bomb_warning():
            img = Image.open(fp, formats=_formats())  # reads the header only
    except Image.DecompressionBombError as exc:
        raise _bomb_error(name, max_image_pixels, exc) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"{name}: not a recognised image (supported formats: {', '.join(_formats())})"
        ) from exc
    except Exception as exc:  # plugins raise a zoo of types on corrupt headers
        raise InvalidImageError(f"{name}: cannot read image header ({exc})") from exc
    with img:
        check_image_size(img.size, max_image_pixels, name)
        decoded = _decode(img, name, max_image_pixels)
    return to_rgb(decoded)


def _decode(img: Image.Image, name: str, max_image_pixels: int) -> Image.Image:
    """Decode every pixel (so truncation fails here, not later) and apply EXIF orientation (a new image)."""
    try:
        img.load()
        return ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(name, max_image_pixels, exc) from exc
    except Exception as exc:
        raise InvalidImageError(f"{name}: cannot decode image, truncated or corrupt ({exc})") from exc


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalise any common PIL mode to RGB: transparency is composited onto white (a page's background),
    high-bit-depth greyscale is rescaled to 8 bits rather than clipped. Unknown modes raise InvalidImageError.
    """
    mode = img.mode
    if mode in _UINT16_MODES or mode in ("I", "F"):
        return _high_depth_to_rgb(img)  # a transparency key on 16-bit grey is ignored
    if _has_transparency(img):
        if mode == "La":
            img = img.convert("LA")  # Pillow cannot go from premultiplied La straight to RGBA
        try:
            rgba = img.convert("RGBA")
        except ValueError as exc:
            raise InvalidImageError(f"unsupported image mode {mode!r} with transparency") from exc
        return Image.alpha_composite(Image.new("RGBA", img.size, _WHITE), rgba).convert("RGB")
    if mode == "RGB":
        return img
    if mode in _DIRECT_TO_RGB_MODES:
        return img.convert("RGB")
    # e.g. "LAB": Pillow's convert() would copy the channels, not convert the colours.
    raise InvalidImageError(f"unsupported image mode {mode!r}; convert the image to RGB first")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    a = np.asarray(img)
    if a.size == 0:
        return Image.new("RGB", img.size)
    if img.mode in _UINT16_MODES:
        out = np.rint(a.astype(np.float32) / 257.0)  # full 0..65535 range -> 0..255
    elif img.mode == "I":
        a = np.clip(a.astype(np.float64), 0, None)
        peak = float(a.max())
        # Many "I" images are really 8-bit data in a 32-bit container; only rescale when they are not.
        out = np.rint(a * (255.0 / peak)) if peak > 255 else a
    else:  # "F"
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if hi <= 1.0:
            out = np.rint(np.clip(a, 0.0, 1.0) * 255.0)  # already a [0, 1] intensity image
        elif hi > lo:
            out = np.rint((a - lo) * (255.0 / (hi - lo)))
        else:
            out = np.full_like(a, 255.0)  # constant and above 1: saturated
    gray = np.clip(out, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): both divisible by ``factor``, area within [min_pixels, max_pixels]
    where possible, aspect ratio kept as closely as possible. Same arithmetic (and rounding) as
    transformers' ``qwen2_vl.image_processing_qwen2_vl.smart_resize``, so results match it exactly.
    """
    height, width = operator.index(height), operator.index(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    for arg, value in (("factor", factor), ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        check_positive_int(arg, value)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InvalidImageError(
            f"image {width}x{height} has an aspect ratio of {ratio:.1f}; at most {MAX_ASPECT_RATIO} is supported"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class PixelBudget:
    """Pixel range a page is resized into before the vision encoder (Qwen-VL ``min_pixels``/``max_pixels``)."""

    max_pixels: int
    min_pixels: int = 56 * 56

    def __post_init__(self) -> None:
        check_positive_int("max_pixels", self.max_pixels)
        check_positive_int("min_pixels", self.min_pixels)
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})"
            )

    @classmethod
    def from_visual_tokens(
        cls, max_visual_tokens: int, *, patch_size: int, merge_size: int = 2
    ) -> PixelBudget:
        """Budget of at most ``max_visual_tokens`` merged visual tokens per page."""
        check_positive_int("max_visual_tokens", max_visual_tokens)
        check_positive_int("patch_size", patch_size)
        check_positive_int("merge_size", merge_size)
        max_pixels = max_visual_tokens * (patch_size * merge_size) ** 2
        # Keep the default floor unless the budget itself is below it (tiny budgets stay valid).
        return cls(max_pixels=max_pixels, min_pixels=min(56 * 56, max_pixels))

    def visual_tokens(self, height: int, width: int, *, patch_size: int, merge_size: int = 2) -> int:
        """Merged visual tokens an image of ``height`` x ``width`` costs after resizing into this budget."""
        check_positive_int("patch_size", patch_size)
        check_positive_int("merge_size", merge_size)
        factor = patch_size * merge_size
        h, w = smart_resize(
            height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        return (h // factor) * (w // factor)


def fit_to_budget(img: Image.Image, budget: PixelBudget, *, factor: int) -> Image.Image:
    """Resize (bicubic) to the smart_resize size for ``budget``; returns ``img`` itself if already that size.

    The first-stage embedder and the reranker both call this, so they see the identical resized page.
    """
    h, w = smart_resize(
        img.height, img.width, factor=factor, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels
    )
    if (w, h) == img.size:
        return img
    return img.resize((w, h), Image.Resampling.BICUBIC)
