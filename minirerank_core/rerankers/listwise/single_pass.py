"""ZipRerank's single pass: one forward over the query and up to 20 labelled pages; the logits of the label
tokens after the final "[" are the pages' scores. No decoding.

QI-EI (query-image early interaction) prunes every page before the LM runs:

    importance(p) = max_t cos(e_t, v_p)      e_t: LM input embedding of query token t,
                                              v_p: visual token p after the vision merger
    keep = top keep_ratio fraction of the page's visual tokens by importance (at least one)

M-RoPE positions are computed on the full, unpruned sequence and the dropped rows are then removed, so every
kept token keeps its original (t, h, w) position and the text after a page keeps its offset. Qwen3-VL's
deepstack features are pruned with the same indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...engine.families import FamilyAdapter, VisualFeatures
from ...engine.kv import PastKV, additive_mask, causal, run_layers
from ...engine.prefill import image_inputs, select_top
from .prompt import LabelHead, ListwiseTemplate, SinglePassPrompt, single_pass_prompt
from .readout import answer_over_labels

_CAUSAL_KERNELS = ("sdpa", "flash_attention_2", "flash_attention_3")  # apply causality when given no mask


def encode_pages(adapter: FamilyAdapter, image_processor, images: list, batch_size: int = 16) -> tuple[list[VisualFeatures], torch.Tensor]:
    """Vision tower output of each page (query-independent: computed once for all windows) and grids (n, 3)."""
    feats, grids = [], []
    for s in range(0, len(images), batch_size):
        pixel_values, grid_thw = image_inputs(image_processor, images[s : s + batch_size])
        feats += adapter.encode_image(pixel_values.to(adapter.device, adapter.dtype), grid_thw.to(adapter.device))
        grids.append(grid_thw)
    return feats, torch.cat(grids)


def qiei_importance(query_embeds: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) max over query tokens of the cosine similarity with each visual token."""
    q = F.normalize(query_embeds.float(), dim=-1)
    v = F.normalize(visual_embeds.float(), dim=-1)
    return (v @ q.T).max(dim=1).values


@dataclass
class PrunedSequence:
    """The LM input of one window after pruning: rows of the full sequence, with their original positions."""

    embeds: torch.Tensor  # (S', H)
    positions: torch.Tensor  # (3, S')
    visual: torch.Tensor  # (S',) bool: visual-token rows (where deepstack features are added)
    deepstack: list[torch.Tensor]  # per deepstack level (n kept visual tokens, H); empty for Qwen2-VL
    keep: list[torch.Tensor]  # per page: kept visual-token indices (ascending) in its grid
    ids: torch.Tensor | None = None  # (S',) token ids of the kept rows (image placeholders for visual rows)
    label_rows: torch.Tensor | None = None  # (n,) kept-row index of each page's label token (text rows are all kept)


def pruned_sequence(
    adapter: FamilyAdapter,
    prompt: SinglePassPrompt,
    feats: list[VisualFeatures],
    keep_ratio: float = 1.0,
    importance: list[torch.Tensor | None] | None = None,
) -> PrunedSequence:
    """Build the window's inputs. importance[i], when given, replaces QI-EI as page i's token ranking."""
    device = adapter.device
    ids = prompt.ids.to(device)
    positions = adapter.rope_index(ids[None], prompt.grid_thw.to(device))[:, 0]  # on the FULL sequence
    embeds = adapter.embed(ids)
    query_embeds = embeds[prompt.query_mask.to(device)]
    img_rows = torch.nonzero(ids == adapter.image_token_id).squeeze(1)
    embeds[img_rows] = torch.cat([f.embeds for f in feats]).to(embeds.dtype)

    keep, kept_rows, start = [], [], 0
    for i, f in enumerate(feats):
        n = f.embeds.shape[0]
        imp = importance[i] if importance is not None else None
        if imp is not None and imp.numel() != n:
            raise ValueError(f"importance of page {i} has {imp.numel()} values for {n} visual tokens")
        if keep_ratio < 1.0:
            k = select_top(imp.reshape(-1) if imp is not None else qiei_importance(query_embeds, f.embeds), keep_ratio)
        else:
            k = torch.arange(n)
        keep.append(k.cpu())
        kept_rows.append(img_rows[start + k.to(device)])
        start += n
    rows = torch.ones(len(ids), dtype=torch.bool, device=device)
    rows[img_rows] = False
    rows[torch.cat(kept_rows)] = True
    n_ds = len(feats[0].deepstack)
    deepstack = [torch.cat([f.deepstack[j][k.to(device)] for f, k in zip(feats, keep)]) for j in range(n_ds)]
    label_rows = None
    if prompt.label_rows is not None:
        label_rows = (torch.cumsum(rows.long(), 0) - 1)[prompt.label_rows.to(device)].cpu()
    return PrunedSequence(embeds[rows], positions[:, rows], (ids == adapter.image_token_id)[rows], deepstack, keep,
                          ids[rows], label_rows)


def window_sequence(adapter: FamilyAdapter, tokenizer, template: ListwiseTemplate, labels, answer_id: int, query: str,
                    feats: list[VisualFeatures], grid_thw: torch.Tensor, keep_ratio: float = 1.0,
                    importance: list[torch.Tensor | None] | None = None) -> PrunedSequence:
    """One window's pruned LM input: the prompt of `query` over these pages (labels[:n] in this order), pruned.
    The reranker and the listwise training stage both build windows here (the one code path)."""
    prompt = single_pass_prompt(tokenizer, template, query, tuple(labels)[: len(feats)], grid_thw, adapter.merge_size,
                                answer_id, adapter.image_token_id)
    return pruned_sequence(adapter, prompt, feats, keep_ratio, importance)


def single_pass_logits(adapter: FamilyAdapter, seqs: list[PrunedSequence], head: LabelHead,
                       readout: str = "all") -> torch.Tensor:
    """Label logits (B, n_labels) at the last token of each sequence; sequences of different lengths are
    left-padded into one batch and padding is masked out of every real token's attention.

    readout="labels": in the last layer the answer token attends to the label tokens only (ListwiseConfig.readout,
    as in the cached layout). That layer's keys and values of a row depend on that row's own input state alone, and
    only the answer token's output is read, so the layer runs on the label rows and the answer token alone: exact,
    and O(n) instead of an S×S mask."""
    device, dtype = adapter.device, adapter.dtype
    B, S = len(seqs), max(s.embeds.shape[0] for s in seqs)
    hidden = torch.zeros(B, S, adapter.hidden_size, dtype=dtype, device=device)
    positions = torch.zeros(3, B, S, dtype=torch.long, device=device)
    visual = torch.zeros(B, S, dtype=torch.bool, device=device)
    real = torch.zeros(B, S, dtype=torch.bool, device=device)
    for b, s in enumerate(seqs):
        pad = S - s.embeds.shape[0]
        hidden[b, pad:], positions[:, b, pad:], visual[b, pad:], real[b, pad:] = s.embeds, s.positions, s.visual, True
    if B == 1 and adapter.model.config.get_text_config()._attn_implementation in _CAUSAL_KERNELS:
        # One unpadded sequence: the kernel applies causality itself. An explicit S×S mask would cost 0.8-1.6 GB
        # at 20 pages × 1,000 tokens and keep sdpa off its flash kernels.
        mask = None
    else:  # padding rows see only themselves, so no row is fully masked
        allowed = (causal(S, S, device) & real[:, None, :]) | torch.eye(S, dtype=torch.bool, device=device)
        mask = additive_mask(allowed, dtype)
    n_ds = len(seqs[0].deepstack)
    deepstack = (visual, [torch.cat([s.deepstack[j] for s in seqs]) for j in range(n_ds)]) if n_ds else None
    cos_sin = adapter.rotary(hidden, positions)
    last = adapter.num_layers - 1
    if readout == "all":
        hidden = run_layers(adapter, hidden, cos_sin, mask, range(adapter.num_layers), PastKV(), deepstack)
        return head(adapter.norm(hidden[:, -1]))
    if any(s.label_rows is None for s in seqs):
        raise ValueError("readout='labels' needs each page's label token (a tokenizer that keeps the labels whole)")
    if deepstack is not None and n_ds > last:
        raise ValueError("readout='labels': deepstack features reach the read-out layer")
    hidden = run_layers(adapter, hidden, cos_sin, mask, range(last), PastKV(), deepstack)
    label_rows = [s.label_rows.to(device) + (S - s.embeds.shape[0]) for s in seqs]
    return head(adapter.norm(answer_over_labels(adapter, hidden, positions, label_rows, last)))
