"""The cached state: a page's band-layer KV rows, and the small plumbing that feeds cached rows to HF layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_FORMAT = "minirerank-pagekv/1"
# Quantized entries carry another tag, so a reader that predates quantization refuses them instead of scoring
# int8 codes as if they were keys.
QUANT_KV_FORMAT = "minirerank-pagekv-q/1"

# Compressed page caches. Each stored K/V element becomes one byte plus a float32 scale per group; the grouping was
# chosen by measurement on the shipped student (benchmarks/cache.py, docs/DESIGN.md section 4). int8: keys per
# channel (a scale per layer, head and head-dim channel over the page's rows: a fixed-step code needs each channel's
# own range), values per token (per layer, head and row): the best rank agreement. fp8: both per token: its
# exponent already covers a channel's range, and a scale per row was better on every measure.
KV_DTYPES = ("int8", "fp8")
KV_SCALE_AXES: dict[str, tuple[str, str]] = {"int8": ("channel", "token"), "fp8": ("token", "token")}
_STORAGE = {"int8": torch.int8, "fp8": getattr(torch, "float8_e4m3fn", None)}
_QMAX = {"int8": 127.0, "fp8": 448.0}  # largest code magnitude: symmetric int8, float8 e4m3fn's finite max


def fp8_supported() -> bool:
    """Whether this torch has float8 e4m3 tensors (casts work on CPU and GPU from torch 2.1)."""
    return _STORAGE["fp8"] is not None


def quantize(x: torch.Tensor, kv_dtype: str, axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of ``x`` (n_band_layers, n_kv_heads, T, head_dim) to one byte per element.

    ``axis``: "token" (one scale per row, shape (..., T, 1)) or "channel" (one per head-dim channel over the rows,
    shape (..., 1, head_dim)). Returns (codes, float32 scales); ``codes * scales`` approximates ``x``.
    """
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    storage = _STORAGE[kv_dtype]
    if storage is None:
        raise ValueError("kv_dtype='fp8' needs torch.float8_e4m3fn (torch >= 2.1)")
    dim = {"token": -1, "channel": -2}[axis]
    xf = x.float()
    qmax = _QMAX[kv_dtype]
    scale = xf.abs().amax(dim=dim, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale decodes to zeros
    y = (xf / scale).clamp_(-qmax, qmax)  # division can round a hair past qmax; e4m3fn has no inf to absorb it
    codes = y.round_().to(storage) if kv_dtype == "int8" else y.to(storage)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values of quantized ``codes`` with their (broadcastable) ``scale``."""
    return codes.to(torch.float32) * scale.to(codes.device, torch.float32)


@dataclass
class PageKV:
    """Keys/values of one page's visual segment V = <vision_start> visual tokens <vision_end>, band layers only.

    Rows are [vision_start, kept visual tokens..., vision_end]; keys already carry their rotary positions, so
    gathering a subset of rows keeps each token's original position.

    Quantized (``kv_dtype`` "int8" or "fp8"): ``k`` / ``v`` hold one-byte codes and ``k_scale`` / ``v_scale``
    their float32 scales (see :func:`quantize`); :meth:`rows` decodes the rows a query sees.
    """

    k: torch.Tensor  # (n_band_layers, n_kv_heads, T, head_dim)
    v: torch.Tensor  # same shape
    visual_index: torch.Tensor  # (T - 2,) int64: index of each stored visual row in the page's full grid
    grid: tuple[int, int]  # merged visual-token grid (h, w) of the page in this model
    next_position: int  # M-RoPE position of the first token after V (where an exact-position query starts)
    band: tuple[int, int]
    kv_dtype: str | None = None  # None: k and v are the model's own values, unchanged
    k_scale: torch.Tensor | None = None  # (nb, kvh, 1, d) per channel or (nb, kvh, T, 1) per token
    v_scale: torch.Tensor | None = None

    @property
    def n_visual(self) -> int:
        return int(self.visual_index.numel())

    @property
    def nbytes(self) -> int:
        scales = sum(s.numel() * s.element_size() for s in (self.k_scale, self.v_scale) if s is not None)
        return self.k.numel() * self.k.element_size() * 2 + self.visual_index.numel() * 8 + scales

    def quantized(self, kv_dtype: str, axes: tuple[str, str] | None = None) -> "PageKV":
        """This page's KV compressed to ``kv_dtype``; ``axes`` (key axis, value axis) defaults to KV_SCALE_AXES
        (other groupings are for measuring: the cache key names only the default)."""
        if self.kv_dtype is not None:
            raise ValueError(f"this page KV is already quantized ({self.kv_dtype})")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        k_axis, v_axis = axes or KV_SCALE_AXES[kv_dtype]
        k, ks = quantize(self.k, kv_dtype, k_axis)
        v, vs = quantize(self.v, kv_dtype, v_axis)
        return PageKV(k, v, self.visual_index, self.grid, self.next_position, self.band, kv_dtype, ks, vs)

    def rows(self, r: torch.Tensor, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows ``r`` as ``dtype`` on ``device`` (decoded there: one byte per element moves)."""
        if self.kv_dtype is None:
            return self.k[:, :, r].to(device, dtype), self.v[:, :, r].to(device, dtype)
        out = []
        for codes, scale in ((self.k, self.k_scale), (self.v, self.v_scale)):
            s = scale if scale.shape[2] == 1 else scale[:, :, r]  # per-channel scales cover every row
            picked = codes.view(torch.uint8)[:, :, r].view(codes.dtype)  # CPU cannot index float8 directly
            out.append(dequantize(picked.to(device), s.to(device)).to(dtype))
        return out[0], out[1]

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"k": self.k.contiguous(), "v": self.v.contiguous(), "visual_index": self.visual_index.contiguous()}
        meta = {"format": KV_FORMAT, "grid": list(self.grid), "next_position": self.next_position, "band": list(self.band)}
        if self.kv_dtype is not None:
            tensors.update(k_scale=self.k_scale.contiguous(), v_scale=self.v_scale.contiguous())
            meta.update(format=QUANT_KV_FORMAT, kv_dtype=self.kv_dtype)
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "PageKV":
        fmt = meta.get("format")
        if fmt not in (KV_FORMAT, QUANT_KV_FORMAT):
            raise ValueError(f"unknown page KV format {fmt!r}")
        kv_dtype = meta.get("kv_dtype") if fmt == QUANT_KV_FORMAT else None
        if fmt == QUANT_KV_FORMAT and kv_dtype not in KV_DTYPES:
            raise ValueError(f"unknown kv_dtype {kv_dtype!r} in a quantized page KV")
        kv = cls(
            k=tensors["k"], v=tensors["v"], visual_index=tensors["visual_index"],
            grid=tuple(meta["grid"]), next_position=int(meta["next_position"]), band=tuple(meta["band"]),
            kv_dtype=kv_dtype, k_scale=tensors.get("k_scale") if kv_dtype else None,
            v_scale=tensors.get("v_scale") if kv_dtype else None,
        )
        if kv.k.shape != kv.v.shape or kv.k.shape[2] != kv.n_visual + 2 or kv.k.shape[0] != kv.band[1] - kv.band[0]:
            raise ValueError(f"inconsistent page KV shapes: k {tuple(kv.k.shape)}, visual rows {kv.n_visual}, band {kv.band}")
        if kv_dtype is not None:
            nb, kvh, T, d = kv.k.shape
            if kv.k.dtype != _STORAGE[kv_dtype] or kv.v.dtype != kv.k.dtype:
                raise ValueError(f"a {kv_dtype} page KV holds {kv.k.dtype} codes")
            for name, s in (("k_scale", kv.k_scale), ("v_scale", kv.v_scale)):
                if s is None or s.dtype != torch.float32 or tuple(s.shape) not in ((nb, kvh, T, 1), (nb, kvh, 1, d)):
                    raise ValueError(f"a {kv_dtype} page KV has a missing or misshapen {name}")
        elif any(n in tensors for n in ("k_scale", "v_scale")):
            raise ValueError("an unquantized page KV carries quantization scales")
        return kv


class PastKV:
    """Duck-typed HF cache. HF attention calls `update(k, v, layer_idx)` with the new tokens' keys/values and
    attends over what it returns; we prepend cached rows per layer and can record the new rows."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, record: set[int] | frozenset = frozenset()):
        self.past = past or {}
        self.record = record
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.record:
            self.recorded[layer_idx] = (key, value)
        if layer_idx in self.past:
            pk, pv = self.past[layer_idx]
            key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        return key, value


def prefix_past(
    prefix: list[tuple[torch.Tensor, torch.Tensor]],
    n: int,
    layers: range,
    band: tuple[int, int] | None = None,
    band_k: torch.Tensor | None = None,
    band_v: torch.Tensor | None = None,
) -> PastKV:
    """Past KV for n query rows: the shared prefix P in every layer of `layers`, followed inside `band` by each
    row's own gathered page rows (band_k/band_v: (n_band_layers, n, kv_heads, T, head_dim))."""
    past = {}
    for l in layers:
        pk, pv = (x.expand(n, -1, -1, -1) for x in prefix[l])
        if band is not None and band[0] <= l < band[1]:
            pk, pv = torch.cat([pk, band_k[l - band[0]]], 2), torch.cat([pv, band_v[l - band[0]]], 2)
        past[l] = (pk, pv)
    return PastKV(past)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool (B, q, k) 'may attend' → additive float (B, 1, q, k) mask that both eager and sdpa attention accept."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def causal(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """bool (q, k): query row i (the last q_len of k_len tokens) may attend to keys 0..k_len-q_len+i."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def run_layers(adapter, hidden, cos_sin, mask, layers: range, cache: PastKV, deepstack=None):
    """Run LM decoder layers `layers` (HF modules, unchanged) over `hidden`.

    deepstack: optional (visual_mask (B, S), feats) added after the early layers (Qwen3-VL).
    """
    for i in layers:
        hidden = adapter.layers[i](hidden, attention_mask=mask, position_embeddings=cos_sin, past_key_values=cache)
        if deepstack is not None:
            hidden = adapter.inject_deepstack(i, hidden, *deepstack)
    return hidden


def run_layer_tail(adapter, i: int, hidden: torch.Tensor, cos_sin, mask, cache: PastKV, n_last: int) -> torch.Tensor:
    """LM decoder layer i over `hidden` (B, S, H), returning only the last `n_last` rows' outputs (B, n_last, H).

    Every row still attends and so reaches `cache` (its keys and values are what later rows need); the MLP, most of
    a layer's cost, runs on the returned rows alone. The steps are the Qwen-VL decoder layers' own (pre-norm
    attention, residual, pre-norm MLP, residual); tests/engine check it against the layer's forward per family."""
    layer = adapter.layers[i]
    attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                              position_embeddings=cos_sin, past_key_values=cache)
    h = (hidden + attn)[:, hidden.shape[1] - n_last :]
    return h + layer.mlp(layer.post_attention_layernorm(h))
