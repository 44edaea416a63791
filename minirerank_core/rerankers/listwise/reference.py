"""Brute-force reference of cached listwise (see cached.py): the whole sequence P ⊕ V_1 … V_n ⊕ Q through every
layer up to the exit, with an explicit per-layer attention mask. It shares no caching, gathering, prefix reuse
or padding with the fast path; only the model's own pieces (embeddings, vision tower, rope index, layers)."""

from __future__ import annotations

import torch

from ...engine.families import FamilyAdapter
from ...engine.kv import PastKV, additive_mask, run_layers
from ...engine.prefill import text_positions
from .prompt import CachedQuery, LabelHead
from .single_pass import encode_pages


@torch.no_grad()
def cached_listwise_reference(
    adapter: FamilyAdapter,
    image_processor,
    prefix_ids: torch.Tensor,
    query: CachedQuery,
    images: list,
    head: LabelHead,
    *,
    exit_layer: int,
    band: tuple[int, int],
    query_keep: list[torch.Tensor] | None = None,
    readout: str = "all",
) -> torch.Tensor:
    """Label logits (n_labels,). query_keep[i]: grid indices of page i's visual tokens Q may see (None = all).
    readout="labels": in layer exit_layer - 1 the last token attends to the last token of each label segment only."""
    device = adapter.device
    feats, grid_thw = encode_pages(adapter, image_processor, images)
    P, n = len(prefix_ids), len(images)

    # Each page's positions as if it stood alone after P.
    ids, pos, page, visible = [prefix_ids], [text_positions(0, P)], [torch.full((P,), -1)], [torch.zeros(P, dtype=torch.bool)]
    next_position = 0
    for i, f in enumerate(feats):
        m = f.embeds.shape[0]
        v_ids = torch.cat([torch.tensor([adapter.vision_start_token_id]), torch.full((m,), adapter.image_token_id),
                           torch.tensor([adapter.vision_end_token_id])])
        alone = adapter.rope_index(torch.cat([prefix_ids, v_ids])[None].to(device), grid_thw[i : i + 1].to(device))[:, 0].cpu()
        next_position = max(next_position, int(alone.max()) + 1)
        seen = torch.ones(m, dtype=torch.bool)
        if query_keep is not None:
            seen[:] = False
            seen[query_keep[i]] = True
        ids.append(v_ids), pos.append(alone[:, P:]), page.append(torch.full((m + 2,), i))
        visible.append(torch.cat([torch.tensor([True]), seen, torch.tensor([True])]))
    Tq = len(query.ids)
    ids.append(query.ids), pos.append(text_positions(next_position, Tq)), page.append(torch.full((Tq,), -1))
    visible.append(torch.zeros(Tq, dtype=torch.bool))
    ids, page, visible = (torch.cat(x).to(device) for x in (ids, page, visible))
    pos = torch.cat(pos, 1).to(device)
    S = len(ids)
    is_q = torch.arange(S, device=device) >= S - Tq
    seg = torch.full((S,), -2, device=device)  # -2: not in Q
    seg[is_q] = query.seg.to(device)

    # The rule, key by key. Rows of P: causal. Rows of V_i: causal, over P and V_i only.
    key_before = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    key_in_p = (page == -1) & ~is_q
    same_page = (page[:, None] == page[None, :]) & (page[:, None] >= 0)
    allowed_v_rows = key_before & (key_in_p[None, :] | same_page)
    # Rows of Q: P always; Q keys by segment; page keys (visible rows only) in the band: own page for L_i, all for T.
    tail = seg == n
    q_keys = is_q[None, :] & ((seg[:, None] == seg[None, :]) | (seg[None, :] == -1) | tail[:, None])
    page_keys = visible[None, :] & (page[None, :] >= 0) & ((seg[:, None] == page[None, :]) | tail[:, None])
    masks = {}
    for in_band in (False, True):
        q_rows = key_before & (key_in_p[None, :] | q_keys | (page_keys & in_band))
        allowed = torch.where(is_q[:, None], q_rows, allowed_v_rows)
        masks[in_band] = additive_mask(allowed[None], adapter.dtype)
    # The read-out layer: the last row's keys are the label segments' last tokens, found here from the tags alone.
    label_ends = torch.stack([torch.nonzero(seg == i)[-1, 0] for i in range(n)])
    read = torch.where(is_q[:, None], key_before & (key_in_p[None, :] | q_keys), allowed_v_rows)
    read[-1] = False
    read[-1, label_ends] = True
    masks["read"] = additive_mask(read[None], adapter.dtype)

    embeds = adapter.embed(ids)
    is_img = ids == adapter.image_token_id
    embeds[is_img] = torch.cat([f.embeds for f in feats]).to(embeds.dtype)
    n_ds = len(feats[0].deepstack)
    deepstack = (is_img[None], [torch.cat([f.deepstack[j] for f in feats]) for j in range(n_ds)]) if n_ds else None
    hidden = embeds[None]
    cos_sin = adapter.rotary(hidden, pos[:, None])
    for l in range(exit_layer):
        key = "read" if readout == "labels" and l == exit_layer - 1 else band[0] <= l < band[1]
        hidden = run_layers(adapter, hidden, cos_sin, masks[key], range(l, l + 1), PastKV(), deepstack)
    return head(adapter.norm(hidden[:, -1]))[0]
