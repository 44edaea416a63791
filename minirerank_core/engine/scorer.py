"""Online side: score one query against many cached pages. Only the query segment Q runs.

Per layer l < exit_layer, each query row attends to
    P ⊕ Q                       outside the band,
    P ⊕ V_kept(page) ⊕ Q        inside the band [b0, b1),
where V_kept are the cached rows chosen by the importance map. Layers < b0 never see the page, so their
result depends only on the query's positions: they run once per distinct query offset (once per query with
shared positions) and are broadcast to every candidate.
"""

from __future__ import annotations

import torch

from .config import RerankConfig
from .families import FamilyAdapter
from .kv import PageKV, additive_mask, causal, prefix_past, run_layers
from .prefill import select_top, text_positions


def kept_rows(kv: PageKV, importance: torch.Tensor | None, keep_ratio: float) -> torch.Tensor:
    """Rows of `kv` a query may see: vision_start, the top `keep_ratio` of stored visual rows, vision_end."""
    T = kv.k.shape[2]
    if keep_ratio >= 1.0:
        return torch.arange(T)
    h, w = kv.grid
    imp = importance.reshape(-1)
    if imp.numel() != h * w:
        raise ValueError(f"importance has {imp.numel()} values but the page's visual grid is {h}x{w}={h * w}")
    keep = select_top(imp[kv.visual_index], keep_ratio)
    return torch.cat([torch.tensor([0]), keep + 1, torch.tensor([T - 1])])


def query_offsets(kvs: list[PageKV], cfg: RerankConfig) -> list[int]:
    if cfg.query_positions == "exact":
        return [kv.next_position for kv in kvs]
    return [cfg.shared_offset] * len(kvs)


def score_cached(
    adapter: FamilyAdapter,
    prefix: list[tuple[torch.Tensor, torch.Tensor]],
    q_ids: torch.Tensor,
    kvs: list[PageKV],
    cfg: RerankConfig,
    head,
    importance: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Scores (B,) of one query against cached pages `kvs`; `cfg` must be resolved."""
    device, dtype = adapter.device, adapter.dtype
    b0, b1 = cfg.band
    E = cfg.exit_layer
    Tq, P = len(q_ids), prefix[0][0].shape[2]
    B = len(kvs)
    q_embed = adapter.embed(q_ids[None].to(device))  # (1, Tq, H)
    q_causal = causal(Tq, Tq, device)

    def layer_inputs(offsets: torch.Tensor):
        pos = offsets[None, :, None] + text_positions(0, Tq, device)[:, None, :]  # (3, n, Tq)
        return adapter.rotary(q_embed, pos)

    offsets = torch.tensor(query_offsets(kvs, cfg), device=device)

    # Layers < b0: the page is invisible, so only the offset matters: one row per distinct offset.
    uniq, inverse = torch.unique(offsets, return_inverse=True)
    hidden = q_embed.expand(len(uniq), Tq, -1)
    if b0 > 0:
        allowed = torch.cat([torch.ones(Tq, P, dtype=torch.bool, device=device), q_causal], 1)
        mask = additive_mask(allowed[None].expand(len(uniq), -1, -1), dtype)
        hidden = run_layers(adapter, hidden, layer_inputs(uniq), mask, range(b0), prefix_past(prefix, len(uniq), range(b0)))
    hidden = hidden[inverse]  # (B, Tq, H)

    # Band layers: gather each candidate's kept rows into one padded tensor per layer.
    rows = [kept_rows(kv, None if importance is None else importance[i], cfg.keep_ratio) for i, kv in enumerate(kvs)]
    Tmax = max(len(r) for r in rows)
    nb, kvh, _, d = kvs[0].k.shape
    band_k = torch.zeros(nb, B, kvh, Tmax, d, dtype=dtype, device=device)
    band_v = torch.zeros_like(band_k)
    valid = torch.zeros(B, Tmax, dtype=torch.bool, device=device)
    for i, (kv, r) in enumerate(zip(kvs, rows)):
        n = len(r)
        if kv.kv_dtype is None:
            band_k[:, i, :, :n] = kv.k[:, :, r].to(device, dtype)
            band_v[:, i, :, :n] = kv.v[:, :, r].to(device, dtype)
        else:  # a compressed cache: decode only the kept rows, on the device
            band_k[:, i, :, :n], band_v[:, i, :, :n] = kv.rows(r, device, dtype)
        valid[i, :n] = True

    p_cols = torch.ones(B, Tq, P, dtype=torch.bool, device=device)
    q_cols = q_causal[None].expand(B, -1, -1)
    mask_out = additive_mask(torch.cat([p_cols, q_cols], 2), dtype)
    mask_in = additive_mask(torch.cat([p_cols, valid[:, None, :].expand(-1, Tq, -1), q_cols], 2), dtype)
    cos_sin = layer_inputs(offsets)
    past = prefix_past(prefix, B, range(b0, E), cfg.band, band_k, band_v)
    for l in range(b0, E):
        hidden = run_layers(adapter, hidden, cos_sin, mask_in if b0 <= l < b1 else mask_out, range(l, l + 1), past)
    return head(adapter.norm(hidden[:, -1]))
