"""The cached state: a page's band-layer KV rows, and the small plumbing that feeds cached rows to HF layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_FORMAT = "minirerank-pagekv/1"


@dataclass
class PageKV:
    """Keys/values of one page's visual segment V = <vision_start> visual tokens <vision_end>, band layers only.

    Rows are [vision_start, kept visual tokens..., vision_end]; keys already carry their rotary positions, so
    gathering a subset of rows keeps each token's original position.
    """

    k: torch.Tensor  # (n_band_layers, n_kv_heads, T, head_dim)
    v: torch.Tensor  # same shape
    visual_index: torch.Tensor  # (T - 2,) int64: index of each stored visual row in the page's full grid
    grid: tuple[int, int]  # merged visual-token grid (h, w) of the page in this model
    next_position: int  # M-RoPE position of the first token after V (where an exact-position query starts)
    band: tuple[int, int]

    @property
    def n_visual(self) -> int:
        return int(self.visual_index.numel())

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2 + self.visual_index.numel() * 8

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"k": self.k.contiguous(), "v": self.v.contiguous(), "visual_index": self.visual_index.contiguous()}
        meta = {"format": KV_FORMAT, "grid": list(self.grid), "next_position": self.next_position, "band": list(self.band)}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "PageKV":
        if meta.get("format") != KV_FORMAT:
            raise ValueError(f"unknown page KV format {meta.get('format')!r}")
        kv = cls(
            k=tensors["k"], v=tensors["v"], visual_index=tensors["visual_index"],
            grid=tuple(meta["grid"]), next_position=int(meta["next_position"]), band=tuple(meta["band"]),
        )
        if kv.k.shape != kv.v.shape or kv.k.shape[2] != kv.n_visual + 2 or kv.k.shape[0] != kv.band[1] - kv.band[0]:
            raise ValueError(f"inconsistent page KV shapes: k {tuple(kv.k.shape)}, visual rows {kv.n_visual}, band {kv.band}")
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
