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

The fast path runs the table block by block instead of as one masked Q: per layer, H (all windows in one batch),
then every L_i of every window as its own row of a batch (over P, its window's H and its page's rows), then T
(over P, H, all of its window's L and pages). Each row attends over exactly the keys the table gives it, so this is
the same computation as one Q under a mask, without the |Q| × (|Q| + |V|) scores that are almost all masked (20
pages, 37-token label segments, 72 kept rows a page: 7× fewer scored pairs in the band, 5.6× outside it). Only
"[" is read at the exit, and in the read-out layer it reads only the label rows, so `cached_answer` runs the layer
before it to the end for the label rows and "[" alone (the other rows only pass on their keys and values) and the
read-out layer on those rows alone (`answer_over_labels`). `reference.cached_listwise_reference` runs the whole sequence with an explicit per-layer
mask of the same semantics and must give the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from ...engine.families import FamilyAdapter
from ...engine.kv import PageKV, PastKV, additive_mask, causal, run_layer_tail, run_layers
from ...engine.prefill import text_positions
from .prompt import CachedQuery, LabelHead, ListwiseTemplate, cached_query
from .readout import answer_over_labels


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
    """Label logits (B, n_labels) of each window."""
    return head(adapter.norm(cached_answer(adapter, prefix, windows, range(exit_layer), band,
                                           readout_at=readout_layer(readout, exit_layer))))


def cached_answer(
    adapter: FamilyAdapter,
    prefix: list[tuple[torch.Tensor, torch.Tensor]],
    windows: list[CachedWindow],
    layers: range,
    band: tuple[int, int],
    hidden: torch.Tensor | None = None,
    readout_at: int | None = None,
) -> torch.Tensor:
    """The answer token's state (B, H) after `layers` (which end at the exit), as cached_states would give it, but
    computing only what "[" reads: with the read-out layer last in `layers`, the layer before it returns the label
    rows and "[" alone (the other rows only pass on their keys and values), and the read-out layer runs on those rows
    alone (`answer_over_labels`)."""
    _check_readout(readout_at, layers, band)
    if readout_at is None or readout_at not in layers or readout_at != layers.stop - 1:
        return cached_states(adapter, prefix, windows, layers, band, hidden, readout_at)[:, -1]
    blocks, states = _run_blocks(adapter, prefix, windows, range(layers.start, readout_at), band, hidden,
                                 last_rows_only=True)
    # Per window: its label rows (each L block's last row) in label order, then "[" (T's last row).
    slot = blocks.l_slot
    rows = torch.cat([states["L"][:, -1][slot], states["T"][:, -1:]], 1)
    positions = torch.cat([blocks.positions["L"][:, :, -1][:, slot], blocks.positions["T"][:, :, -1:]], 2)
    label_rows = [torch.arange(len(w.kvs), device=adapter.device) for w in windows]
    return answer_over_labels(adapter, rows, positions, label_rows, readout_at)


def cached_states(
    adapter: FamilyAdapter,
    prefix: list[tuple[torch.Tensor, torch.Tensor]],
    windows: list[CachedWindow],
    layers: range,
    band: tuple[int, int],
    hidden: torch.Tensor | None = None,
    readout_at: int | None = None,
) -> torch.Tensor:
    """Q's hidden states (B, Tq, H), Q left-padded, after `layers`, from the token embeddings or, for layers starting
    above 0, from `hidden` (the states entering layers.start, as an earlier call returned them for the same windows).
    Training splits a window at a frozen layer this way: the frozen part runs once, the trained part every epoch.
    readout_at: the layer in which the last row reads the label rows only (see `readout_layer`). Padding rows of Q
    come back as zeros."""
    _check_readout(readout_at, layers, band)
    blocks, states = _run_blocks(adapter, prefix, windows, layers, band, hidden, readout_at)
    out = states["H"].new_zeros(len(windows), blocks.Tq, states["H"].shape[2])
    for k in "HLT":
        real = blocks.real[k]
        out = out.index_put((blocks.owner[k][:, None].expand_as(real)[real], blocks.index[k][real]), states[k][real])
    return out


def _check_readout(readout_at: int | None, layers: range, band: tuple[int, int]) -> None:
    # A read-out layer reads the label rows alone; inside the band "[" would also have to read the pages.
    if readout_at is not None and readout_at in layers and band[0] <= readout_at < band[1]:
        raise ValueError(f"the read-out layer {readout_at} lies inside the band {band}")


def _run_blocks(adapter: FamilyAdapter, prefix, windows: list[CachedWindow], layers: range, band: tuple[int, int],
                hidden: torch.Tensor | None, readout_at: int | None = None,
                last_rows_only: bool = False) -> tuple["_Blocks", dict[str, torch.Tensor]]:
    """Run `layers` block by block (module docstring); the states of each block kind, in its batch layout. With
    last_rows_only, the last layer returns only each L and T block's last row and nothing of H."""
    if (hidden is None) != (layers.start == 0):
        raise ValueError("pass the entering hidden states exactly when the layers start above 0")
    device, dtype = adapter.device, adapter.dtype
    B, Tq = len(windows), max(len(w.query.ids) for w in windows)
    if hidden is None:
        ids = torch.zeros(B, Tq, dtype=torch.long, device=device)
        for b, w in enumerate(windows):
            ids[b, Tq - len(w.query.ids):] = w.query.ids.to(device)
        hidden = adapter.embed(ids)
    blocks = _Blocks(windows, Tq, prefix[0][0].shape[2], band, device, dtype)
    states = {k: hidden[blocks.owner[k][:, None], blocks.index[k]] for k in "HLT"}
    cos_sin = {k: adapter.rotary(hidden, blocks.positions[k]) for k in "HLT"}
    for l in layers:
        in_band = band[0] <= l < band[1]
        pk, pv = prefix[l]
        rec = {}
        for k in "HLT":
            past = blocks.past(k, l, pk, pv, rec, in_band)
            mask = blocks.masks[k, in_band, k == "T" and l == readout_at]  # only "[" (in T) reads out
            if last_rows_only and l == layers.stop - 1:
                states[k] = run_layer_tail(adapter, l, states[k], cos_sin[k], mask, past, 0 if k == "H" else 1)
            else:
                states[k] = run_layers(adapter, states[k], cos_sin[k], mask, range(l, l + 1), past)
            rec[k] = past.recorded[l]
    return blocks, states


def _query_positions(windows: list[CachedWindow], Tq: int, device) -> torch.Tensor:
    """(3, B, Tq) positions of each left-padded Q: text positions after the window's longest page."""
    positions = torch.zeros(3, len(windows), Tq, dtype=torch.long, device=device)
    for b, w in enumerate(windows):
        t = len(w.query.ids)
        positions[:, b, Tq - t:] = text_positions(max(kv.next_position for kv in w.kvs), t, device)
    return positions


class _Blocks:
    """The blocks of a batch of Q's (H per window, L per window and page, T per window), each block kind left-padded
    into one batch, with the page rows each block reads and the masks of the table in the module docstring."""

    def __init__(self, windows: list[CachedWindow], Tq: int, P: int, band: tuple[int, int], device, dtype):
        self.band, self.Tq = band, Tq
        # Q is H, L_0 … L_{n-1}, T in this order (cached_query): each block is a run of Q rows.
        runs = {"H": [], "L": [], "T": []}  # (window, first Q row, length) per block row
        for b, w in enumerate(windows):
            n, pad = len(w.kvs), Tq - len(w.query.ids)
            counts = torch.bincount(w.query.seg + 1, minlength=n + 2).tolist()
            starts = [pad + x for x in accumulate([0] + counts[:-1])]
            for kind, start, length in zip(["H"] + ["L"] * n + ["T"], starts, counts):
                runs[kind].append((b, start, length))
        qpos = _query_positions(windows, Tq, device)
        self.owner, self.index, self.real, self.positions = {}, {}, {}, {}
        for k, rs in runs.items():
            owner, start, length = (torch.tensor(x, device=device) for x in zip(*rs))
            col = torch.arange(int(length.max()), device=device)
            lead = len(col) - length  # left padding of each block row
            self.real[k] = col[None] >= lead[:, None]
            self.index[k] = torch.where(self.real[k], start[:, None] + col[None] - lead[:, None], 0)
            self.owner[k] = owner
            self.positions[k] = qpos[:, owner[:, None], self.index[k]]

        # Page rows: per L row its own page's kept rows; per window (T) all of its pages'. Right-padded.
        nb, kvh, _, d = windows[0].kvs[0].k.shape
        kept = [(kv, r) for w in windows for kv, r in zip(w.kvs, w.rows)]
        page_n = [len(r) for _, r in kept]
        win_n = [sum(len(r) for r in w.rows) for w in windows]
        self.page_k = torch.zeros(nb, len(kept), kvh, max(page_n), d, dtype=dtype, device=device)
        self.page_v = torch.zeros_like(self.page_k)
        self.win_k = torch.zeros(nb, len(windows), kvh, max(win_n), d, dtype=dtype, device=device)
        self.win_v = torch.zeros_like(self.win_k)
        j = 0
        for b, w in enumerate(windows):
            start = 0
            for kv, r in zip(w.kvs, w.rows):
                k, v = kv.rows(r, device, dtype)
                self.page_k[:, j, :, : len(r)], self.page_v[:, j, :, : len(r)] = k, v
                self.win_k[:, b, :, start : start + len(r)], self.win_v[:, b, :, start : start + len(r)] = k, v
                start, j = start + len(r), j + 1
        page_real = torch.arange(max(page_n), device=device)[None] < torch.tensor(page_n, device=device)[:, None]
        win_real = torch.arange(max(win_n), device=device)[None] < torch.tensor(win_n, device=device)[:, None]

        # Keys of each block kind, in the order `past` concatenates them: P, [H], [L of the window], [pages], self.
        # A padding row sees P alone (never a fully masked row); a real row never sees padding.
        def allowed(k: str, sources: list[torch.Tensor]) -> torch.Tensor:
            real = self.real[k]
            own = causal(real.shape[1], real.shape[1], device)[None] & real[:, None, :]
            keys = torch.cat([torch.ones(len(real), P, dtype=torch.bool, device=device)] + sources, 1)
            keys = keys[:, None, :].expand(-1, real.shape[1], -1)
            full = torch.cat([keys, own], 2)
            pad_row = torch.zeros_like(full)
            pad_row[:, :, :P] = True
            return torch.where(real[:, :, None], full, pad_row)

        h_real = self.real["H"]
        # A window's L blocks side by side: (B, n_max * width_L); label rows are each block's last column.
        n_max = max(len(w.kvs) for w in windows)
        wl = self.real["L"].shape[1]
        self.l_used = torch.zeros(len(windows), n_max, dtype=torch.bool, device=device)
        self.l_slot = torch.zeros(len(windows), n_max, dtype=torch.long, device=device)  # L batch row of (b, i); 0 unused
        j = 0
        for b, w in enumerate(windows):
            n = len(w.kvs)
            self.l_used[b, :n], self.l_slot[b, :n], j = True, torch.arange(j, j + n, device=device), j + n
        l_real = (self.real["L"][self.l_slot] & self.l_used[:, :, None]).flatten(1)
        l_owner = self.owner["L"]
        self.masks = {}
        for in_band in (False, True):
            self.masks["H", in_band, False] = additive_mask(allowed("H", []), dtype)
            self.masks["L", in_band, False] = additive_mask(
                allowed("L", [h_real[l_owner]] + ([page_real] if in_band else [])), dtype)
            t = allowed("T", [h_real, l_real] + ([win_real] if in_band else []))
            self.masks["T", in_band, False] = additive_mask(t, dtype)
            read = t.clone()
            read[:, -1] = False
            label_cols = P + h_real.shape[1] + torch.arange(n_max, device=device) * wl + wl - 1
            read[:, -1, label_cols] = self.l_used
            self.masks["T", in_band, True] = additive_mask(read, dtype)

    def past(self, k: str, l: int, pk: torch.Tensor, pv: torch.Tensor, rec: dict, in_band: bool) -> PastKV:
        """Past keys/values of block kind k in layer l: P, then what the table lets k see (rec: the keys/values the
        earlier kinds recorded in this layer)."""
        n = len(self.owner[k])
        keys, values = [pk.expand(n, -1, -1, -1)], [pv.expand(n, -1, -1, -1)]
        if k in "LT":
            hk, hv = rec["H"]
            sel = self.owner[k]
            keys.append(hk[sel]), values.append(hv[sel])
        if k == "T":
            lk, lv = rec["L"]
            # (B, kvh, n_max * width, d): each window's L blocks in label order (unused slots repeat row 0, masked)
            for src, dst in ((lk, keys), (lv, values)):
                x = src[self.l_slot]  # (B, n_max, kvh, w, d)
                dst.append(x.transpose(1, 2).flatten(2, 3))
        if in_band and k in "LT":
            pages = (self.page_k, self.page_v) if k == "L" else (self.win_k, self.win_v)
            keys.append(pages[0][l - self.band[0]]), values.append(pages[1][l - self.band[0]])
        return PastKV({l: (torch.cat(keys, 2), torch.cat(values, 2))}, record={l})
