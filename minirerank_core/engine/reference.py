"""Two references the fast path is checked against.

dense_scores: what a plain `transformers` user computes — the processor builds P ⊕ V ⊕ Q, the HF model runs
    the whole sequence, the head reads the last token. One forward per (query, page) pair, batched. It takes any
    template with `full_text` (a query-first one too: it is the only exact way to score those) and appends the
    template's `suffix_ids` the way jina-reranker-m0's own code appends its score token.
masked_scores: the full sequence through every layer up to the exit, with an explicit per-layer attention mask
    that encodes the sparse semantics (Q cannot see V outside the band; Q cannot see pruned V). It shares no
    caching, gathering, padding or per-offset sharing with the fast path.
"""

from __future__ import annotations

import torch

from .families import FamilyAdapter
from .kv import PastKV, additive_mask, causal, run_layers
from .prompt import PromptTemplate, QueryFirstTemplate
from .prefill import text_positions


def append_suffix(inputs, suffix_ids: tuple[int, ...]):
    """Append token ids after every row of a left-padded processor batch (ids, mask 1, text type 0)."""
    if not suffix_ids:
        return inputs
    n = inputs["input_ids"].shape[0]
    extra = torch.tensor(suffix_ids, dtype=inputs["input_ids"].dtype).expand(n, -1)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra, dtype=inputs["attention_mask"].dtype)], dim=1)
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([types, torch.zeros(n, len(suffix_ids), dtype=types.dtype)], dim=1)
    return inputs


@torch.no_grad()
def dense_scores(model, processor, template: PromptTemplate | QueryFirstTemplate, head, query: str, images: list,
                 batch_size: int = 8) -> torch.Tensor:
    scores = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        # Left padding whatever the tokenizer was saved with: the last column is every row's last real token.
        inputs = processor(text=[template.full_text(query)] * len(chunk), images=chunk, padding=True,
                           padding_side="left", return_tensors="pt")
        inputs = append_suffix(inputs, template.suffix_ids).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.model(**inputs)
        scores.append(head(out.last_hidden_state[:, -1]))
    return torch.cat(scores)


@torch.no_grad()
def masked_scores(
    adapter: FamilyAdapter,
    processor,
    template: PromptTemplate,
    head,
    query: str,
    image,
    *,
    exit_layer: int,
    band: tuple[int, int],
    index_keep: torch.Tensor | None = None,
    query_keep: torch.Tensor | None = None,
    shared_offset: int | None = None,
) -> float:
    """Score of one page under the sparse semantics, by brute force. index_keep / query_keep: grid indices of
    the visual tokens kept before prefill / visible to the query (None = all)."""
    inputs = append_suffix(processor(text=[template.full_text(query)], images=[image], return_tensors="pt"),
                           template.suffix_ids)
    ids = inputs["input_ids"][0].to(adapter.device)
    grid_thw = inputs["image_grid_thw"].to(adapter.device)
    feats = adapter.encode_image(inputs["pixel_values"].to(adapter.device, adapter.dtype), grid_thw)[0]
    positions = adapter.rope_index(ids[None], grid_thw)[:, 0]
    is_img = ids == adapter.image_token_id
    img_pos = torch.nonzero(is_img).squeeze(1)  # sequence index of visual token j
    vs = int(torch.nonzero(ids == adapter.vision_start_token_id)[0])
    ve = int(torch.nonzero(ids == adapter.vision_end_token_id)[0])
    embeds = adapter.embed(ids)
    embeds[is_img] = feats.embeds.to(embeds.dtype)
    q_start = ve + 1
    if shared_offset is not None:
        positions[:, q_start:] = text_positions(shared_offset, len(ids) - q_start, adapter.device)

    # Index-time pruning: the dropped tokens do not exist for anyone (kept tokens keep their positions).
    n = int(is_img.sum())
    index_keep = torch.arange(n) if index_keep is None else index_keep
    drop = torch.ones(n, dtype=torch.bool)
    drop[index_keep] = False
    rows = torch.ones(len(ids), dtype=torch.bool)
    rows[img_pos[drop].cpu()] = False
    rows = rows.to(adapter.device)
    old_to_new = torch.cumsum(rows, 0) - 1
    embeds, positions, ids = embeds[rows], positions[:, rows], ids[rows]
    deep = feats.select(index_keep.to(adapter.device)).deepstack
    S = len(ids)
    is_img = ids == adapter.image_token_id
    q_start, vs, ve = int(old_to_new[q_start]), int(old_to_new[vs]), int(old_to_new[ve])

    base = causal(S, S, adapter.device)
    outside = base.clone()
    outside[q_start:, vs : ve + 1] = False  # Q ↛ V outside the band
    inside = base.clone()
    if query_keep is not None:
        hidden_from_q = torch.ones(n, dtype=torch.bool)
        hidden_from_q[query_keep] = False
        pruned = img_pos[hidden_from_q & ~drop].to(adapter.device)
        inside[q_start:, old_to_new[pruned]] = False  # Q ↛ pruned V inside the band
    masks = {False: additive_mask(outside[None], embeds.dtype), True: additive_mask(inside[None], embeds.dtype)}

    hidden = embeds[None]
    cos_sin = adapter.rotary(hidden, positions[:, None])
    deepstack = (is_img[None], deep) if deep else None
    for l in range(exit_layer):
        hidden = run_layers(adapter, hidden, cos_sin, masks[band[0] <= l < band[1]], range(l, l + 1), PastKV(), deepstack)
    return float(head(adapter.norm(hidden[:, -1]))[0])
