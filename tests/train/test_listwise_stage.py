"""The listwise training stage on toy sizes: it trains through the reranker's own window code (same logits,
gradients reach the LM), the loss goes down on a fixed window, windows are shuffled, the stage resumes without
rescoring the teacher, and its output and export reload as ListwiseRerankers with the settings they were trained in."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from minirerank_core import Page
from minirerank_core.engine.config import RerankConfig
from minirerank_core.engine.prompt import DEFAULT_TEMPLATE
from minirerank_core.engine.settings import read_settings, write_settings
from minirerank_core.rerankers.listwise import ListwiseConfig, ListwiseReranker
from minirerank_core.rerankers.listwise.settings import read_listwise_settings
from minirerank_core.testing import random_page_image
from minirerank_core.train import listwise as L
from minirerank_core.train.data import DataSet, build
from minirerank_core.train.models import (FrozenVisionCache, build_embedder, build_reranker, embedder_processor,
                                          reranker_processor, visual_module)

from tests.train.test_recipe import PAGE, TINY, _documents

N_VISUAL = (PAGE[0] // 32) * (PAGE[1] // 32)  # merged visual tokens of a toy page


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny dataset, a random tiny teacher (a minirerank checkpoint) and a random tiny embedder."""
    root = tmp_path_factory.mktemp("lw")
    data = root / "data"
    build(data, seed=0, vocab_size=400, max_pages_per_doc=3, val_frac=0.15, test_frac=0.15, documents=_documents(),
          page_size=PAGE, show_progress=False)
    tok = DataSet(data).tokenizer()
    teacher = root / "teacher"
    build_reranker(tok, TINY, seed=1).save_pretrained(teacher)
    reranker_processor(tok, TINY).save_pretrained(teacher)
    write_settings(teacher, RerankConfig(), DEFAULT_TEMPLATE)
    embedder = root / "embedder"
    build_embedder(tok, TINY, seed=1).save_pretrained(embedder)
    embedder_processor(tok, TINY).save_pretrained(embedder)
    return root


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32), AutoProcessor.from_pretrained(str(path))


def _images(n, seed=0):
    return [random_page_image(*PAGE, seed=seed + i) for i in range(n)]


CONFIGS = [ListwiseConfig(keep_ratio=0.5, prune_by="qiei", dtype="float32", device="cpu"),
           ListwiseConfig(mode="cached", exit_layer=3, band=(1, 3), keep_ratio=0.6, dtype="float32", device="cpu")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["single_pass", "cached"])
def test_training_logits_are_the_rerankers_and_gradients_reach_the_lm(toy, cfg, monkeypatch):
    model, proc = _load(toy / "teacher")
    prefilled = []
    real = L.prefill_pages
    monkeypatch.setattr(L, "prefill_pages", lambda *a, **k: (lambda got: prefilled.extend(got) or got)(real(*a, **k)))
    images = _images(5)
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(N_VISUAL, generator=g) for _ in images]
    r = ListwiseReranker(model, proc, cfg)
    want = r.score("socket buffer", [Page(im, id=f"p{i}") for i, im in enumerate(images)], importance=maps)
    model.train()
    scorer = L.ListwiseScorer(model, proc)
    got = scorer.scores(r.config, "socket buffer", images, maps)
    assert got.shape == (5,) and got.requires_grad
    assert got.detach().tolist() == pytest.approx(want, rel=1e-4, abs=1e-4)
    got.logsumexp(0).backward()
    layers = model.model.language_model.layers
    assert layers[0].self_attn.q_proj.weight.grad is not None
    assert float(layers[0].mlp.down_proj.weight.grad.abs().sum()) > 0
    if cfg.mode == "cached":  # the page KV is prefilled in the graph, so the loss reaches the page prefill too
        assert len(prefilled) == 5 and all(kv.k.grad_fn is not None and kv.v.grad_fn is not None for kv in prefilled)
        assert layers[3].self_attn.q_proj.weight.grad is None  # after the exit: never runs
    # The check can fail: another order of the same pages gives other logits.
    perm = [4, 2, 0, 3, 1]
    with torch.no_grad():
        other = scorer.scores(r.config, "socket buffer", [images[i] for i in perm], [maps[i] for i in perm])
    assert (other - got.detach()[perm]).abs().max() > 1e-4


@pytest.mark.parametrize("cfg", CONFIGS, ids=["single_pass", "cached"])
def test_loss_goes_down_on_a_fixed_window(toy, cfg):
    from minirerank_core.train.reranker import trainable_parameters

    torch.manual_seed(0)
    model, proc = _load(toy / "teacher")
    model.train()
    FrozenVisionCache(visual_module(model))
    cfg = cfg.resolve(4)
    scorer = L.ListwiseScorer(model, proc)
    images = _images(6, seed=20)
    maps = [torch.rand(N_VISUAL, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    teacher = [0.3, -1.0, 2.0, 0.1, -0.5, 1.2]
    params = trainable_parameters(model, 4)
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses, aux = [], []
    for _ in range(10):
        out = scorer.window(cfg, "thread lock", images, maps, tap_layer=1)
        loss, parts = L.window_loss(out.logits, 2, teacher)
        a, aparts = scorer.aux_loss(out, cfg.mode, 2, teacher)
        opt.zero_grad()
        (loss + a).backward()
        opt.step()
        losses.append(float(loss.detach()))
        aux.append(float(a.detach()))
        assert parts["ranknet"] >= 0 and parts["soft"] >= 0
        assert ("aux_binding" in aparts) == (cfg.mode == "single_pass") != ("aux_soft" in aparts)
    assert min(losses[-4:]) < losses[0] - 0.1, losses
    assert min(aux[-4:]) < aux[0] - 0.1, aux


def test_anchors_are_page_local(toy):
    """The auxiliary losses read page-local rows: in the cached layout the last token of page i's label segment,
    which sees only page i; in the single pass page i's visual rows, which see pages up to i (causal)."""
    model, proc = _load(toy / "teacher")
    template = L.dataclasses.replace(L.DEFAULT_LISTWISE_TEMPLATE, cached_label=L.TRAINED_CACHED_LABEL)
    scorer = L.ListwiseScorer(model, proc, template)
    images, other = _images(4, seed=30), _images(1, seed=90)[0]
    for cfg in (CONFIGS[0].resolve(4), ListwiseConfig(mode="cached", exit_layer=4, band=(0, 4)).resolve(4)):
        with torch.no_grad():
            base = scorer.window(cfg, "socket buffer", images, tap_layer=2)
            changed = scorer.window(cfg, "socket buffer", images[:2] + [other] + images[3:], tap_layer=2)
        assert torch.equal(base.owners, changed.owners)
        assert base.anchors.shape == (len(base.owners), model.config.text_config.hidden_size)
        moved = torch.stack([(changed.anchors - base.anchors)[base.owners == i].abs().max() for i in range(4)])
        assert moved[2] > 1e-4  # its own page changed
        unaffected = [0, 1, 3] if cfg.mode == "cached" else [0, 1]
        assert moved[unaffected].max() < 1e-5, (cfg.mode, moved)
        if cfg.mode == "single_pass":
            assert base.owners.tolist() == sorted(base.owners.tolist()) and len(base.owners) == 4 * round(0.5 * N_VISUAL)
            assert moved[3] > 1e-4  # a later page's rows see the changed page
        else:
            assert base.owners.tolist() == [0, 1, 2, 3]


def test_windows_are_shuffled_deterministic_and_mix_hard_and_random_pages():
    train_q = [{"qid": f"q{i}", "positive": f"pos{i}", "query": "x"} for i in range(50)]
    mined = {f"q{i}": [f"hard{i}-{j}" for j in range(20)] for i in range(50)}
    all_pages = [f"page{j}" for j in range(300)]
    plans = [L.plan_step(s, 0, train_q, mined, all_pages, 8, 5, 0.25, 2) for s in range(400)]
    assert plans[:5] == [L.plan_step(s, 0, train_q, mined, all_pages, 8, 5, 0.25, 2) for s in range(5)]
    slots = Counter()
    for p in plans:
        q = int(p.qid[1:])
        assert 5 <= len(p.pages) <= 8 and len(set(p.pages)) == len(p.pages) and f"pos{q}" in p.pages
        assert all(sorted(o) == list(range(len(p.pages))) for o in p.orders)
        for o in p.orders:
            slots[[p.pages[i] for i in o].index(f"pos{q}")] += 1
    # The positive lands in every slot, none much more than uniform (8 slots at most, 800 placements).
    assert set(slots) == set(range(8)) and max(slots.values()) < 800 / 5 * 1.5
    assert sum(p.orders[0] != p.orders[1] for p in plans) > 300  # the two layouts see their own orders
    hard = sum(x.startswith("hard") for p in plans for x in p.pages)
    rand = sum(x.startswith("page") for p in plans for x in p.pages)
    negatives = sum(len(p.pages) - 1 for p in plans)
    assert 0.65 < hard / negatives < 0.85 and rand == negatives - hard
    first = [p for p in plans if any(x == f"hard{p.qid[1:]}-0" for x in p.pages)]
    assert len(first) > 0.6 * len(plans)  # the first stage's top negatives come first


def test_curriculum_moves_from_short_easy_windows_to_full_ones():
    c = L.Curriculum((12, 20), (2, 4), (0.8, 0.25), 0.5)
    assert c.at(0, 600) == (2, 4, 0.8) and c.at(300, 600) == (12, 20, 0.25) == c.at(599, 600)
    lo, hi, frac = c.at(150, 600)
    assert (lo, hi) == (7, 12) and frac == pytest.approx(0.525)
    assert L.Curriculum((12, 20)).at(0, 600) == (12, 20, 0.25)


def _stage_args(toy, out, steps):
    return ["--data", str(toy / "data"), "--init", str(toy / "teacher"), "--teacher", str(toy / "teacher"),
            "--embedder", str(toy / "embedder"), "--out", str(out), "--steps", str(steps), "--window", "5",
            "--min-window", "3", "--cached-exit-layer", "3", "--cached-band", "1", "3", "--cached-keep-ratio", "0.5",
            "--eval-queries", "3", "--eval-candidates", "5", "--log-every", "1", "--ckpt-every", "1", "--warmup", "1",
            "--lr", "1e-3", "--aux-weight", "1.0", "0.5", "--window-start", "2", "3", "--random-frac", "0.8", "0.25",
            "--threads", "2", "--quiet"]


def test_stage_trains_resumes_and_exports(toy, tmp_path, monkeypatch):
    from minirerank_core.train.export import export_listwise

    out = tmp_path / "listwise"
    L.main(_stage_args(toy, out, 2))
    events = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    first_pairs = next(e for e in events if e.get("event") == "teacher")["pairs_computed"]
    assert first_pairs > 0
    scores_doc = json.loads((out / "teacher_scores.json").read_text())
    assert scores_doc["format"] == "minirerank-listwise-teacher-scores/1"
    # Resume to step 4: training continues at step 2 and only the new windows' pairs are scored.
    L.main(_stage_args(toy, out, 4))
    events = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "start"] == [0, 2]
    teacher_events = [e for e in events if e.get("event") == "teacher"]
    ds = DataSet(toy / "data")
    mined = json.loads((out / "mined_negatives.json").read_text())
    cur = L.Curriculum((3, 5), (2, 3), (0.8, 0.25), 0.5)

    def pairs(steps):  # the windows a run of `steps` draws (the curriculum stretches over the run's length)
        plans = [L.plan_step(s, 0, ds.split_queries("train"), mined, ds.page_ids("train"), cur.at(s, steps)[1],
                             cur.at(s, steps)[0], cur.at(s, steps)[2], 2) for s in range(steps)]
        return {(p.qid, x) for p in plans for x in p.pages}

    old, need = pairs(2), pairs(4)
    assert teacher_events[0]["pairs_computed"] == len(old)
    assert teacher_events[1]["pairs_computed"] == len(need - old) and teacher_events[1]["pairs_cached"] == len(need | old)
    losses = [e["single_pass_loss"] for e in events if "single_pass_loss" in e]
    assert len(losses) == 4 and all(x == x for x in losses)
    assert all(e["single_pass_aux_binding"] > 0 and "cached_aux_soft" in e for e in events if "single_pass_loss" in e)
    sizes = [e["window"] for e in events if "single_pass_loss" in e]
    assert sizes[0] <= 3 and max(sizes) <= 5  # the curriculum starts with short windows
    assert json.loads((out / "result.json").read_text())["step"] == 4

    # The final folder carries one config per layout; from_pretrained runs each as trained.
    final = out / "final"
    saved = read_listwise_settings(final)
    assert saved.mode == "single_pass" and set(saved.configs) == {"single_pass", "cached"}
    single = ListwiseReranker.from_pretrained(final, local_files_only=True)
    assert (single.config.mode, single.config.keep_ratio, single.config.prune_by) == ("single_pass", 0.5, "qiei")
    cached = ListwiseReranker.from_pretrained(final, mode="cached")
    assert (cached.config.exit_layer, cached.config.band, cached.config.keep_ratio) == (3, (1, 3), 0.5)
    images = [ds.image(p) for p in ds.page_ids("test")[:4]]
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(images)]
    model, proc = _load(final)
    with torch.no_grad():
        want = L.ListwiseScorer(model, proc, saved.template).single_pass("socket buffer", images, 0.5).logits
    assert single.score("socket buffer", pages) == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)

    # Export: float16 weights (about half the bytes), the same settings, scores within float16 rounding.
    dst = tmp_path / "assets" / "listwise"
    rep = export_listwise(final, dst, check_images=images, query="socket buffer")
    assert (dst / "model.safetensors").stat().st_size < 0.6 * (final / "model.safetensors").stat().st_size
    assert read_listwise_settings(dst) == saved
    assert rep["max_abs_diff"] < 2e-2 * max(1.0, rep["max_logit"])
    # With the export installed as the package default, from_pretrained() and MiniRerank(mode="listwise") load it.
    import minirerank_core.defaults as defaults

    monkeypatch.setattr(defaults, "DEFAULT_LISTWISE_DIR", dst)
    default = ListwiseReranker.from_pretrained()
    assert default.name == str(dst) and default.config == single.config
    assert default.score("socket buffer", pages) == pytest.approx(single.score("socket buffer", pages), abs=2e-2)
    assert ListwiseReranker.from_pretrained(mode="cached").config == cached.config
    from minirerank_core.glue.reranking import build_reranker

    assert build_reranker(mode="listwise").config == single.config


def test_label_after_page_template_is_what_the_reranker_runs(toy):
    """The trained template's label segments follow their pages (and may repeat the query); the reranker and the
    training scorer build the same prompt from it, and it is a different prompt from ZipRerank's order."""
    from minirerank_core.rerankers.listwise.prompt import ListwiseTemplate

    after = ListwiseTemplate(label="\nQuery: {query} [{label}", label_after_page=True)
    text = after.single_pass_text("socket buffer", ("A", "B"))
    assert text.index("<|vision_end|>") < text.index("Query: socket buffer [A") < text.rindex("<|vision_start|>")
    model, proc = _load(toy / "teacher")
    model.eval()
    images = _images(4, seed=40)
    cfg = ListwiseConfig(dtype="float32", device="cpu")
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(images)]
    want = ListwiseReranker(model, proc, cfg, template=after).score("socket buffer", pages)
    with torch.no_grad():
        got = L.ListwiseScorer(model, proc, after).single_pass("socket buffer", images).logits
        before = L.ListwiseScorer(model, proc).single_pass("socket buffer", images).logits
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert (got - before).abs().max() > 1e-4


def test_frozen_page_side_prefills_each_page_once_with_the_same_kv(toy, monkeypatch):
    """With the page-side layers frozen, the cached layout reads each page's KV from one no-grad prefill, and the
    logits are those of a fresh prefill (and of the reranker)."""
    model, proc = _load(toy / "teacher")
    model.eval()
    calls = []
    real = L.prefill_pages
    monkeypatch.setattr(L, "prefill_pages", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    images = _images(4, seed=50)
    ids = [f"p{i}" for i in range(4)]
    cfg = ListwiseConfig(mode="cached", exit_layer=3, band=(1, 3), dtype="float32", device="cpu").resolve(4)
    scorer = L.ListwiseScorer(model, proc)
    with torch.no_grad():
        fresh = scorer.window(cfg, "thread lock", images, page_ids=ids).logits
    scorer.frozen_kv = {}
    memo = scorer.window(cfg, "thread lock", images, page_ids=ids).logits
    again = scorer.window(cfg, "socket buffer", images[::-1], page_ids=ids[::-1]).logits
    assert calls == [4, 4]  # the fresh prefill, then one prefill for the memo; the second window reuses it
    assert all(kv.k.grad_fn is None for kv in scorer.frozen_kv.values())
    assert memo.tolist() == pytest.approx(fresh.tolist(), rel=1e-5, abs=1e-5)
    want = ListwiseReranker(model, proc, cfg).score("socket buffer", [Page(im, id=i) for im, i in zip(images[::-1], ids[::-1])])
    assert again.detach().tolist() == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_copy_task_names_the_labels_present():
    import random

    labels = tuple("ABCDEFGHIJKLMNOPQRST")
    pages = [f"p{i}" for i in range(30)]
    draws = [L.copy_window("p7", pages, labels, random.Random(f"0:copy:{s}")) for s in range(200)]
    assert draws[3] == L.copy_window("p7", pages, labels, random.Random("0:copy:3"))  # deterministic
    assert {len(p) for p, _ in draws} == {1, 2, 3}
    assert all(len(set(p)) == len(p) == len(x) == len(set(x)) for p, x in draws)
    assert 0.3 < sum("p7" in p for p, _ in draws) / len(draws) < 0.7
    assert len({x[0] for _, x in draws}) == 20  # any label, not only the first ones
    # The loss is lowest (log n) when the logits split evenly over the labels present, and it trains the logits.
    present = [2, 11]
    even = torch.full((20,), -10.0)
    even[present] = 10.0
    logits = torch.zeros(20, requires_grad=True)
    assert float(L.copy_loss(even, present)) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)
    assert float(L.copy_loss(torch.zeros(20), present)) == pytest.approx(float(torch.log(torch.tensor(20.0))), abs=1e-6)
    L.copy_loss(logits, present).backward()
    assert logits.grad[present].lt(0).all() and logits.grad[[0, 5]].gt(0).all()


def test_stage_with_frozen_page_side_and_copy_task(toy, tmp_path):
    """--freeze-below keeps the page-side layers as the init has them (so the page cache is the init's),
    --distill-weight 0 runs no teacher, --copy-warmup trains the copy task alone first."""
    from safetensors.torch import load_file

    out = tmp_path / "frozen"
    args = _stage_args(toy, out, 3) + ["--layouts", "cached", "--freeze-below", "3", "--distill-weight", "0",
                                       "--copy-warmup", "1", "--copy-weight", "0.5", "--windows-per-step", "2",
                                       "--cached-label", "\nQuery: {query} [{label}", "--cached-exit-layer", "4"]
    L.main(args)
    events = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert not (out / "teacher_scores.json").exists() and not any(e.get("event") == "teacher" for e in events)
    steps = [e for e in events if "cached_copy" in e]
    assert len(steps) == 3 and "cached_loss" not in steps[0] and all("cached_loss" in e for e in steps[1:])
    init = load_file(str(toy / "teacher" / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))

    def q_proj(weights, layer):  # checkpoints name the LM layers with or without a "model." prefix
        (key,) = [k for k in weights if k.endswith(f"layers.{layer}.self_attn.q_proj.weight")]
        return weights[key]

    assert torch.equal(q_proj(init, 2), q_proj(final, 2))  # frozen (band (1, 3) ends at 3)
    assert not torch.equal(q_proj(init, 3), q_proj(final, 3))  # trained (exit 4: every layer runs)
    saved = read_listwise_settings(out / "final")
    assert saved.template.cached_label == "\nQuery: {query} [{label}"
    trained = json.loads((out / "final" / "minirerank_config.json").read_text())["training"]
    assert trained["freeze_below"] == 3 and trained["teacher"] is None


@pytest.mark.parametrize("readout", ["all", "labels"])
@pytest.mark.parametrize("split", [3, 4])
def test_frozen_split_gives_the_whole_windows_logits_and_anchors(toy, split, readout):
    """A cached window run up to a frozen split, then through the rest, is the whole window: same label logits and
    relevance anchors (a split at the exit runs no layer after it), and gradients reach the layers above it. With
    readout="labels" the read-out layer (3) is the trained one or, at split 4, a frozen one."""
    model, proc = _load(toy / "teacher")
    model.eval()
    images, ids = _images(4, seed=60), [f"p{i}" for i in range(4)]
    maps = [torch.rand(N_VISUAL, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    scorer = L.ListwiseScorer(model, proc)
    scorer.frozen_kv = {}
    if readout == "labels":
        plain = scorer.cached("thread lock", images, 4, (1, 3), 0.5, maps, page_ids=ids).logits
        scorer.readout = "labels"
    whole = scorer.cached("thread lock", images, 4, (1, 3), 0.5, maps, tap_layer=3, page_ids=ids)
    if readout == "labels":  # the check can fail: the read-out mask changes the logits
        assert (plain - whole.logits).abs().max() > 1e-4
        cfg = ListwiseConfig(mode="cached", exit_layer=4, band=(1, 3), keep_ratio=0.5, readout="labels").resolve(4)
        assert scorer.window(cfg, "thread lock", images, maps, page_ids=ids).logits.tolist() == pytest.approx(
            whole.logits.tolist(), rel=1e-5, abs=1e-5)
        with pytest.raises(ValueError, match="reads out"):
            scorer.window(cfg.replace(readout="all"), "thread lock", images, maps, page_ids=ids)
    frozen = scorer.cached_frozen("thread lock", images, 4, (1, 3), split, 0.5, maps, page_ids=ids)
    assert frozen.hidden.grad_fn is None
    got = scorer.cached_tail(frozen, tap_layer=3 if split == 3 else None)
    assert got.logits.tolist() == pytest.approx(whole.logits.tolist(), rel=1e-5, abs=1e-5)
    if split == 3:
        assert torch.allclose(got.anchors, whole.anchors, rtol=1e-5, atol=1e-5)
        got.logits.logsumexp(0).backward()
        layers = model.model.language_model.layers
        assert float(layers[3].self_attn.q_proj.weight.grad.abs().sum()) > 0
        # The check can fail: other labels give other logits from the same frozen pages.
        other = scorer.cached_tail(scorer.cached_frozen("thread lock", images, 4, (1, 3), split, 0.5, maps,
                                                        page_ids=ids, labels=list("QRST")))
        assert (other.logits[[16, 17, 18, 19]] - got.logits.detach()).abs().max() > 1e-4
    else:
        with pytest.raises(ValueError, match="outside the layers run here"):
            scorer.cached_tail(frozen, tap_layer=3)
    with pytest.raises(ValueError, match="frozen split"):
        scorer.cached_frozen("thread lock", images, 4, (1, 3), 2, page_ids=ids)  # inside the band


def test_pool_epochs_visit_every_window_once_in_a_new_order():
    steps = [L.pool_indices(s, 3, 12, 0) for s in range(8)]  # 24 windows: two epochs of 12
    flat = [i for s in steps for i in s]
    assert sorted(flat[:12]) == sorted(flat[12:]) == list(range(12)) and flat[:12] != flat[12:]
    assert steps == [L.pool_indices(s, 3, 12, 0) for s in range(8)] and flat != [i for s in range(8) for i in L.pool_indices(s, 3, 12, 1)]


def test_sharpen_attention_scales_the_attention_logits(toy):
    """Scaling the queries (q-norm weight here) is the same model as multiplying each layer's attention scaling."""
    from minirerank_core.engine.families import adapter_for
    from minirerank_core.train.models import sharpen_attention

    a, proc = _load(toy / "teacher")
    b, _ = _load(toy / "teacher")
    sharpen_attention(adapter_for(a), range(1, 4), 3.0)
    for layer in adapter_for(b).layers[1:4]:
        layer.self_attn.scaling *= 3.0
    c, _ = _load(toy / "teacher")
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        la, lb, lc = (m(input_ids=ids).logits for m in (a, b, c))
    assert torch.allclose(la, lb, rtol=1e-4, atol=1e-4)
    assert (la - lc).abs().max() > 1e-3


def test_stage_pools_windows_and_runs_their_frozen_layers_once(toy, tmp_path, monkeypatch):
    """--pool trains epochs over fixed windows: each window's layers below --freeze-below run once (the split's
    no-grad part is called once per distinct window), --attn-scale sharpens the trained layers from the start."""
    from safetensors.torch import load_file

    calls = Counter()
    real = L.ListwiseScorer.cached_frozen

    def counting(self, query, images, *a, **k):
        calls[(query, tuple(k["page_ids"]), tuple(k.get("labels") or ()))] += 1
        return real(self, query, images, *a, **k)

    monkeypatch.setattr(L.ListwiseScorer, "cached_frozen", counting)
    out = tmp_path / "pool"
    args = _stage_args(toy, out, 4) + ["--layouts", "cached", "--freeze-below", "3", "--distill-weight", "0",
                                       "--copy-weight", "0.5", "--windows-per-step", "2", "--pool", "3",
                                       "--attn-scale", "4", "--cached-exit-layer", "4"]
    L.main(args)
    assert calls and max(calls.values()) == 1 and len(calls) <= 6  # 3 ranking + 3 copy windows, 8 visits each kind
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert sum("cached_loss" in e and "cached_copy" in e for e in steps) == 4
    init = load_file(str(toy / "teacher" / "model.safetensors"))
    final = load_file(str(out / "final" / "model.safetensors"))

    def weight(weights, name):
        (key,) = [k for k in weights if k.endswith(name)]
        return weights[key]

    assert torch.equal(weight(init, "layers.2.self_attn.q_norm.weight"), weight(final, "layers.2.self_attn.q_norm.weight"))
    scaled = weight(final, "layers.3.self_attn.q_norm.weight") / weight(init, "layers.3.self_attn.q_norm.weight")
    assert float((scaled - 4).abs().max()) < 0.5  # scaled, then a few small steps
    with pytest.raises(SystemExit, match="--pool and --readback-init need"):
        L.main(_stage_args(toy, tmp_path / "bad", 2) + ["--pool", "3"])


def test_stage_readback_init_sets_the_last_layer_before_training(toy, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "readback"
    args = _stage_args(toy, out, 2) + ["--layouts", "cached", "--freeze-below", "3", "--distill-weight", "0",
                                       "--pool", "3", "--readback-init", "3", "--cached-exit-layer", "4", "--lr", "1e-6"]
    L.main(args)
    events = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    (fit,) = [e for e in events if e.get("event") == "readback_init"]
    assert fit["layer"] == 3 and fit["windows"] == 3 and fit["probe_labels"] > 0.3 > abs(fit["probe_others"])
    final = load_file(str(out / "final" / "model.safetensors"))
    (key,) = [k for k in final if k.endswith("layers.3.mlp.down_proj.weight")]
    assert float(final[key].abs().max()) < 1e-3  # switched off at the start; two tiny steps since
    # resumed, it is not fitted again (the checkpoint holds the fitted and trained layer)
    L.main(_stage_args(toy, out, 3) + args[len(_stage_args(toy, out, 2)):])
    events = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "readback_init" for e in events) == 1
    assert read_listwise_settings(out / "final").config("cached").readout == "all"


def test_stage_relevance_readback_with_label_readout_ships_its_readout(toy, tmp_path):
    """--readout labels --readback-relevance C --readback-single-pass N: the head is fitted with the relevance key on
    both layouts' windows, and the saved model runs with the read-out it was built for (from_pretrained reads it)."""
    out = tmp_path / "pointer"
    L.main(_stage_args(toy, out, 2) + ["--layouts", "cached", "--freeze-below", "3", "--distill-weight", "0",
                                       "--pool", "3", "--readback-init", "3", "--readback-relevance", "1.0",
                                       "--readout", "labels", "--readback-single-pass", "2", "--cached-exit-layer", "4",
                                       "--lr", "1e-6"])
    events = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    (fit,) = [e for e in events if e.get("event") == "readback_init"]
    assert fit["windows"] == 3 and fit["single_pass_windows"] == 2
    assert read_listwise_settings(out / "final").config("cached").readout == "labels"
    r = ListwiseReranker.from_pretrained(str(out / "final"), mode="cached")
    assert r.config.readout == "labels"


def test_single_pass_relevance_anchors_are_the_label_tokens(toy):
    """single_pass_aux="relevance": the anchors are each page's label token (in order, through QI-EI pruning), the
    states single_pass_frozen taps there, and the relevance loss trains the layers below them."""
    model, proc = _load(toy / "teacher")
    scorer = L.ListwiseScorer(model, proc, L.READBACK_TEMPLATE)
    scorer.single_pass_aux = "relevance"
    images = _images(3, seed=60)
    out = scorer.single_pass("socket buffer", images, keep_ratio=0.5, tap_layer=1)
    assert out.owners.tolist() == [0, 1, 2]
    with torch.no_grad():
        hidden, seq = scorer.single_pass_frozen("socket buffer", images, 2, keep_ratio=0.5)
    torch.testing.assert_close(out.anchors.detach(), hidden[0, seq.label_rows], rtol=1e-5, atol=1e-5)
    loss, parts = scorer.aux_loss(out, "single_pass", 1, [0.0, 1.0, 0.5])
    assert "aux_ranknet" in parts and "aux_binding" not in parts
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "language_model.layers.0." in n and p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0


def test_stage_fits_a_single_pass_head_alone(toy, tmp_path):
    """--layouts single_pass --readback-init N --readout labels --steps 0: the read-back head in the model's last
    layer, fitted on N single-pass windows drawn as training windows are; the saved model runs single pass with the
    read-out it was built for, without a layout warning."""
    import warnings

    from safetensors.torch import load_file

    from minirerank_core import UntrainedLayoutWarning

    out = tmp_path / "single_head"
    L.main(_stage_args(toy, out, 0) + ["--layouts", "single_pass", "--distill-weight", "0", "--readback-init", "3",
                                       "--readback-relevance", "1.0", "--readout", "labels", "--readback-uncentred",
                                       "--readback-copy-scale", "20"])
    events = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    (fit,) = [e for e in events if e.get("event") == "readback_init"]
    assert fit["layer"] == TINY.reranker.layers - 1 and fit["windows"] == 3
    # readout "labels": the probe is fitted on the rows that layer reads, so it is ~1 on every label row
    assert fit["probe_labels"] > 0.8, fit
    assert read_settings(out / "final").extra["training"]["readback_copy_scale"] == 20.0
    final = load_file(str(out / "final" / "model.safetensors"))
    (key,) = [k for k in final if k.endswith(f"layers.{fit['layer']}.mlp.down_proj.weight")]
    assert float(final[key].abs().max()) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedLayoutWarning)
        r = ListwiseReranker.from_pretrained(str(out / "final"), mode="single_pass")
    assert (r.config.mode, r.config.readout) == ("single_pass", "labels")
    assert read_settings(out / "final").extra["training"]["readback_uncentred"] is True
    with pytest.raises(SystemExit, match="--readout labels"):
        L.main(_stage_args(toy, tmp_path / "centre", 0) + ["--layouts", "single_pass", "--readback-init", "3",
                                                           "--readback-relevance", "1.0", "--readback-uncentred",
                                                           "--distill-weight", "0"])
    with pytest.raises(SystemExit, match="single-pass layout alone"):
        L.main(_stage_args(toy, tmp_path / "both", 0) + ["--layouts", "single_pass", "cached", "--readback-init", "3",
                                                         "--distill-weight", "0"])
