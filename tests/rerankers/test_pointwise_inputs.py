"""Bad input through the public API: a clear exception type and message, and nothing half-written on disk."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minirerank_core import (
    ConfigError,
    DuplicatePageIdError,
    EmptyCandidatesError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidImportanceError,
    InvalidQueryError,
    MiniReranker,
    Page,
    RerankConfig,
    UnsupportedModelError,
)
from minirerank_core.cache import read_entry


@pytest.fixture(scope="module")
def reranker_and_pages(tiny, page_images):
    model, proc = tiny("qwen3_vl")
    return MiniReranker(model, proc), [Page(im, id=f"p{i}") for i, im in enumerate(page_images)]


@pytest.mark.parametrize("query", ["", "   \n", None, 42])
def test_empty_or_non_string_query(reranker_and_pages, query):
    r, pages = reranker_and_pages
    with pytest.raises(InvalidQueryError, match="query"):
        r.rerank(query, pages)


def test_empty_candidate_list(reranker_and_pages):
    r, _ = reranker_and_pages
    with pytest.raises(EmptyCandidatesError, match="at least one"):
        r.rerank("q", [])


def test_duplicate_page_ids(reranker_and_pages):
    r, pages = reranker_and_pages
    with pytest.raises(DuplicatePageIdError, match="p0"):
        r.rerank("q", [pages[0], Page(pages[1].image(), id="p0")])


@pytest.mark.parametrize("top_n", [0, -1, 1.5, True])
def test_bad_top_n(reranker_and_pages, top_n):
    r, pages = reranker_and_pages
    with pytest.raises(ConfigError, match="top_n"):
        r.rerank("q", pages, top_n=top_n)


def test_top_n_and_ranks(reranker_and_pages):
    r, pages = reranker_and_pages
    res = r.rerank("q", pages, top_n=2)
    assert [x.rank for x in res] == [1, 2] and res[0].score >= res[1].score
    assert len(r.rerank("q", pages, top_n=10)) == 3  # larger than the list: all of them
    assert all(isinstance(x.score, float) and 0 < x.probability < 1 for x in res)


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(exit_layer=7), "exit_layer"),
        (dict(exit_layer=0), "exit_layer"),
        (dict(band=(3, 2)), "band"),
        (dict(exit_layer=4, band=(2, 5)), "band"),
        (dict(band=(-1, 2)), "band"),
        (dict(keep_ratio=0.0), "keep_ratio"),
        (dict(keep_ratio=1.5), "keep_ratio"),
        (dict(index_keep_ratio=0), "index_keep_ratio"),
        (dict(query_positions="relative"), "query_positions"),
        (dict(dtype="int8"), "dtype"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_config_outside_the_models_range(tiny, settings, match):
    model, proc = tiny("qwen3_vl")  # 6 layers
    with pytest.raises(ConfigError, match=match):
        MiniReranker(model, proc, RerankConfig(**settings))


def test_pruning_without_importance_is_explained(tiny, page_images):
    model, proc = tiny("qwen3_vl")
    r = MiniReranker(model, proc, RerankConfig(keep_ratio=0.5))
    with pytest.raises(ConfigError, match="importance"):
        r.rerank("q", page_images)
    with pytest.raises(InvalidImportanceError, match="needs .* values"):
        r.rerank("q", page_images, importance=[torch.rand(3)] * 3)  # wrong length for the grids
    with pytest.raises(InvalidImportanceError, match="1 maps for 3 pages"):
        r.rerank("q", page_images, importance=[torch.rand(3)])
    r = MiniReranker(model, proc, RerankConfig(index_keep_ratio=0.5))
    with pytest.raises(ConfigError, match="importance"):
        r.index(page_images)


def test_per_call_keep_ratio_override(tiny, page_images):
    model, proc = tiny("qwen3_vl")
    pruning = MiniReranker(model, proc, RerankConfig(keep_ratio=0.5))
    full = MiniReranker(model, proc, RerankConfig())
    # keep_ratio=1.0 for one call: no maps needed, and exactly the unpruned scores
    assert pruning.score("q", page_images, keep_ratio=1.0) == pytest.approx(full.score("q", page_images), abs=1e-6)
    assert [r.page_id for r in pruning.rerank("q", page_images, keep_ratio=1.0)] == [r.page_id for r in full.rerank("q", page_images)]
    assert pruning.config.keep_ratio == 0.5  # the override does not stick
    maps = [torch.rand(h * w) for h, w in (pruning.visual_grid(p) for p in page_images)]
    assert full.score("q", page_images, importance=maps, keep_ratio=0.5) == pytest.approx(
        pruning.score("q", page_images, importance=maps), abs=1e-6)
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ConfigError, match="keep_ratio"):
            pruning.score("q", page_images, keep_ratio=bad)


def test_unsupported_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError, match="llama"):
        MiniReranker(model, processor=None)


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bad_images(tmp_path: Path):
    good = _png_bytes(Image.new("RGB", (64, 64), "white"))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.png").write_bytes(b"\x00not an image at all" * 10)
    bomb = Image.new("1", (20000, 20000))
    bomb.save(tmp_path / "bomb.png")
    return {
        "missing": (tmp_path / "nope.png", InvalidImageError),
        "empty": (tmp_path / "empty.png", InvalidImageError),
        "truncated": (tmp_path / "truncated.png", InvalidImageError),
        "garbage": (tmp_path / "garbage.png", InvalidImageError),
        "bomb": (tmp_path / "bomb.png", ImageTooLargeError),
    }


def test_unreadable_images_fail_clearly_and_write_nothing(tiny, page_images, tmp_path):
    model, proc = tiny("qwen3_vl")
    cache = tmp_path / "cache"
    r = MiniReranker(model, proc, cache_dir=cache, config=RerankConfig(batch_size=8))
    for name, (path, exc) in _bad_images(tmp_path).items():
        with pytest.raises(exc) as info:
            r.rerank("q", [Page(page_images[0], id="ok"), Page(path, id=name)])
        assert name in str(info.value) or str(path.name) in str(info.value)
    # The good page of each failed batch was not half-written either: every file on disk is a valid entry.
    for f in cache.rglob("*"):
        if f.is_file():
            read_entry(f)


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "L", "LA", "I;16", "P"])
def test_other_image_modes_are_scored_as_their_rgb_rendering(tiny, mode):
    model, proc = tiny("qwen2_vl")
    r = MiniReranker(model, proc)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    if mode == "I;16":
        src = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
        expected = Image.fromarray(np.asarray(rgb.convert("L"))).convert("RGB")
    elif mode in ("RGBA", "LA"):
        src = rgb.convert(mode)  # fully opaque: compositing on white changes nothing
        expected = rgb if mode == "RGBA" else rgb.convert("L").convert("RGB")
    else:
        src = rgb.convert(mode)
        expected = src.convert("RGB")
    got = r.score("q", [Page(_png_bytes(src) if mode != "CMYK" else src)])
    want = r.score("q", [Page(expected)])
    assert got == pytest.approx(want, abs=1e-5)


def test_max_visual_tokens_bounds_the_grid(tiny, page_images):
    model, proc = tiny("qwen3_vl")
    import copy

    r = MiniReranker(model, copy.deepcopy(proc), max_visual_tokens=4)
    h, w = r.visual_grid(page_images[0])
    assert h * w <= 4 and r.max_visual_tokens == 4
    kv = r.index([page_images[0]])[0]
    assert kv.n_visual == h * w  # the processor really used the budget


# --- limits: each refused with a named error before any work -----------------------------------------------------
def test_query_token_limit(tiny, page_images):
    import warnings

    from minirerank_core.errors import QueryTruncatedWarning

    model, proc = tiny("qwen3_vl")
    r = MiniReranker(model, proc)
    assert r.query_token_limit == 512  # min(512, 1/8 of the context)
    for huge in ("x" * 100_000, "revenue " * 600):
        with pytest.raises(InvalidQueryError, match="max_query_tokens"):
            r.rerank(huge, page_images)
    short = MiniReranker(model, proc, RerankConfig(max_query_tokens=8, query_overflow="truncate"))
    with pytest.warns(QueryTruncatedWarning, match="first 8"):
        cut = short.score("revenue growth of the company in the last quarter of the year", page_images)
    kept = proc.tokenizer.decode(proc.tokenizer("revenue growth of the company in the last quarter of the year",
                                                add_special_tokens=False)["input_ids"][:8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the limit: no warning
        assert cut == pytest.approx(short.score(kept, page_images), abs=1e-6)
    with pytest.raises(ConfigError, match="query_overflow"):
        MiniReranker(model, proc, RerankConfig(query_overflow="drop"))


def test_odd_aspect_ratio_is_an_invalid_image_naming_the_page(reranker_and_pages):
    r, pages = reranker_and_pages
    strip = Page(Image.new("RGB", (2, 500), "white"), id="strip")
    with pytest.raises(InvalidImageError, match="aspect ratio"):
        r.rerank("q", [*pages, strip])


def test_bad_maps_are_refused_even_without_pruning(reranker_and_pages):
    """A dense reranker does not prune, but a wrongly shaped or non-finite map is a caller's mistake: said, not ignored."""
    r, pages = reranker_and_pages
    h, w = r.visual_grid(pages[0])
    for bad in (np.full((h, w), np.nan), np.zeros((w + 1, h)), np.zeros(h * w - 1)):
        with pytest.raises(InvalidImportanceError):
            r.rerank("q", pages[:1], importance=[bad])
