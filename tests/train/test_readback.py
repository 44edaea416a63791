"""The analytic read-back head (train/readback.py) on a tiny random model: fitted on a few windows of the model's
own states, it makes "[" name a label that is present in windows it never saw, which the random layer does not."""

from __future__ import annotations

import random

import pytest
import torch

from minirerank_core.rerankers.listwise.config import RANKGPT_LABELS
from minirerank_core.testing import random_page_image
from minirerank_core.train import listwise as L
from minirerank_core.train.readback import fit_readback, install_readback, readback_states

from tests.train.test_listwise_stage import PAGE, _load, toy  # noqa: F401  (the module's toy fixture)

EXIT, BAND = 4, (1, 3)


def _window(scorer, rng, n, labels=None):
    images = [random_page_image(*PAGE, seed=rng.randrange(10**6)) for _ in range(n)]
    query = rng.choice(["socket buffer", "thread lock", "garden tomatoes", "metaclass abstract method"])
    return scorer.cached_frozen(query, images, EXIT, BAND, EXIT - 1, page_ids=[f"p{rng.randrange(10**9)}" for _ in images],
                                labels=labels)


def _fit_windows(toy_dir, seed: int, n: int = 8):
    """The toy teacher's scorer, n cached windows split at the read-back layer and their fit_readback inputs."""
    model, proc = _load(toy_dir / "teacher")
    scorer = L.ListwiseScorer(model, proc, L.READBACK_TEMPLATE)
    scorer.frozen_kv = {}
    rng = random.Random(seed)
    frozen = [_window(scorer, rng, rng.randint(3, 6)) for _ in range(n)]
    windows = [(readback_states(scorer.adapter, EXIT - 1, f.hidden), f.window.query.label_rows(),
                scorer.head.ids[: len(f.window.kvs)], f.hidden[0, -1]) for f in frozen]
    return model, scorer, frozen, windows


def _copy_rate(scorer, seed, n_windows=24):
    rng = random.Random(seed)
    hits, losses = 0, []
    for _ in range(n_windows):
        n = rng.choice([1, 2, 3])
        labels = rng.sample(list(RANKGPT_LABELS), n)
        with torch.no_grad():
            logits = scorer.cached_tail(_window(scorer, rng, n, labels)).logits
        present = [RANKGPT_LABELS.index(x) for x in labels]
        hits += int(int(logits.argmax()) in present)
        losses.append(float(L.copy_loss(logits, present)))
    return hits / n_windows, sum(losses) / n_windows


def test_readback_head_names_present_labels_in_unseen_windows(toy):  # noqa: F811
    model, proc = _load(toy / "teacher")
    model.eval()
    scorer = L.ListwiseScorer(model, proc, L.READBACK_TEMPLATE)
    scorer.frozen_kv = {}
    rng = random.Random(0)
    windows = []
    for _ in range(16):
        f = _window(scorer, rng, rng.randint(2, 6))
        rows = f.window.query.label_rows()
        assert len(rows) == len(f.window.kvs)
        windows.append((readback_states(scorer.adapter, EXIT - 1, f.hidden), rows, scorer.head.ids[: len(rows)],
                        f.hidden[0, -1]))
    fit = fit_readback(windows, model.get_input_embeddings().weight.detach(), scorer.adapter.norm.weight.detach())
    assert fit.probe_labels > 0.3 and abs(fit.probe_others) < 0.05  # a linear probe finds the label tokens
    before, before_loss = _copy_rate(scorer, seed=99)
    install_readback(scorer.adapter, EXIT - 1, fit)
    after, after_loss = _copy_rate(scorer, seed=99)
    # a random tiny model's probe is noisier than a trained one's (labels 1.0 +- 0.35, others 0.01 +- 0.12): about
    # half the unseen windows (a random label: 0.1), and a lower copy loss
    assert after >= 0.4 and before <= 0.15 and after_loss < before_loss - 0.1, (before, after, before_loss, after_loss)
    mlp = scorer.adapter.layers[EXIT - 1].mlp.down_proj.weight
    assert float(mlp.detach().abs().max()) == 0.0  # the read-back layer only copies


def test_relevance_keyed_head_reads_the_labels_scored_highest_first(toy):  # noqa: F811
    """With relevance_scale (and the label read-out), "[" names the label whose row scores highest on the fitted
    relevance direction in unseen windows; the even head does not. The direction here is a random one (a random
    model's yes/no lens mostly tracks a label's place in the prompt), so the test is about the mechanism; the last
    lines check that relevance_direction is the yes/no head's logit lens."""
    from minirerank_core.train.readback import relevance_direction

    model, proc = _load(toy / "teacher")
    model.eval()
    scorer = L.ListwiseScorer(model, proc, L.READBACK_TEMPLATE)
    scorer.frozen_kv = {}
    scorer.readout = "labels"  # "[" reads the label rows only: other rows that score high cannot pull it away
    rng = random.Random(1)

    def rows(f):
        return readback_states(scorer.adapter, EXIT - 1, f.hidden), f.window.query.label_rows()

    fit_windows = [(*rows(f), scorer.head.ids[: len(f.window.kvs)], f.hidden[0, -1])
                   for f in (_window(scorer, rng, rng.randint(3, 6)) for _ in range(16))]
    direction = torch.randn(model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    fit = fit_readback(fit_windows, model.get_input_embeddings().weight.detach(), scorer.adapter.norm.weight.detach(),
                       relevance=direction)
    x, r = rows(_window(scorer, rng, 4))
    assert abs(float((x[r] @ fit.relevance).std()) - 1.0) < 0.8  # centred and scaled on the label rows
    unseen = [_window(scorer, random.Random(7 + i), 5) for i in range(20)]
    scored = [(lambda x, r: x[r] @ fit.relevance)(*rows(f)) for f in unseen]

    def spearman(a, b):
        return float(torch.corrcoef(torch.stack([a.argsort().argsort().float(), b.argsort().argsort().float()]))[0, 1])

    got = {}
    for scale, query, copy in ((0.0, 1.0, 3.0), (1.0, 1.0, 3.0), (1.0, 2.0, 3.0), (0.5, 1.0, 3.0), (0.5, 1.0, 20.0)):
        install_readback(scorer.adapter, EXIT - 1, fit, relevance_scale=scale, relevance_query=query, copy_scale=copy)
        with torch.no_grad():
            logits = [scorer.cached_tail(f).logits for f in unseen]
        got[scale, query, copy] = (
            sum(int(x.argmax()) == int(s.argmax()) for x, s in zip(logits, scored)) / len(unseen),
            sum(spearman(x, s) for x, s in zip(logits, scored)) / len(unseen))
    # (top-1 agreement, rank correlation of the logits with the scores); measured 0/-0.63, 0.6/0.84, 0.85/0.79
    assert got[0.0, 1.0, 3.0][1] < 0.2 and got[1.0, 1.0, 3.0][1] > 0.5 and got[1.0, 2.0, 3.0][0] >= 0.6, got
    # a softer key ranks the labels by smaller attention differences; a larger copy keeps the state "[" brings in
    # from blurring them (measured 0.61 -> 0.79)
    assert got[0.5, 1.0, 20.0][1] > got[0.5, 1.0, 3.0][1] + 0.1, got
    lens = relevance_direction(scorer.adapter, EXIT - 1, *model.lm_head.weight.detach()[list(scorer.relevance.ids)])
    h = torch.randn(3, model.config.text_config.hidden_size)  # the lens is the yes/no head through the final norm
    want = scorer.relevance(scorer.adapter.norm(h))
    got = scorer.adapter.layers[EXIT - 1].input_layernorm(h) @ lens
    assert torch.allclose(got, want, atol=1e-4), (got, want)


def test_uncentred_relevance_is_the_direction_itself_and_ranks_the_rows_as_it_does(toy):  # noqa: F811
    """fit_readback(centre=False): the relevance key is the given direction, only scaled to unit spread over the label
    rows (so within any window it orders the label rows exactly as the direction does); the centred one subtracts
    the mean judgement along the states' mean, which reorders rows whose share of that mean differs."""
    model, scorer, frozen, windows = _fit_windows(toy, seed=3)
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(model.config.text_config.hidden_size, generator=g) + 3 * windows[0][0].mean(0)  # a mean lens
    args = (windows, model.get_input_embeddings().weight.detach(), scorer.adapter.norm.weight.detach())
    raw = fit_readback(*args, relevance=direction, centre=False).relevance
    centred = fit_readback(*args, relevance=direction).relevance
    xl = torch.cat([w[0][w[1]] for w in windows])
    assert torch.allclose(raw / raw.norm(), direction / direction.norm(), atol=1e-6)
    assert abs(float((xl @ raw).std()) - 1.0) < 1e-4 and abs(float((xl @ centred).std()) - 1.0) < 1e-4
    # centring takes most of the shared judgement out (exactly only where every row carries the states' mean once)
    assert abs(float((xl @ centred).mean())) < abs(float((xl @ raw).mean())) / 2, (centred, raw)


def test_probe_fitted_on_the_read_rows_is_even_on_the_label_rows(toy):  # noqa: F811
    """fit_readback(probe_rows="labels"): the probe is fitted on the label rows and "[" only (what a read-out layer
    with readout="labels" reads), so it is about 1 on every label row, where a probe that must also stay 0 on every
    other row of the window is smaller and uneven there; readback_init picks it from scorer.readout."""
    from minirerank_core.train.readback import readback_init

    model, scorer, frozen, windows = _fit_windows(toy, seed=5)
    args = (windows, model.get_input_embeddings().weight.detach(), scorer.adapter.norm.weight.detach())
    xl = torch.cat([w[0][w[1]] for w in windows])
    fits = {rows: fit_readback(*args, probe_rows=rows) for rows in ("all", "labels")}
    spread = {rows: float((xl @ f.probe).std()) for rows, f in fits.items()}
    assert abs(fits["labels"].probe_labels - 1.0) < abs(fits["all"].probe_labels - 1.0), fits
    assert spread["labels"] < spread["all"], spread
    with pytest.raises(ValueError, match="probe_rows"):
        fit_readback(*args, probe_rows="every")
    for readout, rows in (("labels", "labels"), ("all", "all")):
        scorer.readout = readout
        got = readback_init(scorer, frozen)
        torch.testing.assert_close(got.probe, fits[rows].probe)
