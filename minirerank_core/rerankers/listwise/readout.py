"""The read-out layer (ListwiseConfig.readout="labels"), run for the answer token alone."""

from __future__ import annotations

import torch

from ...engine.families import FamilyAdapter
from ...engine.kv import PastKV, additive_mask, run_layers


def answer_over_labels(adapter: FamilyAdapter, hidden: torch.Tensor, positions: torch.Tensor,
                       label_rows: list[torch.Tensor], layer: int) -> torch.Tensor:
    """The answer token's state (B, H) after `layer`, in which it attends to the label rows only.

    hidden: (B, S, H) the states entering `layer`, each sequence's answer token its last row; positions: (3, B, S);
    label_rows[b]: the rows of sequence b's label tokens. A row's keys and values in a layer depend on that row's own
    input alone and only the answer's output is read, so the layer runs on the label rows and the answer token
    alone: exact, and O(n) instead of a mask over the whole sequence. Used by both layouts."""
    device, dtype = hidden.device, hidden.dtype
    B, S = hidden.shape[:2]
    n = max(len(r) for r in label_rows) + 1  # label rows, then the answer token; left-padded
    sub = hidden.new_zeros(B, n, hidden.shape[2])
    sub_pos = torch.zeros(3, B, n, dtype=torch.long, device=device)
    allowed = torch.eye(n, dtype=torch.bool, device=device).repeat(B, 1, 1)  # rows other than the answer: unread
    for b, r in enumerate(label_rows):
        rows = torch.cat([r.to(device), torch.tensor([S - 1], device=device)])
        off = n - len(rows)
        sub[b, off:], sub_pos[:, b, off:] = hidden[b, rows], positions[:, b, rows]
        allowed[b, -1] = False
        allowed[b, -1, off : n - 1] = True
    out = run_layers(adapter, sub, adapter.rotary(sub, sub_pos), additive_mask(allowed, dtype), range(layer, layer + 1),
                     PastKV())
    return out[:, -1]
