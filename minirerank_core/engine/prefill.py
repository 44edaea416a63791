"""Offline side: page images → band-layer KV (PageKV), and the shared prefix P's KV.

The page prefill runs the real sequence P ⊕ V through layers < b1 only (nothing after the band can matter to a
query), optionally dropping visual tokens first (index-time pruning) while keeping their original positions.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .families import FamilyAdapter
from .kv import PageKV, PastKV, additive_mask, causal, run_layers
from .prompt import PromptTemplate


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def query_ids(tokenizer, template: PromptTemplate, query: str) -> torch.Tensor:
    """The query segment Q's ids: the template's query text, then its suffix ids (jina-reranker-m0's score token)."""
    return template.query_ids(tokenizer, query)


def text_positions(start: int | torch.Tensor, length: int, device=None) -> torch.Tensor:
    """(3, L) M-RoPE ids of a text run: all three components advance together."""
    return (torch.arange(length, device=device) + start).expand(3, length)


def prefix_kv(adapter: FamilyAdapter, prefix: torch.Tensor, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV of the fixed prefix P in layers < n_layers: page-independent, computed once per model and template."""
    hidden = adapter.embed(prefix[None].to(adapter.device))
    cos_sin = adapter.rotary(hidden, text_positions(0, len(prefix), adapter.device)[:, None])
    mask = additive_mask(causal(len(prefix), len(prefix), adapter.device)[None], hidden.dtype)
    cache = PastKV(record=set(range(n_layers)))
    run_layers(adapter, hidden, cos_sin, mask, range(n_layers), cache)
    return [cache.recorded[i] for i in range(n_layers)]


def image_inputs(image_processor, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    out = image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def merged_grid(grid_thw: torch.Tensor, merge: int) -> tuple[int, int]:
    return int(grid_thw[1]) // merge, int(grid_thw[2]) // merge


def select_top(importance: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices (ascending) of the top `keep_ratio` fraction of `importance`; at least one is kept."""
    n = importance.numel()
    k = max(1, min(n, round(keep_ratio * n)))
    if k == n:
        return torch.arange(n)
    return torch.topk(importance.float(), k, sorted=False).indices.sort().values


def prefill_pages(
    adapter: FamilyAdapter,
    image_processor,
    prefix: torch.Tensor,
    images: list,
    band: tuple[int, int],
    *,
    index_importance: list[torch.Tensor] | None = None,
    index_keep_ratio: float = 1.0,
) -> list[PageKV]:
    """Band-layer KV of each page's visual segment. Pages whose sequences have equal length run as one batch."""
    device, dtype = adapter.device, adapter.dtype
    pixel_values, grid_thw = image_inputs(image_processor, images)
    feats = adapter.encode_image(pixel_values.to(device, dtype), grid_thw.to(device))
    P = len(prefix)
    seqs = []
    for i, f in enumerate(feats):
        n = f.embeds.shape[0]
        grid = merged_grid(grid_thw[i], adapter.merge_size)
        ids = torch.cat([prefix, torch.tensor([adapter.vision_start_token_id]), torch.full((n,), adapter.image_token_id),
                         torch.tensor([adapter.vision_end_token_id])]).to(device)
        positions = adapter.rope_index(ids[None], grid_thw[i : i + 1].to(device))[:, 0]
        keep = torch.arange(n)
        if index_keep_ratio < 1.0:
            keep = select_top(index_importance[i].reshape(-1), index_keep_ratio)
        rows = torch.cat([torch.arange(P + 1), P + 1 + keep, torch.tensor([P + n + 1])]).to(device)
        embeds = adapter.embed(ids)
        embeds[P + 1 : P + 1 + n] = f.embeds.to(dtype)
        seqs.append(dict(
            embeds=embeds[rows], positions=positions[:, rows], visual=(ids[rows] == adapter.image_token_id),
            deepstack=f.select(keep.to(device)).deepstack, keep=keep, grid=grid,
            next_position=int(positions.max()) + 1,
        ))

    out: list[PageKV | None] = [None] * len(seqs)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(seqs):
        groups[s["embeds"].shape[0]].append(i)
    record = set(range(*band))
    for S, idx in groups.items():
        hidden = torch.stack([seqs[i]["embeds"] for i in idx])
        positions = torch.stack([seqs[i]["positions"] for i in idx], dim=1)
        visual = torch.stack([seqs[i]["visual"] for i in idx])
        n_ds = len(seqs[idx[0]]["deepstack"])
        deepstack = (visual, [torch.cat([seqs[i]["deepstack"][j] for i in idx]) for j in range(n_ds)]) if n_ds else None
        cos_sin = adapter.rotary(hidden, positions)
        mask = additive_mask(causal(S, S, device)[None].expand(len(idx), S, S), dtype)
        cache = PastKV(record=record)
        run_layers(adapter, hidden, cos_sin, mask, range(band[1]), cache, deepstack)
        k = torch.stack([cache.recorded[l][0][:, :, P:] for l in range(*band)], dim=1)  # (G, nb, kvh, T, d)
        v = torch.stack([cache.recorded[l][1][:, :, P:] for l in range(*band)], dim=1)
        for j, i in enumerate(idx):
            s = seqs[i]
            out[i] = PageKV(k=k[j].contiguous(), v=v[j].contiguous(), visual_index=s["keep"].cpu(), grid=s["grid"],
                            next_position=s["next_position"], band=tuple(band))
    return out
