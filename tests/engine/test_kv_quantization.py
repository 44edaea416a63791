"""Compressed page caches (RerankConfig.kv_dtype): the codes, their scales, and scores against the unquantized path.

Tolerances were measured on these tiny models (benchmarks/cache.py measures the realistic shapes): over the three
families and the dense, banded and pruned configurations below, the largest |score - unquantized score| was 2.1 %
of the spread (std) of a query's unquantized scores for int8 and 9.8 % for fp8, and Kendall's tau between the
rankings of 12 pages never fell below 0.90. The bounds below leave a margin of about 2.5x (tau: 0.8).
"""

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from minirerank_core import MiniReranker, Page, RerankConfig
from minirerank_core.engine.kv import KV_SCALE_AXES, PageKV, dequantize, fp8_supported, quantize
from minirerank_core.errors import ConfigError

from tests.helpers import FAMILIES, PAGE_SIZES

QUERIES = ["quarterly revenue table", "what was the revenue growth in 2023", "who signed the report"]
DTYPES = ["int8"] + (["fp8"] if fp8_supported() else [])
MAX_ERR_OVER_SPREAD = {"int8": 0.05, "fp8": 0.25}
MIN_TAU = 0.8
CONFIGS = [
    dict(),
    dict(exit_layer=5, band=(2, 4)),
    dict(exit_layer=5, band=(1, 3), keep_ratio=0.5, query_positions="shared"),
]


def kv_like(seed: int = 0, layers: int = 2, heads: int = 2, rows: int = 12, dim: int = 16) -> torch.Tensor:
    """Keys with a few large channels, as rotary keys of trained models have, and a spread of magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, heads, rows, dim, generator=g) * torch.logspace(-2, 1, dim)
    x[..., 3] *= 20
    return x


# --- the codes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_int8_error_is_at_most_half_a_step(axis):
    x = kv_like()
    codes, scale = quantize(x, "int8", axis)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert scale.shape == ((2, 2, 12, 1) if axis == "token" else (2, 2, 1, 16)) and scale.dtype == torch.float32
    assert int(codes.abs().max()) == 127  # each group's largest magnitude uses the full range
    err = (dequantize(codes, scale) - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())
    assert float(err.max()) > 0  # it is lossy: the bound above is what makes the test able to fail


@pytest.mark.skipif(not fp8_supported(), reason="this torch has no float8_e4m3fn")
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_fp8_error_is_within_e4m3_rounding(axis):
    x = kv_like(1)
    codes, scale = quantize(x, "fp8", axis)
    assert codes.dtype == torch.float8_e4m3fn
    y = dequantize(codes, scale)
    assert bool(torch.isfinite(y).all())
    # 3 mantissa bits: relative rounding <= 2^-4 in the normal range, half a subnormal step (2^-10 x scale) below
    bound = x.abs() * 2**-4 + scale * 2**-10
    assert bool(((y - x).abs() <= bound * (1 + 1e-5)).all())


def test_zero_groups_and_bad_arguments():
    codes, scale = quantize(torch.zeros(1, 1, 3, 4), "int8", "token")
    assert bool((dequantize(codes, scale) == 0).all()) and bool((scale == 1).all())
    with pytest.raises(ValueError, match="kv_dtype"):
        quantize(torch.ones(1, 1, 2, 2), "int4", "token")
    with pytest.raises(ConfigError, match="kv_dtype"):
        RerankConfig(kv_dtype="int4").resolve(6)
    assert RerankConfig(kv_dtype="int8").resolve(6).kv_dtype == "int8"
    assert not RerankConfig(kv_dtype="int8").resolve(6).is_dense_equivalent


def page_kv(seed: int = 0) -> PageKV:
    k, v = kv_like(seed), kv_like(seed + 1)
    return PageKV(k, v, torch.arange(10), (2, 5), 17, (1, 3))


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_quantized_page_kv_round_trips_and_decodes_the_rows_asked(kv_dtype):
    kv = page_kv()
    q = kv.quantized(kv_dtype)
    assert (q.kv_dtype, q.k.element_size(), q.v.element_size()) == (kv_dtype, 1, 1)
    k_axis, v_axis = KV_SCALE_AXES[kv_dtype]
    assert q.k_scale.shape[2 if k_axis == "channel" else 3] == 1 and q.v_scale.shape[2 if v_axis == "channel" else 3] == 1
    assert q.nbytes == 2 * kv.k.numel() + 10 * 8 + q.k_scale.numel() * 4 + q.v_scale.numel() * 4
    tensors, meta = q.to_tensors()
    back = PageKV.from_tensors(tensors, meta)
    r = torch.tensor([0, 3, 4, 11])
    k1, v1 = q.rows(r, "cpu", torch.float32)
    k2, v2 = back.rows(r, "cpu", torch.float32)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    full_k, full_v = q.rows(torch.arange(12), "cpu", torch.float32)
    assert torch.equal(k1, full_k[:, :, r]) and torch.equal(v1, full_v[:, :, r])  # per-row scales follow the rows
    tol = 0.07 if kv_dtype == "fp8" else 0.01
    assert float((full_k - kv.k).abs().max()) <= tol * float(kv.k.abs().max())
    with pytest.raises(ValueError, match="already quantized"):
        q.quantized("int8")


def test_from_tensors_refuses_mixed_up_entries():
    q = page_kv().quantized("int8")
    tensors, meta = q.to_tensors()
    plain_t, plain_m = page_kv().to_tensors()
    with pytest.raises(ValueError, match="scales"):  # scales in an entry that claims to be unquantized
        PageKV.from_tensors(tensors, plain_m)
    with pytest.raises(ValueError):  # a quantized header over float tensors without scales
        PageKV.from_tensors(plain_t, meta)
    with pytest.raises(ValueError, match="codes"):  # int8 header, float codes
        PageKV.from_tensors({**tensors, "k": plain_t["k"], "v": plain_t["v"]}, meta)
    with pytest.raises(ValueError, match="kv_dtype"):
        PageKV.from_tensors(tensors, {**meta, "kv_dtype": "int4"})
    with pytest.raises(ValueError, match="misshapen"):
        PageKV.from_tensors({**tensors, "k_scale": tensors["k_scale"][:, :1]}, meta)


# --- scores ----------------------------------------------------------------------------------------------------
def spread_and_err(base, got):
    return float(np.std(base)), max(abs(a - b) for a, b in zip(base, got))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=["dense", "band", "band+pruned+shared"])
def test_quantized_scores_stay_close_and_rankings_agree(tiny, family, cfg):
    from minirerank_core import testing as T

    model, proc = tiny(family)
    images = [T.random_page_image(w, h, seed=i) for i, (w, h) in enumerate(PAGE_SIZES * 4)]  # 12 pages, 3 grids
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(images)]
    exact = MiniReranker(model, proc, RerankConfig(**cfg))
    maps = None
    if cfg.get("keep_ratio"):
        maps = [np.random.default_rng(i).random(np.prod(exact.visual_grid(p))).astype(np.float32) for i, p in enumerate(pages)]
    for kv_dtype in DTYPES:
        r = MiniReranker(model, proc, RerankConfig(kv_dtype=kv_dtype, **cfg))
        for q in QUERIES:
            base, got = exact.score(q, pages, importance=maps), r.score(q, pages, importance=maps)
            spread, err = spread_and_err(base, got)
            assert 0 < err <= MAX_ERR_OVER_SPREAD[kv_dtype] * spread, (kv_dtype, q, err, spread)
            assert kendalltau(base, got).statistic >= MIN_TAU, (kv_dtype, q)
        assert r.pages.kv(pages[:1])[0].kv_dtype == kv_dtype  # scored from the compressed cache, not the exact one


def test_fresh_and_cached_quantized_pages_score_identically(tiny, page_images, tmp_path):
    """The first call (pages just prefilled) scores the compressed values, as every later call from the cache does."""
    model, proc = tiny("qwen3_vl")
    cfg = RerankConfig(kv_dtype="int8")
    first = MiniReranker(model, proc, cfg, cache_dir=tmp_path).score(QUERIES[0], page_images)
    again = MiniReranker(model, proc, cfg, cache_dir=tmp_path).score(QUERIES[0], page_images)  # read from disk
    assert again == first


def test_config_round_trips_and_unquantized_files_stay_as_before():
    cfg = RerankConfig(kv_dtype="fp8")
    assert RerankConfig.from_dict(cfg.to_dict()) == cfg
    assert "kv_dtype" not in RerankConfig().to_dict()  # files written without compression are what they were
    assert RerankConfig.from_dict(RerankConfig().to_dict()) == RerankConfig()
