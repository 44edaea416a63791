"""Cached listwise: the point-wise page cache, read by one listwise query segment.

The sequence, in the order of its positions:

    P ⊕ V_1 ⊕ … ⊕ V_n ⊕ Q,        Q = H ⊕ L_1 ⊕ … ⊕ L_n ⊕ T

    P    fixed prefix (system prompt and user header)
    V_i  page i's visual segment <|vision_start|> visual tokens <|vision_end|>, prefilled as P ⊕ V_i: its own
         positions, attending only to P and itself. So its band-layer KV is exactly the point-wise page cache
         (PageKV, same prefill, same cache stores), computed once per page and reused by every query and list.
    H    the intro with the query;   L_i  label segment of page i ("\\n[A] ", or the template's cached_label, which
         may repeat the query);   T  the instruction and "[".

Q's positions are text positions starting after the longest page (max_i next_position of V_i). In every
layer l < exit_layer a Q token attends to (P always; causal order inside Q):

    H    → P, H
    L_i  → P, H, L_i,             and the kept rows of V_i          if b0 <= l < b1
    T    → P, H, L_1 … L_n, T,    and the kept rows of V_1 … V_n    if b0 <= l < b1

With readout="labels" (ListwiseConfig.readout), the last layer before the exit is a read-out layer: in it the
answer token "[" (T's last token) attends to the label rows only (the last token of each L_i), so that layer is a
pointer over the labels (the trained model's read-back head: train/readback.py). Every other row is as above.

Label binding: L_i never sees another page or another label, so its states are a function of (query, label
text, page i) alone (given Q's start position) — label i carries evidence about page i and nothing else. T reads all bound labels (and, in
the band, all pages) and its next-token logits over the label tokens "A", "B", … are the scores, read after
the exit layer. Outside the band Q sees no page at all, which is why only band layers are cached.

`engine`-style fast path below; `reference.cached_listwise_reference` runs the whole sequence with an
explicit per-layer mask of the same semantics and must give the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.families import FamilyAdapter
from ...engine.kv import PageKV, additive_mask, causal, prefix_past, run_layers
from ...engine.prefill import text_positions
from .prompt import CachedQuery, LabelHead, ListwiseTemplate, cached_query


@dataclass
class CachedWindow:
    query: CachedQuery
    kvs: list[PageKV]  # the window's pages, in label order
    rows: list[torch.Tensor]  # per page: indices of the cached rows the query may see (engine.scorer.kept_rows)


def cached_window(tokenizer, template: ListwiseTemplate, labels, answer_id: int, query: str, kvs: list[PageKV],
                  rows: list[torch.Tensor]) -> CachedWindow:
    """One window of the cached layout: the query segment over these pages' KV (labels[:n] in this order). The
    reranker and the listwise training stage both build windows here (the one code path)."""
    return CachedWindow(cached_query(tokenizer, template, query, tuple(labels)[: len(kvs)], answer_id), kvs, rows)


def query_visibility(seg: torch.Tensor, owner: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool masks of Q rows over Q keys (Tq, Tq) and over band page rows (Tq, K), from the table above.
    seg: Q token tags (-1 intro, i label of page i, n tail); owner: page of each gathered band row."""
    tail = (seg == n)[:, None]
    q_allowed = causal(len(seg), len(seg), seg.device) & ((seg[:, None] == seg[None, :]) | (seg[None, :] == -1) | tail)
    v_allowed = (seg[:, None] == owner[None, :]) | tail
    return q_allowed, v_allowed


def readout_layer(readout: str, exit_layer: int) -> int | None:
    """The layer in which "[" reads the label rows only (readout="labels": the last before the exit), else None."""
    return exit_layer - 1 if readout == "labels" else None


def cached_logits(
    adapter: FamilyAdapter,
    prefix: list[tuple[torch.Tensor, torch.Tensor]],
    windows: list[CachedWindow],
    exit_layer: int,
    band: tuple[int, int],
    head: LabelHead,
    readout: str = "all",
) -> torch.Tensor:
    """Label logits (B, n_labels) of each window. Windows are batched: Q left-padded, page rows right-padded."""
    hidden = cached_states(adapter, prefix, windows, range(exit_layer), band,
                           readout_at=readout_layer(readout, exit_layer))
    return head(adapter.norm(hidden[:, -1]))


def cached_states(
    adapter: FamilyAdapter,
    prefix: list[tuple[torch.Tensor, torch.Tensor]],
    windows: list[CachedWindow],
    layers: range,
    band: tuple[int, int],
    hidden: torch.Tensor | None = None,
    readout_at: int | None = None,
) -> torch.Tensor:
    """Q's hidden states (B, Tq, H) after `layers`, from the token embeddings or, for layers starting above 0, from
    `hidden` (the states entering layers.start, as an earlier call returned them for the same windows). Training
    splits a window at a frozen layer this way: the frozen part runs once, the trained part every epoch.
    readout_at: the layer in which the last row reads the label rows only (see `readout_layer`)."""
    if (hidden is None) != (layers.start == 0):
        raise ValueError("pass the entering hidden states exactly when the layers start above 0")
    device, dtype = adapter.device, adapter.dtype

    B, P = len(windows), prefix[0][0].shape[2]
    Tq = max(len(w.query.ids) for w in windows)
    K = max(sum(len(r) for r in w.rows) for w in windows)
    nb, kvh, _, d = windows[0].kvs[0].k.shape

    ids = torch.zeros(B, Tq, dtype=torch.long, device=device)
    positions = torch.zeros(3, B, Tq, dtype=torch.long, device=device)
    band_k = torch.zeros(nb, B, kvh, K, d, dtype=dtype, device=device)
    band_v = torch.zeros_like(band_k)
    # Padding rows see only P; real rows never see padding.
    see_v = torch.zeros(B, Tq, K, dtype=torch.bool, device=device)
    see_q = torch.zeros(B, Tq, Tq, dtype=torch.bool, device=device)
    for b, w in enumerate(windows):
        t, pad = len(w.query.ids), Tq - len(w.query.ids)
        ids[b, pad:] = w.query.ids
        positions[:, b, pad:] = text_positions(max(kv.next_position for kv in w.kvs), t, device)
        owner, start = [], 0
        for i, (kv, r) in enumerate(zip(w.kvs, w.rows)):
            band_k[:, b, :, start : start + len(r)] = kv.k[:, :, r].to(device, dtype)
            band_v[:, b, :, start : start + len(r)] = kv.v[:, :, r].to(device, dtype)
            owner.append(torch.full((len(r),), i))
            start += len(r)
        q_allowed, v_allowed = query_visibility(w.query.seg.to(device), torch.cat(owner).to(device), len(w.kvs))
        see_v[b, pad:, :start] = v_allowed
        see_q[b, pad:, pad:] = q_allowed
    see_p = torch.ones(B, Tq, P, dtype=torch.bool, device=device)
    mask_in = additive_mask(torch.cat([see_p, see_v, see_q], 2), dtype)
    mask_out = additive_mask(torch.cat([see_p, see_q], 2), dtype)
    mask_read = None
    if readout_at is not None and readout_at in layers:
        if band[0] <= readout_at < band[1]:
            raise ValueError(f"the read-out layer {readout_at} lies inside the band {band}")
        read_p, read_q = see_p.clone(), see_q.clone()
        read_p[:, -1] = False
        read_q[:, -1] = False
        for b, w in enumerate(windows):
            read_q[b, -1, Tq - len(w.query.ids) + w.query.label_rows().to(device)] = True
        mask_read = additive_mask(torch.cat([read_p, read_q], 2), dtype)

    cache = prefix_past(prefix, B, layers, band, band_k, band_v)
    if hidden is None:
        hidden = adapter.embed(ids)
    cos_sin = adapter.rotary(hidden, positions)
    for l in layers:
        mask = mask_in if band[0] <= l < band[1] else mask_read if l == readout_at else mask_out
        hidden = run_layers(adapter, hidden, cos_sin, mask, range(l, l + 1), cache)
    return hidden
