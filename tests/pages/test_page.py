"""Tests for minirerank_core.pages: loading, mode normalisation, bomb guard, budgets and the Page type."""

from __future__ import annotations

import ast
import base64
import dataclasses
import hashlib
import importlib.util
import io
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from minirerank_core.errors import DuplicatePageIdError, ImageTooLargeError, InvalidImageError
from minirerank_core.pages import (
    DEFAULT_MAX_IMAGE_PIXELS,
    Page,
    PixelBudget,
    as_pages,
    fit_to_budget,
    load_image,
    smart_resize,
    to_rgb,
)

# ---------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def two_colour_image() -> Image.Image:
    """20x10 RGB: left half red, right half blue (exact under PNG, distinguishable under JPEG)."""
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))
    return img


def noisy_image(size: int = 96) -> Image.Image:
    """Incompressible content, so cutting the encoded file in half really cuts into the pixel data."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, followed by a token IDAT: tiny on disk, huge if decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def px(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return img.getpixel(xy)


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


@pytest.fixture
def png_bytes() -> bytes:
    return encode(two_colour_image())


@pytest.fixture
def png_path(tmp_path: Path, png_bytes: bytes) -> Path:
    path = tmp_path / "page.png"
    path.write_bytes(png_bytes)
    return path


# ---------------------------------------------------------------- sources


def assert_two_colour(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert img.size == (20, 10)
    assert px(img, (2, 5)) == (255, 0, 0)
    assert px(img, (17, 5)) == (0, 0, 255)


def test_load_image_from_every_source_kind(png_path: Path, png_bytes: bytes) -> None:
    for source in (png_path, str(png_path), png_bytes, bytearray(png_bytes), memoryview(png_bytes)):
        assert_two_colour(load_image(source))
    original = two_colour_image().convert("RGBA")
    out = load_image(original)
    assert_two_colour(out)
    assert original.mode == "RGBA"  # the caller's image is not modified


def test_page_from_every_source_kind(png_path: Path, png_bytes: bytes) -> None:
    b64 = base64.b64encode(png_bytes).decode()
    pages = [
        Page(png_path),
        Page(str(png_path)),
        Page(png_bytes),
        Page(b64),
        Page("data:image/png;base64," + b64),
        Page(two_colour_image()),
        Page.from_path(png_path),
        Page.from_bytes(png_bytes),
        Page.from_base64(b64),
        Page.from_base64("data:image/png;base64," + b64),
        Page.from_base64(b64.encode()),
        Page.from_image(two_colour_image()),
    ]
    for page in pages:
        assert_two_colour(page.image())
    assert [p.source for p in pages[:2]] == [str(png_path)] * 2
    assert all(p.source is None for p in pages[2:6])


def test_base64_variants_decode(png_bytes: bytes) -> None:
    b64 = base64.b64encode(png_bytes).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME line wrapping
    urlsafe_unpadded = base64.urlsafe_b64encode(png_bytes).decode().rstrip("=")
    for text in (wrapped, urlsafe_unpadded):
        assert Page(text).content_hash == hashlib.sha256(png_bytes).hexdigest()


def test_str_that_is_an_existing_path_wins_over_base64(
    tmp_path: Path, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = base64.b64encode(png_bytes[:60]).decode().replace("/", "_")  # a valid file name, PNG magic inside
    monkeypatch.chdir(tmp_path)
    Path(name).write_bytes(png_bytes)
    assert Page(name).source == name
    assert Page(name + "A" * 4).source is None  # same text, no such file: read as base64


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_base64_of_each_known_format_is_detected(fmt: str) -> None:
    data = encode(two_colour_image(), fmt)
    page = Page(base64.b64encode(data).decode())
    assert page.source is None
    assert page.content_hash == hashlib.sha256(data).hexdigest()
    assert page.image().size == (20, 10)


def test_str_that_is_not_image_base64_is_a_path() -> None:
    text = base64.b64encode(b"plain text, not an image").decode()
    page = Page(text)
    assert page.source == text
    with pytest.raises(InvalidImageError, match="file not found"):
        page.image()


def test_explicit_constructors_reject_wrong_types(png_bytes: bytes) -> None:
    with pytest.raises(TypeError):
        Page.from_image(png_bytes)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Page.from_bytes("x.png")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Page(12345)  # type: ignore[arg-type]
    with pytest.raises(InvalidImageError, match="not valid base64"):
        Page.from_base64("!!! not base64 !!!")


# ---------------------------------------------------------------- laziness, hashing, ids


def test_page_is_lazy_on_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    page = Page(missing, id="p1")
    assert page.id == "p1"
    assert "nope.png" in repr(page)
    with pytest.raises(InvalidImageError, match=r"nope\.png.*file not found"):
        page.image()
    with pytest.raises(InvalidImageError, match="file not found"):
        _ = page.content_hash


def test_page_reads_file_only_when_asked(tmp_path: Path, png_bytes: bytes) -> None:
    path = tmp_path / "later.png"
    page = Page(path)  # the file does not exist yet
    path.write_bytes(png_bytes)
    assert page.content_hash == hashlib.sha256(png_bytes).hexdigest()
    assert_two_colour(page.image())


def test_same_bytes_hash_the_same_from_every_source(png_path: Path, png_bytes: bytes) -> None:
    b64 = base64.b64encode(png_bytes).decode()
    expected = hashlib.sha256(png_bytes).hexdigest()
    pages = [Page(png_path), Page(png_bytes), Page(b64), Page(f"data:image/png;base64,{b64}")]
    assert {p.content_hash for p in pages} == {expected}
    assert {p.id for p in pages} == {"page-" + expected[:16]}


def test_content_hash_of_pil_image_covers_mode_size_and_pixels() -> None:
    img = Image.new("L", (3, 2), 7)
    expected = hashlib.sha256(b"L:3x2:" + bytes([7] * 6)).hexdigest()
    assert Page(img).content_hash == expected
    assert Page(Image.new("L", (2, 3), 7)).content_hash != expected  # same bytes, other shape


def test_content_hash_is_cached(tmp_path: Path, png_bytes: bytes) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes)
    page = Page(path)
    first = page.content_hash
    path.unlink()
    assert page.content_hash == first
    assert page.id == "page-" + first[:16]


@pytest.mark.parametrize("bad", ["", "   ", 5, b"id"])
def test_page_id_must_be_non_empty_str(png_bytes: bytes, bad: object) -> None:
    with pytest.raises(ValueError, match="page id"):
        Page(png_bytes, id=bad)  # type: ignore[arg-type]


def test_metadata_is_copied_and_identity_semantics(png_bytes: bytes) -> None:
    meta = {"doc": "report.pdf", "page": 3}
    a = Page(png_bytes, id="x", metadata=meta)
    meta["page"] = 99
    assert a.metadata == {"doc": "report.pdf", "page": 3}
    b = Page(png_bytes, id="x")
    assert a != b and a == a  # noqa: PLR0124 - identity, not id, equality
    assert len({a, b}) == 2


def test_repr_is_short_and_does_no_io(tmp_path: Path) -> None:
    big = encode(noisy_image(256))
    text = repr(Page(big))
    assert text == f"Page(id=<pending>, bytes={len(big)})"
    assert repr(Page(tmp_path / "missing.png")).startswith("Page(id=<pending>, path=")
    assert repr(Page(Image.new("L", (4, 5)), id="k")) == "Page(id='k', image=L 4x5)"


def test_image_is_not_cached_unless_loaded(png_bytes: bytes) -> None:
    page = Page(png_bytes)
    assert page.image() is not page.image()
    assert page.load() is page
    assert page.image() is page.image()


# ---------------------------------------------------------------- EXIF, frames


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    img = load_image(encode(two_colour_image(), "JPEG", quality=95, exif=exif))
    assert img.size == (10, 20)
    # Rotating clockwise moves the red left half to the top.
    assert close_to(px(img, (5, 3)), (255, 0, 0), 40)
    assert close_to(px(img, (5, 16)), (0, 0, 255), 40)


def test_multi_frame_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert px(load_image(data)) == (255, 0, 0)


# ---------------------------------------------------------------- colour modes


def test_rgba_and_la_composite_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 128)])
    out = to_rgb(rgba)
    assert out.mode == "RGB"
    assert px(out, (0, 0)) == (255, 255, 255)
    assert px(out, (1, 0)) == (0, 0, 0)
    assert close_to(px(out, (2, 0)), (127, 127, 127), 1)

    la = Image.new("LA", (2, 1))
    la.putdata([(100, 0), (100, 255)])
    out = to_rgb(la)
    assert [px(out, (x, 0)) for x in range(2)] == [(255, 255, 255), (100, 100, 100)]


def test_palette_with_transparency_composites_on_white() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255])
    img.putdata([0, 1])
    img.info["transparency"] = 0
    assert [px(to_rgb(img), (x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]
    # Through a real PNG file (tRNS chunk) as well.
    loaded = load_image(encode(img, "PNG", transparency=0))
    assert [px(loaded, (x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]


def test_palette_with_alpha_palette_composites_on_white() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 0, 255, 255], "RGBA")  # entry 0 fully transparent
    img.putdata([0, 1])
    assert "transparency" not in img.info
    assert [px(to_rgb(img), (x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]


def test_rgba_png_file_composites_on_white() -> None:
    img = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    img.putpixel((1, 0), (10, 20, 30, 255))
    loaded = load_image(encode(img))
    assert [px(loaded, (x, 0)) for x in range(2)] == [(255, 255, 255), (10, 20, 30)]


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("1", 0, (0, 0, 0)),
        ("CMYK", (0, 255, 0, 0), (255, 0, 255)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("RGB", (1, 2, 3), (1, 2, 3)),
    ],
)
def test_simple_modes_convert_to_rgb(mode: str, colour: object, expected: tuple[int, int, int]) -> None:
    out = to_rgb(Image.new(mode, (2, 2), colour))
    assert out.mode == "RGB"
    assert close_to(px(out), expected, 1)


def test_rgb_is_returned_as_is() -> None:
    img = Image.new("RGB", (2, 2))
    assert to_rgb(img) is img


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    img = Image.fromarray(np.array([[0, 32768, 65535, 38550]], dtype=np.uint16))
    assert img.mode == "I;16"
    out = to_rgb(img)
    expected = [(0, 0, 0), (128, 128, 128), (255, 255, 255), (150, 150, 150)]  # 38550 / 257 = 150 exactly
    assert [px(out, (x, 0)) for x in range(4)] == expected
    big_endian = Image.frombytes("I;16B", (3, 1), np.array([0, 32768, 65535], dtype=">u2").tobytes())
    assert [px(to_rgb(big_endian), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    # And through a 16-bit PNG file, whatever mode Pillow opens it in.
    loaded = load_image(encode(img))
    assert [px(loaded, (x, 0))[0] for x in range(4)] == [0, 128, 255, 150]


def test_32_bit_int_uses_its_own_range() -> None:
    wide = to_rgb(Image.fromarray(np.array([[0, 500, 1000, -5]], dtype=np.int32)))
    assert [px(wide, (x, 0))[0] for x in range(4)] == [0, 128, 255, 0]
    narrow = to_rgb(Image.fromarray(np.array([[0, 100, 200]], dtype=np.int32)))
    assert [px(narrow, (x, 0))[0] for x in range(3)] == [0, 100, 200]  # already 8-bit data


def test_float_images() -> None:
    unit = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0, -0.2]], dtype=np.float32)))
    assert unit.mode == "RGB"
    assert [px(unit, (x, 0))[0] for x in range(4)] == [0, 128, 255, 0]
    wide = to_rgb(Image.fromarray(np.array([[10.0, 20.0, 30.0]], dtype=np.float32)))
    assert [px(wide, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(InvalidImageError, match="LAB"):
        to_rgb(Image.new("LAB", (2, 2)))


# ---------------------------------------------------------------- unreadable inputs


def test_unreadable_files(tmp_path: Path) -> None:
    png, jpeg = encode(noisy_image()), encode(noisy_image(), "JPEG")
    cases = {
        "empty.png": b"",
        "garbage.png": b"\x00\x13definitely not an image\xff" * 20,
        "notes.txt": b"hello, this is text\n",
        "half.png": png[: len(png) // 2],
        "half.jpg": jpeg[: len(jpeg) // 2],
        "image.tga": encode(two_colour_image(), "TGA"),  # Pillow reads TGA; pages may not
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InvalidImageError) as info:
            load_image(path)
        assert name in str(info.value), info.value
        assert not isinstance(info.value, ImageTooLargeError)
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        load_image(tmp_path / "half.png")
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        load_image(tmp_path / "half.jpg")
    with pytest.raises(InvalidImageError, match="not a recognised image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(InvalidImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(InvalidImageError, match="file not found"):
        load_image(tmp_path / "missing.png")


def test_unreadable_bytes_name_the_source() -> None:
    with pytest.raises(InvalidImageError, match=r"<bytes, 0 bytes>: empty"):
        load_image(b"")
    with pytest.raises(InvalidImageError, match=r"<bytes, 60 bytes>: not a recognised image"):
        load_image(b"garbage!" * 7 + b"1234")
    jpeg = encode(noisy_image(), "JPEG")
    with pytest.raises(InvalidImageError, match=rf"<bytes, {len(jpeg) // 2} bytes>.*truncated"):
        Page(jpeg[: len(jpeg) // 2]).image()


def test_load_image_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        load_image(12)  # type: ignore[arg-type]


# ---------------------------------------------------------------- decompression bombs


@pytest.mark.parametrize("side", [30_000, 10_000, 9_000])  # over Pillow's error, over its warning, ours only
def test_decompression_bomb_is_caught_from_the_header(
    tmp_path: Path, side: int, recwarn: pytest.WarningsRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = png_header_only(side, side)
    assert len(data) < 200
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    decoded = []  # refused from the header alone: the pixel decoder never runs
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real_load(self))
    for source in (path, data):
        with pytest.raises(ImageTooLargeError, match="bomb|limit") as info:
            load_image(source)
        assert ("bomb.png" in str(info.value)) == (source is path)
    assert decoded == []
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pillow_hard_limit_still_reports_our_error_type() -> None:
    # A caller limit above Pillow's process-wide one cannot lift Pillow's; the message says what to change.
    with pytest.raises(ImageTooLargeError, match=r"PIL\.Image\.MAX_IMAGE_PIXELS"):
        load_image(png_header_only(30_000, 30_000), max_image_pixels=2_000_000_000)


def test_pixel_limit_applies_to_normal_images(png_bytes: bytes) -> None:
    assert DEFAULT_MAX_IMAGE_PIXELS == 64_000_000
    with pytest.raises(ImageTooLargeError, match="20x10 = 200 pixels"):
        load_image(png_bytes, max_image_pixels=199)
    assert load_image(png_bytes, max_image_pixels=200).size == (20, 10)  # the limit itself is allowed
    with pytest.raises(ImageTooLargeError):
        Page(png_bytes, max_image_pixels=100).image()
    with pytest.raises(ImageTooLargeError):
        load_image(Image.new("L", (100, 100)), max_image_pixels=9_999)
    with pytest.raises(ValueError, match="max_image_pixels"):
        load_image(png_bytes, max_image_pixels=0)


def test_header_size_check_runs_before_decoding() -> None:
    # The header says 64x64 but the pixel data is junk: the size error must win, i.e. come before decoding.
    data = png_header_only(64, 64)
    with pytest.raises(ImageTooLargeError):
        load_image(data, max_image_pixels=64 * 64 - 1)
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        load_image(data, max_image_pixels=64 * 64)


def test_pillow_bomb_warning_never_escapes() -> None:
    # 10000x10000 passes our raised limit but is over Pillow's warning threshold.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would raise here
        with pytest.raises(InvalidImageError, match="truncated or corrupt"):  # junk pixels fail decoding
            load_image(png_header_only(10_000, 10_000), max_image_pixels=150_000_000)


# ---------------------------------------------------------------- smart_resize, budgets


def transformers_smart_resize():
    """transformers' own qwen2_vl smart_resize, compiled from its source file: importing transformers costs
    seconds, and this function only needs `math`."""
    spec = importlib.util.find_spec("transformers")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "models" / "qwen2_vl" / "image_processing_qwen2_vl.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize")
    namespace: dict[str, object] = {"math": math}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["smart_resize"]


SIZES = [
    (28, 28), (10, 10), (1, 200), (200, 1), (3508, 2480), (2480, 3508), (1000, 800), (1123, 794),
    (56 * 200, 56), (4000, 100), (99, 4321), (25, 5000), (1654, 2339), (37, 41), (1080, 1920),
    (70, 1000), (1000, 70), (80, 1000),  # h / factor is exactly x.5: Python's round() goes to even
]  # fmt: skip


def test_smart_resize_matches_transformers() -> None:
    reference = transformers_smart_resize()
    budgets = [(28, 56 * 56, 14 * 14 * 4 * 1280), (28, 256 * 28 * 28, 768 * 28 * 28), (32, 4096, 1024 * 32 * 32)]
    checked = 0
    for factor, min_pixels, max_pixels in budgets:
        for h, w in SIZES:
            ours = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            theirs = reference(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            assert ours == theirs, (h, w, factor, min_pixels, max_pixels)
            checked += 1
    assert checked == len(budgets) * len(SIZES)
    assert smart_resize(3508, 2480, factor=28, min_pixels=3136, max_pixels=768 * 784) == (896, 644)


def test_smart_resize_rejects_extreme_aspect_and_bad_args() -> None:
    with pytest.raises(InvalidImageError, match="aspect ratio"):
        smart_resize(10, 2010, factor=28, min_pixels=3136, max_pixels=1_000_000)
    with pytest.raises(ValueError, match="aspect ratio"):  # the same ValueError transformers raises
        transformers_smart_resize()(10, 2010)
    with pytest.raises(ValueError):
        smart_resize(0, 10, factor=28, min_pixels=1, max_pixels=10)
    with pytest.raises(ValueError):
        smart_resize(10, 10, factor=0, min_pixels=1, max_pixels=10)


def test_pixel_budget_math() -> None:
    budget = PixelBudget.from_visual_tokens(768, patch_size=14)
    assert budget == PixelBudget(max_pixels=768 * 28 * 28, min_pixels=56 * 56)
    qwen3 = PixelBudget.from_visual_tokens(1280, patch_size=16, merge_size=2)
    assert qwen3.max_pixels == 1280 * 32 * 32
    # A4 at 300 dpi resizes to 896x644 = 32 x 23 merged tokens.
    assert budget.visual_tokens(3508, 2480, patch_size=14) == 32 * 23
    assert budget.visual_tokens(3508, 2480, patch_size=14) <= 768
    assert budget.visual_tokens(28, 28, patch_size=14) == 4  # lifted to min_pixels: 56x56
    # A budget below the default floor stays valid by lowering the floor.
    assert PixelBudget.from_visual_tokens(1, patch_size=14) == PixelBudget(max_pixels=784, min_pixels=784)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_pixels": 0}, {"max_pixels": -5}, {"max_pixels": 1000, "min_pixels": 2000}, {"max_pixels": 1.5e6}],
)
def test_pixel_budget_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PixelBudget(**kwargs)


def test_pixel_budget_is_frozen_and_validates_tokens() -> None:
    budget = PixelBudget(max_pixels=10_000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        budget.max_pixels = 5  # type: ignore[misc]
    with pytest.raises(ValueError):
        PixelBudget.from_visual_tokens(0, patch_size=14)
    with pytest.raises(ValueError):
        PixelBudget.from_visual_tokens(10, patch_size=0)


@pytest.mark.parametrize("size", [(1700, 2200), (300, 90), (20, 10), (56, 56), (3000, 400)])
def test_fit_to_budget_dims(size: tuple[int, int]) -> None:
    budget = PixelBudget.from_visual_tokens(256, patch_size=14)
    out = fit_to_budget(Image.new("RGB", size, (9, 9, 9)), budget, factor=28)
    w, h = out.size
    assert w % 28 == 0 and h % 28 == 0
    assert budget.min_pixels <= w * h <= budget.max_pixels
    assert (h, w) == smart_resize(size[1], size[0], factor=28, min_pixels=3136, max_pixels=256 * 784)
    assert px(out) == (9, 9, 9)


def test_fit_to_budget_returns_same_object_when_already_fitting() -> None:
    img = Image.new("RGB", (280, 560))
    assert fit_to_budget(img, PixelBudget(max_pixels=280 * 560), factor=28) is img
    smaller = fit_to_budget(img, PixelBudget(max_pixels=280 * 560 - 1), factor=28)
    assert smaller is not img and smaller.size == (252, 532)


# ---------------------------------------------------------------- as_pages


def test_as_pages_coerces_every_kind(png_path: Path, png_bytes: bytes) -> None:
    existing = Page(Image.new("RGB", (5, 5)), id="given")
    items = [existing, png_path, Image.new("RGB", (3, 3), (1, 1, 1)), encode(noisy_image(8))]
    pages = as_pages(items)
    assert pages[0] is existing
    assert all(isinstance(p, Page) for p in pages)
    assert len({p.id for p in pages}) == 4
    assert as_pages([]) == []


def test_as_pages_detects_duplicate_ids(png_path: Path, png_bytes: bytes) -> None:
    with pytest.raises(DuplicatePageIdError, match="'dup'"):
        as_pages([Page(png_bytes, id="dup"), Page(Image.new("L", (2, 2)), id="dup")])
    same_content = "page-" + hashlib.sha256(png_bytes).hexdigest()[:16]
    with pytest.raises(DuplicatePageIdError, match=same_content):
        as_pages([png_path, png_bytes])  # the same file twice, as path and as bytes
    page = Page(png_bytes)
    with pytest.raises(DuplicatePageIdError):
        as_pages([page, page])
    assert len(as_pages([png_path, png_bytes], allow_duplicates=True)) == 2


def test_as_pages_with_duplicates_allowed_stays_lazy(tmp_path: Path) -> None:
    pages = as_pages([tmp_path / "missing.png"], allow_duplicates=True)
    assert len(pages) == 1
    with pytest.raises(InvalidImageError):
        as_pages([tmp_path / "missing.png"])  # computing the content id needs the file


def test_as_pages_rejects_a_single_item(png_path: Path) -> None:
    with pytest.raises(TypeError, match="iterable"):
        as_pages(str(png_path))  # type: ignore[arg-type]
