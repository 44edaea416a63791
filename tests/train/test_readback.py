"""The analytic read-back head (train/readback.py) on a tiny random model: fitted on a few windows of the model's
own states, it makes "[" name a label that is present in windows it never saw, which the random layer does not."""

from __future__ import annotations

import random

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
