"""An analytic read-back head: set the last LM layer so that the answer token "[" copies the label tokens back.

Why: a label logit at "[" needs "[" to attend to the label tokens and copy each one's identity into its own
logits. A pretrained MLLM has copy (induction) heads for this; the toy LM, pretrained on page text alone, has none,
and neither the ranking loss nor the copy task (`listwise.copy_loss`) grows one on this CPU: the copy task was
memorised on a fixed pool of windows (train loss 2.4) while fresh windows stayed at chance (3.3 > log 20). The
circuit is simple enough to write down from the init's own states:

    keys     one key dimension is a linear probe "this is a label token" (ridge regression on the states entering the
             layer, label rows 1, every other query row 0; with readout="labels" only the label rows and "[", the
             rows that layer reads); the other key dimensions hold a random projection of
             the state as ballast, so that the key norm (q/k RMSNorm) does not blow a small probe value up
    query    "[" (a fixed text, nearly the same state in every window) gets a query along that key dimension
    values   value and output projections together map a label token's state to the direction that raises that
             label's logit through the final norm and the tied head (ridge regression, truncated to the head size)
    rest     the other query heads read the same keys and values (one KV head), so all heads are the copy head;
             the layer's MLP is switched off, so the layer only copies

The probe dimension is the RoPE pair that rotates slowest (head_dim/2 - 1 and head_dim - 1 under rotate_half),
so the score hardly depends on how far a label sits from "[". On the toy student this alone names a present label
in 95 % of fresh copy windows (copy loss 1.3 against 3.0 for uniform logits); it weights the labels about evenly,
so ranking them by relevance is left to training (the listwise stage's --readback-init).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# The head both shipped listwise models use and `tune --listwise` writes by default: a soft relevance key and a copy
# 20x the state "[" brings, so that the label logits follow the attention over the labels (validation nDCG@5 of the
# single pass's head 0.699 -> 0.752 against 1.0 / 3.0, docs/DESIGN.md "A faithful read-back").
HEAD_RELEVANCE = 0.5
HEAD_COPY_SCALE = 20.0


@dataclass
class ReadbackFit:
    """What install_readback needs, fitted on states entering the read-back layer."""

    probe: torch.Tensor  # (H,) label-token probe over the layer's normed input
    answer: torch.Tensor  # (H,) mean normed input state of "["
    copy: torch.Tensor  # (H, H) normed label state -> the direction that raises its label's logit alone
    state_norm: float  # mean norm of the residual state at "[" (the copy is scaled against it)
    input_norm: float  # mean norm of the normed input rows (the ballast is scaled against it)
    copy_norm: float  # mean norm of copy @ x over the label rows
    probe_labels: float  # mean probe value on label rows (about 1)
    probe_others: float  # and on every other row (about 0)
    relevance: torch.Tensor | None = None  # (H,) centred relevance read-out over the normed input, label-row std 1


def readback_states(adapter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """One cached window's normed input to `layer` (T, H). `hidden`: the query states entering `layer` (1, T, H),
    as ListwiseScorer.cached_frozen returns them."""
    with torch.no_grad():
        return adapter.layers[layer].input_layernorm(hidden[0]).float()


def fit_readback(windows: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[int], torch.Tensor]],
                 embeddings: torch.Tensor, final_norm: torch.Tensor, ridge: float = 1.0,
                 relevance: torch.Tensor | None = None, centre: bool = True, probe_rows: str = "all") -> ReadbackFit:
    """Fit the probe and the copy map. windows: (normed states (T, H), label rows, their label token ids, the
    residual state at "[" (H,)) per window; embeddings: the (tied) token embedding table; final_norm: the final
    RMSNorm's weight. relevance: a direction over the normed states whose dot product scores a label row's page
    (see `relevance_direction`); it is centred here (its mean over label rows taken out along the states' mean, which
    every normed row carries about once) and scaled to unit spread over the label rows. centre=False keeps it
    uncentred: with ListwiseConfig.readout="labels" "[" sees the label rows alone, and a softmax over them ignores a
    shared offset, while the centring's correction (the mean lens times each row's share of the states' mean) varies
    from row to row where label states differ, as in the single pass (validation lens 0.686 raw, 0.46 centred).
    probe_rows="labels": fit the probe on the label rows and "[" alone, the rows a read-out layer with
    ListwiseConfig.readout="labels" reads. There the probe only has to be the same on every label row (the constant
    part of the key that the q/k RMSNorm divides the relevance by); fitted against every row of a 20-page
    single-pass window it reached 0.42 on label rows instead of 1, unevenly, and the keys ranked the labels less
    faithfully (validation 0.678 against 0.752, the lens itself 0.750)."""
    if probe_rows not in ("all", "labels"):
        raise ValueError(f"probe_rows must be 'all' or 'labels', got {probe_rows!r}")
    xs = torch.cat([w[0] for w in windows])
    is_label = torch.cat([torch.zeros(len(w[0])).index_fill_(0, w[1], 1.0) for w in windows])
    eye = torch.eye(xs.shape[1])
    xr, yr = xs, is_label  # the rows the probe is fitted on, and their targets
    if probe_rows == "labels":  # each window's label rows and its last row, "["
        read = torch.cat([torch.zeros(len(w[0]), dtype=torch.bool).index_fill_(0, w[1], True) for w in windows])
        read[torch.cumsum(torch.tensor([len(w[0]) for w in windows]), 0) - 1] = True
        xr, yr = xs[read], is_label[read]
    probe = torch.linalg.solve(xr.T @ xr + ridge * eye, xr.T @ yr)
    xl = torch.cat([w[0][w[1]] for w in windows])
    ids = torch.cat([torch.as_tensor(list(w[2])) for w in windows])
    # A copied label must raise its own logit and no other label's: the labels' logit directions through the final
    # norm and the tied head overlap (cosine ~0.4 on the toy), so the target of label j is the dual basis vector
    # (M^T (M M^T)^-1 e_j, M = the label directions), not label j's own direction. Unequal own-logit gains showed up
    # as label biases of several logits that outweigh the relevance.
    labels, index = torch.unique(ids, return_inverse=True)
    m = embeddings[labels].float() * final_norm.float()
    dual = torch.linalg.solve(m @ m.T, m).T  # (H, L): m @ dual = I
    targets = dual.T[index]
    targets = targets / targets.norm(dim=1).mean()
    copy = (targets.T @ xl) @ torch.linalg.inv(xl.T @ xl + ridge * eye)
    values = xr @ probe
    if relevance is not None:
        # Centred on the label rows (the mean comes out along the states' mean, which every normed row carries about
        # once) and scaled to unit spread there.
        if centre:
            mean = xs.mean(0)
            relevance = relevance - (xl @ relevance).mean() * mean / (mean @ mean)
        relevance = relevance / (xl @ relevance).std().clamp_min(1e-6)
    return ReadbackFit(probe, torch.stack([w[0][-1] for w in windows]).mean(0), copy,
                       float(torch.stack([w[3] for w in windows]).float().norm(dim=1).mean()),
                       float(xs.norm(dim=1).mean()), float((xl @ copy.T).norm(dim=1).mean()),
                       float(values[yr == 1].mean()), float(values[yr == 0].mean()), relevance)


def relevance_direction(adapter, layer: int, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The point-wise head's judgement as a direction over `layer`'s normed input: logit(yes) - logit(no) through the
    final norm and the tied head is (positive - negative) * final gain . h / rms(h), and the layer's input norm is
    gain_l * h / rms(h), so the same score is this direction's dot product with the normed input (the "logit lens")."""
    return ((positive - negative).float() * adapter.norm.weight.float()
            / adapter.layers[layer].input_layernorm.weight.float())


def readback_init(scorer, frozen: Sequence, relevance_scale: float = 0.0, single_pass: Sequence = (),
                  layer: int | None = None, centre: bool = True, copy_scale: float = 3.0) -> ReadbackFit:
    """Fit on these cached windows (`ListwiseScorer.cached_frozen` results, all split at the read-back layer,
    the last one before the exit) and install the head there. relevance_scale > 0 also keys the head on each label
    row's own yes/no judgement (`relevance_direction` of scorer.relevance), so "[" reads the labels of the pages
    judged relevant most. single_pass: (states entering the layer (1, S, H), sequence) pairs from
    `ListwiseScorer.single_pass_frozen`, fitted together with the cached windows (one head for both layouts), or
    alone (no cached windows: then `layer` names the read-back layer, the model's last). centre: see fit_readback;
    the probe is fitted on the rows the read-out reads (scorer.readout, fit_readback's probe_rows).
    copy_scale: see install_readback. Returns the fit (its probe statistics say how cleanly the label tokens separate)."""
    if frozen:
        layer = frozen[0].split
    elif layer is None or not single_pass:
        raise ValueError("give cached windows, or single-pass windows and their read-back layer")
    if any(f.split != layer or f.exit_layer != layer + 1 for f in frozen):
        raise ValueError("fit the read-back head on windows split at the layer before the exit")
    states = [(f.hidden, f.window.query.label_rows()) for f in frozen]
    states += [(hidden, seq.label_rows.to(hidden.device)) for hidden, seq in single_pass]
    windows = [(readback_states(scorer.adapter, layer, hidden), rows, scorer.head.ids[: len(rows)], hidden[0, -1])
               for hidden, rows in states]
    direction = None
    if relevance_scale:
        head = scorer.relevance.lm_head.weight.detach()
        yes, no = scorer.relevance.ids
        direction = relevance_direction(scorer.adapter, layer, head[yes], head[no])
    fit = fit_readback(windows, scorer.model.get_input_embeddings().weight.detach(),
                       scorer.adapter.norm.weight.detach(), relevance=direction, centre=centre,
                       probe_rows="labels" if scorer.readout == "labels" else "all")
    install_readback(scorer.adapter, layer, fit, relevance_scale=relevance_scale, copy_scale=copy_scale)
    return fit


@torch.no_grad()
def install_readback(adapter, layer: int, fit: ReadbackFit, *, probe_scale: float = 3.0, sharpness: float = 11.0,
                     copy_scale: float = 3.0, relevance_scale: float = 0.0, relevance_query: float = 1.0,
                     seed: int = 0) -> None:
    """Overwrite `layer`'s attention with the read-back head and switch its MLP off (see the module docstring).
    probe_scale: the probe's weight against the ballast (norm 1); sharpness: the attention logit of a label row
    (others ~0; set through the q/k-norm gains); copy_scale: a copied label's norm, in units of the residual norm
    at "["; relevance_scale: the centred relevance's weight in the second-slowest RoPE pair of the key (0: none, the
    labels are read about evenly), relevance_query: the query of "[" on that pair, relative to the probe's."""
    block = adapter.layers[layer]
    attn = block.self_attn
    hidden = fit.probe.numel()
    head_dim = attn.head_dim
    n_heads = attn.q_proj.weight.shape[0] // head_dim
    n_kv = attn.k_proj.weight.shape[0] // head_dim
    slow = (head_dim // 2 - 1, head_dim - 1)  # the RoPE pair with the lowest frequency (rotate_half layout)
    slow2 = (head_dim // 2 - 2, head_dim - 2)  # the next one: the relevance
    dtype = attn.q_proj.weight.dtype

    q = torch.zeros(head_dim, hidden)
    q[slow[0]] = fit.answer / fit.answer.norm() ** 2  # "[" -> 1 on the probe dimension
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(head_dim, hidden, generator=g) / ((head_dim - 4) ** 0.5 * fit.input_norm)  # ballast, norm ~1
    k[list(slow) + list(slow2)] = 0.0
    k[slow[0]] = probe_scale * fit.probe / fit.probe_labels  # label rows ~probe_scale, the rest ~0
    if relevance_scale:
        if fit.relevance is None:
            raise ValueError("relevance_scale needs a fit with a relevance direction (fit_readback(relevance=...))")
        # a label row's attention logit rises with its page's judgement; the softmax over labels is shift-free, and
        # centring keeps the other rows' keys about where they were
        q[slow2[0]] = relevance_query * q[slow[0]]
        k[slow2[0]] = relevance_scale * fit.relevance
    u, s, vt = torch.linalg.svd(fit.copy)
    u, s, vt = u[:, :head_dim], s[:head_dim], vt[:head_dim]
    v = s.sqrt()[:, None] * vt
    o = u * s.sqrt()[None]
    gain = copy_scale * fit.state_norm / max(fit.copy_norm, 1e-6)  # a copied label: copy_scale x |state at "["|

    attn.q_proj.weight.copy_(q.repeat(n_heads, 1).to(dtype))
    attn.k_proj.weight.copy_(k.repeat(n_kv, 1).to(dtype))
    attn.v_proj.weight.copy_((v * gain ** 0.5).repeat(n_kv, 1).to(dtype))
    attn.o_proj.weight.copy_(torch.cat([o * gain ** 0.5 / n_heads] * n_heads, 1).to(dtype))
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        if proj.bias is not None:
            proj.bias.zero_()
    # q.k / sqrt(d) for a label row: with q/k RMSNorm both are ~sqrt(d) x gain on the probe dimension
    if getattr(attn, "q_norm", None) is not None:
        # q's norm spreads "[" over both pairs: scale the gains so the probe pair keeps its logit
        spread = (1 + (relevance_query if relevance_scale else 0.0) ** 2) ** 0.25
        attn.q_norm.weight.fill_((sharpness / head_dim ** 0.5) ** 0.5 * spread)
        attn.k_norm.weight.fill_((sharpness / head_dim ** 0.5) ** 0.5 * spread)
    else:  # no norm: q ~ 1, k ~ probe_scale on the probe dimension
        attn.q_proj.weight.mul_(sharpness * head_dim ** 0.5 / probe_scale)
    block.mlp.down_proj.weight.zero_()
