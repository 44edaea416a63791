"""Listwise reranking (ZipRerank single pass, sliding windows, cached listwise): correctness anchors.

- single pass == a plain HF forward of the same prompt (processor + model(**inputs).logits at the last token);
- QI-EI == an independent implementation of the selection rule (kept indices, positions, deepstack rows), and
  the pruned pass == HF's language model fed the pruned rows;
- windows == RankGPT's sliding procedure (rank_llm's loop, written out here) with a fake window scorer;
- cached listwise == its explicit-mask full-sequence reference, and its label binding holds;
- bad inputs raise the documented errors.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minirerank_core import ConfigError, DuplicatePageIdError, EmptyCandidatesError, InvalidQueryError, Page
from minirerank_core import testing as T
from minirerank_core.rerankers.listwise import ListwiseConfig, ListwiseReranker, sliding_rerank, window_schedule
from minirerank_core.rerankers.listwise.cached import CachedWindow, cached_answer, cached_states
from minirerank_core.rerankers.listwise.prompt import cached_query, single_pass_prompt
from minirerank_core.rerankers.listwise.reference import cached_listwise_reference
from minirerank_core.rerankers.listwise.single_pass import pruned_sequence

from tests.helpers import FAMILIES

QUERY = "what was the revenue growth in 2023"


def rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@pytest.fixture(scope="module")
def images():
    sizes = [(200, 150), (120, 260), (160, 160), (90, 140)]
    return [T.random_page_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]


def pages_of(imgs, prefix="p"):
    return [Page(im, id=f"{prefix}{i}") for i, im in enumerate(imgs)]


def hf_inputs(r: ListwiseReranker, proc, query, imgs):
    """What a transformers user builds: the processor on the prompt text, then the answer token appended."""
    inputs = proc(text=[r.template.single_pass_text(query, r.config.labels[: len(imgs)])], images=imgs, return_tensors="pt")
    extra = torch.tensor([[r.answer_id]])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    return inputs


# --- single pass -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_single_pass_equals_plain_hf_forward(tiny, images, family):
    model, proc = tiny(family)
    r = ListwiseReranker(model, proc)
    assert len({r.visual_grid(im) for im in images}) == len(images)  # every page a different grid
    scores = r.score(QUERY, pages_of(images))
    with torch.no_grad():
        logits = model(**hf_inputs(r, proc, QUERY, images)).logits[0]
    label_ids = r.head.ids[: len(images)]
    assert rel_err(scores, logits[-1, label_ids]) < 1e-4
    # The check can fail: the logits one position earlier (no "[") or of other labels are far off.
    assert rel_err(scores, logits[-2, label_ids]) > 1e-2
    assert rel_err(scores, logits[-1, r.head.ids[1 : len(images) + 1]]) > 1e-2
    results = r.rerank(QUERY, pages_of(images), top_n=2)
    assert [x.index for x in results] == sorted(range(len(images)), key=lambda i: -scores[i])[:2]


@pytest.mark.parametrize("after", [False, True], ids=["label-then-page", "page-then-label"])
def test_single_pass_prompt_locates_each_label_token_through_pruning(tiny, images, after):
    """label_rows (what the read-back fit reads in this layout) point at each page's own label token, in page
    order, before and after QI-EI drops visual rows, for either label placement."""
    from dataclasses import replace

    from minirerank_core.rerankers.listwise import DEFAULT_LISTWISE_TEMPLATE
    from minirerank_core.rerankers.listwise.single_pass import encode_pages, window_sequence

    model, proc = tiny("qwen3_vl")
    template = replace(DEFAULT_LISTWISE_TEMPLATE, label_after_page=after)
    r = ListwiseReranker(model, proc, template=template)
    feats, grid = encode_pages(r.adapter, proc.image_processor, images)
    want = torch.tensor(r.head.ids[: len(images)])
    for keep in (1.0, 0.5):
        seq = window_sequence(r.adapter, proc.tokenizer, template, r.config.labels, r.answer_id, QUERY, feats, grid, keep)
        assert torch.equal(seq.ids[seq.label_rows], want), keep
        assert not seq.visual[seq.label_rows].any()
        assert seq.label_rows.tolist() == sorted(seq.label_rows.tolist()) and len(set(seq.label_rows.tolist())) == len(images)
    visual_before = [int(seq.visual[: i].sum()) for i in seq.label_rows.tolist()]  # page i's label: before / after it
    assert visual_before == sorted(visual_before) and (visual_before[0] > 0) == after


@pytest.mark.parametrize("family", FAMILIES)
def test_single_pass_label_readout_equals_explicit_mask_reference(tiny, images, family):
    """readout="labels" in the single pass: the last layer runs on the label rows and "[" alone; the reference runs
    the whole sequence with an explicit mask in which "[" sees only the label tokens in the last layer."""
    from minirerank_core.engine.kv import PastKV, additive_mask, causal, run_layers
    from minirerank_core.rerankers.listwise.single_pass import encode_pages, window_sequence

    model, proc = tiny(family)
    r = ListwiseReranker(model, proc, ListwiseConfig(readout="labels", keep_ratio=0.6, prune_by="qiei"))
    scores = r.score(QUERY, pages_of(images))
    a = r.adapter
    feats, grid = encode_pages(a, proc.image_processor, images)
    seq = window_sequence(a, proc.tokenizer, r.template, r.config.labels, r.answer_id, QUERY, feats, grid, 0.6)
    S, last = len(seq.embeds), a.num_layers - 1
    allowed = causal(S, S)
    read = allowed.clone()
    read[-1] = False
    read[-1, seq.label_rows] = True
    deepstack = (seq.visual[None], list(seq.deepstack)) if seq.deepstack else None
    with torch.no_grad():
        hidden = seq.embeds[None]
        cos_sin = a.rotary(hidden, seq.positions[:, None])
        hidden = run_layers(a, hidden, cos_sin, additive_mask(allowed[None], hidden.dtype), range(last), PastKV(), deepstack)
        hidden = run_layers(a, hidden, cos_sin, additive_mask(read[None], hidden.dtype), range(last, last + 1), PastKV())
        ref = r.head(a.norm(hidden[:, -1]))[0, : len(images)]
    assert rel_err(scores, ref) < 1e-4
    plain = ListwiseReranker(model, proc, ListwiseConfig(keep_ratio=0.6, prune_by="qiei")).score(QUERY, pages_of(images))
    assert rel_err(scores, plain) > 1e-2  # the read-out mask matters: the check can fail


@pytest.mark.parametrize("mode", ["single_pass", "single_pass-labels", "cached", "cached-labels"])
def test_windows_of_different_queries_batch_like_single_runs(tiny, images, mode):
    model, proc = tiny("qwen3_vl")
    readout = {"cached-labels": dict(readout="labels", exit_layer=5, band=(1, 4)),
               "single_pass-labels": dict(readout="labels")}.get(mode, {})
    r = ListwiseReranker(model, proc, ListwiseConfig(mode=mode.split("-")[0], keep_ratio=0.6, window_batch=2, **readout))
    rng = torch.Generator().manual_seed(0)
    imps = [[torch.rand(h * w, generator=rng) for h, w in map(r.visual_grid, imgs)] for imgs in (images, images[:2])]
    lists = [pages_of(images), pages_of(images[:2], "q")]
    queries = [QUERY, "figure of the results table"]
    forwards = []
    real = r._window_logits
    r._window_logits = lambda lists_, windows: forwards.append(len(windows)) or real(lists_, windows)
    batched = r.rerank_batch(queries, lists, importance=imps)  # different lengths: padding in one forward
    assert forwards == [2]
    del r._window_logits
    for q, pages, imp, got in zip(queries, lists, imps, batched):
        alone = r.score(q, pages, importance=imp)
        assert rel_err([x.score for x in sorted(got, key=lambda x: x.index)], alone) < 1e-4


# --- QI-EI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_qiei_matches_independent_selection_rule(tiny, images, family):
    model, proc = tiny(family)
    keep_ratio = 0.4
    r = ListwiseReranker(model, proc, ListwiseConfig(keep_ratio=keep_ratio))
    imgs = images[:2]
    inputs = hf_inputs(r, proc, QUERY, imgs)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        vis = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        # The query's tokens, found as a run of ids; their LM input embeddings.
        q_ids = proc.tokenizer(" " + QUERY, add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(ids)) if ids[i : i + len(q_ids)].tolist() == q_ids)
        q_emb = model.get_input_embeddings()(ids[start : start + len(q_ids)])
        expected_keep = []
        for v in vis.pooler_output:
            sim = F.cosine_similarity(v[:, None, :], q_emb[None, :, :], dim=-1).amax(dim=1)
            k = max(1, int(round(keep_ratio * len(v))))
            expected_keep.append(torch.topk(sim, k).indices.sort().values)
        mm = (ids == model.config.image_token_id).int()[None]
        full_pos = model.model.get_rope_index(ids[None], mm, image_grid_thw=inputs["image_grid_thw"])[0][:, 0]

        prompt = single_pass_prompt(proc.tokenizer, r.template, QUERY, r.config.labels[:2], inputs["image_grid_thw"],
                                    r.adapter.merge_size, r.answer_id, r.adapter.image_token_id)
        assert torch.equal(prompt.ids, ids)
        assert torch.nonzero(prompt.query_mask).squeeze(1).tolist() == list(range(start, start + len(q_ids)))
        seq = pruned_sequence(r.adapter, prompt, r.adapter.encode_image(inputs["pixel_values"], inputs["image_grid_thw"]), keep_ratio)
    for got, want in zip(seq.keep, expected_keep):
        assert got.tolist() == want.tolist()
    # Kept rows keep their original positions: all text rows + the kept visual rows of each page.
    img_rows = torch.nonzero(ids == model.config.image_token_id).squeeze(1)
    n = [len(v) for v in vis.pooler_output]
    kept_img_rows = torch.cat([img_rows[sum(n[:i]) + k] for i, k in enumerate(expected_keep)])
    rows = torch.ones(len(ids), dtype=torch.bool)
    rows[img_rows] = False
    rows[kept_img_rows] = True
    assert torch.equal(seq.positions, full_pos[:, rows])
    kept_global = torch.cat([sum(n[:i]) + k for i, k in enumerate(expected_keep)])
    # HF gives deepstack features per level as one tensor per image.
    ds = [torch.cat(list(level)) for level in vis.deepstack_features] if family == "qwen3_vl" else []
    assert len(seq.deepstack) == len(ds) == (2 if family == "qwen3_vl" else 0)
    for got, full in zip(seq.deepstack, ds):
        assert torch.equal(got, full[kept_global])

    # The pruned pass equals HF's language model fed the same rows (ZipRerank's way of running it).
    embeds = model.get_input_embeddings()(ids)
    embeds[img_rows] = torch.cat(list(vis.pooler_output))
    kw = dict(visual_pos_masks=(ids == model.config.image_token_id)[rows][None], deepstack_visual_embeds=[d[kept_global] for d in ds]) if ds else {}
    with torch.no_grad():
        h = model.model.language_model(inputs_embeds=embeds[rows][None], position_ids=full_pos[:, rows][:, None], **kw).last_hidden_state
        want = model.lm_head(h[0, -1])[r.head.ids[:2]]
    pruned = r.score(QUERY, pages_of(imgs))
    assert rel_err(pruned, want) < 1e-4
    # The check can fail: pruning changes the scores, and another rule (min over query tokens) keeps other tokens.
    full = ListwiseReranker(model, proc).score(QUERY, pages_of(imgs))
    assert rel_err(pruned, full) > 1e-3
    sim_min = F.cosine_similarity(vis.pooler_output[0][:, None, :], q_emb[None], dim=-1).amin(dim=1)
    assert torch.topk(sim_min, len(expected_keep[0])).indices.sort().values.tolist() != seq.keep[0].tolist()


def test_importance_maps_replace_qiei_when_given(tiny, images):
    model, proc = tiny("qwen2_vl")
    r = ListwiseReranker(model, proc, ListwiseConfig(keep_ratio=0.3))
    imgs = images[:2]
    grids = [r.visual_grid(im) for im in imgs]
    imps = [torch.arange(h * w, dtype=torch.float32).flip(0) for h, w in grids]  # the first tokens are the most important
    inputs = proc.image_processor(images=imgs, return_tensors="pt")
    prompt = single_pass_prompt(proc.tokenizer, r.template, QUERY, r.config.labels[:2], inputs["image_grid_thw"],
                                r.adapter.merge_size, r.answer_id, r.adapter.image_token_id)
    feats = r.adapter.encode_image(inputs["pixel_values"], inputs["image_grid_thw"])
    with torch.no_grad():
        seq = pruned_sequence(r.adapter, prompt, feats, 0.3, imps)
        qiei = pruned_sequence(r.adapter, prompt, feats, 0.3)
    assert [k.tolist() for k in seq.keep] == [list(range(round(0.3 * h * w))) for h, w in grids]
    assert [k.tolist() for k in seq.keep] != [k.tolist() for k in qiei.keep]
    assert rel_err(r.score(QUERY, pages_of(imgs), importance=imps), r.score(QUERY, pages_of(imgs))) > 1e-4


# --- sliding windows --------------------------------------------------------------------------------------------
def rank_llm_sliding(n, window, step, score):
    """RankGPT's procedure as rank_llm writes it: windows back to front, each reordered by its scores."""
    order = list(range(n))
    end_pos, start_pos = n, n - window
    while end_pos > 0 and start_pos + step != 0:
        start_pos = max(start_pos, 0)
        cut = order[start_pos:end_pos]
        s = score(cut)
        order[start_pos:end_pos] = [cut[j] for j in sorted(range(len(cut)), key=lambda j: -s[j])]
        end_pos, start_pos = end_pos - step, start_pos - step
    return order


def fake_logits(items):
    """Deterministic, depends on the page AND on the window (its slot), so merge mistakes show."""
    return [math.sin(3.7 * c) + 0.3 * math.cos(1.3 * c * (slot + 1)) for slot, c in enumerate(items)]


def test_window_schedule_is_rankgpts():
    assert window_schedule(45, 20, 10) == [(25, 45), (15, 35), (5, 25), (0, 15)]
    assert window_schedule(100, 20, 10) == [(e - 20, e) for e in range(100, 10, -10)]
    assert window_schedule(20, 20, 10) == [(0, 20)]
    assert window_schedule(7, 20, 10) == [(0, 7)]


@pytest.mark.parametrize("n,window,stride", [(45, 20, 10), (100, 20, 10), (21, 20, 10), (30, 20, 10), (45, 8, 3), (20, 20, 10)])
def test_sliding_windows_equal_rankgpt_procedure(n, window, stride):
    calls = []

    def scorer(windows):
        calls.append(len(windows))
        return [torch.tensor(fake_logits(w.items)) for w in windows]

    (ranking,) = sliding_rerank([n], scorer, window, stride)
    assert ranking.order == rank_llm_sliding(n, window, stride, fake_logits)
    assert sorted(ranking.order) == list(range(n))
    assert len(calls) == len(window_schedule(n, window, stride))
    # Scores are monotone with the final order, strictly across windows' runs: sorting by score gives it back.
    s = [ranking.scores[c] for c in ranking.order]
    assert all(a >= b for a, b in zip(s, s[1:]))
    assert sorted(range(n), key=lambda c: -ranking.scores[c]) == ranking.order
    if n <= window:  # one window: the scores are the raw logits
        assert ranking.scores == pytest.approx(fake_logits(list(range(n))))


def test_sliding_windows_can_fail_front_to_back_differs():
    n, w, s = 45, 20, 10
    order = list(range(n))
    for start in range(0, n - w + s, s):  # the wrong direction
        cut = order[start : start + w]
        sc = fake_logits(cut)
        order[start : start + w] = [cut[j] for j in sorted(range(len(cut)), key=lambda j: -sc[j])]
    assert order != rank_llm_sliding(n, w, s, fake_logits)


def test_sliding_windows_batch_lists_in_lockstep():
    sizes = [45, 12, 30]
    batches = []

    def scorer(windows):
        batches.append([w.list_index for w in windows])
        return [torch.tensor(fake_logits(w.items)) for w in windows]

    rankings = sliding_rerank(sizes, scorer, 20, 10)
    for n, r in zip(sizes, rankings):
        assert r.order == rank_llm_sliding(n, 20, 10, fake_logits)
    assert batches == [[0, 1, 2], [0, 2], [0], [0]]


def test_reranker_merges_45_candidates_through_the_window_seam(tiny, monkeypatch):
    model, proc = tiny("qwen2_vl")
    r = ListwiseReranker(model, proc, ListwiseConfig(window_batch=3))
    imgs = [T.random_page_image(40, 40, seed=i) for i in range(45)]
    pages = pages_of(imgs)
    seen = []

    def fake(lists, windows):
        seen.append([len(w.items) for w in windows])
        return [torch.tensor(fake_logits(w.items) + [0.0] * (20 - len(w.items))) for w in windows]

    monkeypatch.setattr(r, "_window_logits", fake)
    results = r.rerank(QUERY, pages)
    assert [x.index for x in results] == rank_llm_sliding(45, 20, 10, fake_logits)
    assert [x.rank for x in results] == list(range(1, 46)) and [x.page_id for x in results[:3]] == [f"p{x.index}" for x in results[:3]]
    assert all(a.score >= b.score for a, b in zip(results, results[1:]))
    assert seen == [[20], [20], [20], [15]]


def test_reranker_runs_sliding_windows_for_real(tiny):
    """Real model: the final order is RankGPT's procedure over the logits the windows produced, and a window's
    logits are those of a single pass over its pages in that order (labels bound to the right pages)."""
    model, proc = tiny("qwen2_vl")
    cfg = ListwiseConfig(keep_ratio=0.5, window=10, stride=5)
    r = ListwiseReranker(model, proc, cfg)
    pages = pages_of([T.random_page_image(40 + i % 5 * 8, 48, seed=i) for i in range(25)])
    seen = {}
    real = r._window_logits

    def spy(lists, windows):
        out = real(lists, windows)
        seen.update({w.items: row[: len(w.items)].tolist() for w, row in zip(windows, out)})
        return out

    r._window_logits = spy
    results = r.rerank(QUERY, pages)  # windows [15, 25), [10, 20), [5, 15), [0, 10)
    assert len(seen) == 4
    assert [x.index for x in results] == rank_llm_sliding(25, 10, 5, lambda items: seen[tuple(items)])
    assert all(a.score >= b.score for a, b in zip(results, results[1:]))
    last = list(seen)[-1]  # the window that settled the top
    alone = ListwiseReranker(model, proc, cfg).score(QUERY, [pages[i] for i in last])
    assert rel_err(alone, seen[last]) < 1e-4
    assert rel_err(alone[::-1], seen[last]) > 1e-3  # can fail: the order of the pages matters


# --- cached listwise ------------------------------------------------------------------------------------------------
CACHED = [
    dict(),
    dict(exit_layer=5, band=(1, 4)),
    dict(exit_layer=4, band=(0, 3), keep_ratio=0.5),
    dict(exit_layer=5, band=(1, 4), readout="labels"),
    dict(exit_layer=4, band=(0, 3), keep_ratio=0.5, readout="labels"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", CACHED, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "full")
def test_cached_listwise_equals_explicit_mask_reference(tiny, images, family, settings):
    model, proc = tiny(family)
    r = ListwiseReranker(model, proc, ListwiseConfig(mode="cached", **settings))
    cfg = r.config
    g = torch.Generator().manual_seed(3)
    imps = [torch.rand(h * w, generator=g) for h, w in map(r.visual_grid, images)]
    fast = r.score(QUERY, pages_of(images), importance=imps if cfg.keep_ratio < 1 else None)

    q = cached_query(proc.tokenizer, r.template, QUERY, cfg.labels[: len(images)], r.answer_id)
    prefix_ids = proc.tokenizer(r.template.prefix, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    # The selection rule, written independently: top keep_ratio fraction of each page's importance.
    keep = [torch.topk(i, max(1, round(cfg.keep_ratio * len(i)))).indices for i in imps] if cfg.keep_ratio < 1 else None
    kw = dict(exit_layer=cfg.exit_layer, band=cfg.band, readout=cfg.readout)
    ref = cached_listwise_reference(r.adapter, proc.image_processor, prefix_ids, q, images, r.head, query_keep=keep, **kw)
    assert rel_err(fast, ref[: len(images)]) < 1e-4
    if cfg.readout == "labels":  # the read-out layer's mask matters
        other = cached_listwise_reference(r.adapter, proc.image_processor, prefix_ids, q, images, r.head,
                                          query_keep=keep, **{**kw, "readout": "all"})
        assert rel_err(fast, other[: len(images)]) > 1e-3
    # The check can fail: the binding matters (same pages, other order), and so does pruning.
    swapped = cached_listwise_reference(r.adapter, proc.image_processor, prefix_ids, q, images[::-1], r.head,
                                        query_keep=None if keep is None else keep[::-1], **kw)
    assert rel_err(fast, swapped[: len(images)].flip(0)) > 1e-3
    if keep is not None:
        unpruned = cached_listwise_reference(r.adapter, proc.image_processor, prefix_ids, q, images, r.head, **kw)
        assert rel_err(unpruned[: len(images)], ref[: len(images)]) > 1e-3


def test_cached_label_binding_sees_only_its_own_page(tiny, images):
    """Replace page 1 by another of the same size (so Q's positions stay): the states of the intro and of labels 0
    and 2 stay the same, those of label 1 and of the tail change."""
    model, proc = tiny("qwen3_vl")
    r = ListwiseReranker(model, proc, ListwiseConfig(mode="cached", exit_layer=5, band=(1, 4)))
    q = cached_query(proc.tokenizer, r.template, QUERY, r.config.labels[:3], r.answer_id)
    out = []
    for imgs in (images[:3], [images[0], T.random_page_image(120, 260, seed=99), images[2]]):
        kvs = r.index(pages_of(imgs))
        with torch.no_grad():
            out.append(cached_states(r.adapter, r.pages.prefix_kv(r.config.exit_layer),
                                     [CachedWindow(q, kvs, [torch.arange(kv.k.shape[2]) for kv in kvs])],
                                     range(5), (1, 4))[0])
    diff = (out[0] - out[1]).abs().amax(-1)
    seg = q.seg
    assert float(diff[(seg == -1) | (seg == 0)].max()) < 1e-6
    assert float(diff[seg == 1].min()) > 1e-4 and float(diff[seg == 3].min()) > 1e-4
    assert float(diff[seg == 2].max()) < 1e-6  # label 2 does not see page 1 either


def test_cached_answer_equals_the_whole_query_states(tiny, images):
    """The inference path (the layer before the read-out returns the label rows and "[" alone, the read-out layer
    runs on them alone) gives the answer state of the full block-by-block run, for a batch of windows with
    different numbers of pages and query lengths."""
    model, proc = tiny("qwen3_vl")
    r = ListwiseReranker(model, proc, ListwiseConfig(mode="cached", exit_layer=5, band=(1, 4), readout="labels"))
    kvs = r.index(pages_of(images))
    windows = [CachedWindow(cached_query(proc.tokenizer, r.template, q, r.config.labels[:n], r.answer_id), kvs[:n],
                            [torch.arange(kv.k.shape[2])[::2] for kv in kvs[:n]])
               for q, n in ((QUERY, len(images)), ("figure of the results table", 2))]
    prefix = r.pages.prefix_kv(5)
    with torch.no_grad():
        whole = cached_states(r.adapter, prefix, windows, range(5), (1, 4), readout_at=4)[:, -1]
        fast = cached_answer(r.adapter, prefix, windows, range(5), (1, 4), readout_at=4)
        plain = cached_answer(r.adapter, prefix, windows, range(5), (1, 4))  # no read-out layer
    assert torch.allclose(fast, whole, rtol=1e-4, atol=1e-5)
    assert (plain - whole).abs().max() > 1e-3  # the check can fail: the read-out mask matters
    # A read-out layer inside the band is refused by both paths (the fast one too: the read-out layer last).
    for run in (cached_states, cached_answer):
        with pytest.raises(ValueError, match="inside the band"):
            run(r.adapter, prefix, windows, range(4), (1, 4), readout_at=3)


def test_cached_label_with_the_query_equals_its_reference(tiny, images):
    """A template whose cached label segments repeat the query (the trained listwise model's): the fast path still
    equals the explicit-mask reference, and each L_i holds its label and the query's tokens."""
    from dataclasses import replace

    from minirerank_core.rerankers.listwise import DEFAULT_LISTWISE_TEMPLATE

    model, proc = tiny("qwen3_vl")
    template = replace(DEFAULT_LISTWISE_TEMPLATE, cached_label="\n[{label}] Query: {query}\nDoes the page answer?")
    r = ListwiseReranker(model, proc, ListwiseConfig(mode="cached", exit_layer=5, band=(1, 4)), template=template)
    fast = r.score(QUERY, pages_of(images))
    q = cached_query(proc.tokenizer, template, QUERY, r.config.labels[: len(images)], r.answer_id)
    q_ids = proc.tokenizer(" " + QUERY, add_special_tokens=False)["input_ids"]
    for i in range(len(images)):
        seg = q.ids[q.seg == i].tolist()
        assert r.head.ids[i] in seg and any(seg[j : j + len(q_ids)] == q_ids for j in range(len(seg)))
    prefix_ids = proc.tokenizer(template.prefix, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ref = cached_listwise_reference(r.adapter, proc.image_processor, prefix_ids, q, images, r.head, exit_layer=5, band=(1, 4))
    assert rel_err(fast, ref[: len(images)]) < 1e-4
    plain = ListwiseReranker(model, proc, r.config).score(QUERY, pages_of(images))
    assert rel_err(fast, plain) > 1e-3  # the check can fail: the label segments changed


def test_cached_pages_come_from_the_shared_page_cache(tiny, images, tmp_path):
    model, proc = tiny("qwen2_vl")
    cfg = ListwiseConfig(mode="cached", exit_layer=4, band=(1, 3))
    r = ListwiseReranker(model, proc, cfg, cache_dir=tmp_path)
    first = r.score(QUERY, pages_of(images))
    assert len(list(tmp_path.rglob("*.safetensors"))) == len(images)
    again = ListwiseReranker(model, proc, cfg, cache_dir=tmp_path)  # a new process would read the disk cache
    calls = []
    again.pages.store.put = lambda *a, **k: calls.append(a)  # nothing is recomputed
    assert again.score(QUERY, pages_of(images)) == pytest.approx(first, rel=1e-6, abs=1e-6)
    assert calls == []


# --- bad inputs ---------------------------------------------------------------------------------------------------
def test_bad_inputs(tiny, images):
    model, proc = tiny("qwen2_vl")
    with pytest.raises(ConfigError, match="more candidates in one prompt than there are labels"):
        ListwiseReranker(model, proc, ListwiseConfig(window=21))
    with pytest.raises(ConfigError, match="labels"):
        ListwiseReranker(model, proc, ListwiseConfig(labels=("A", "B", "revenue growth"), window=3, stride=1))
    with pytest.raises(ConfigError, match="stride"):
        ListwiseReranker(model, proc, ListwiseConfig(window=10, stride=10))
    with pytest.raises(ConfigError, match="cached"):
        ListwiseReranker(model, proc, ListwiseConfig(exit_layer=3))
    with pytest.raises(ConfigError, match="band"):
        ListwiseReranker(model, proc, ListwiseConfig(mode="cached", band=(2, 9)))
    with pytest.raises(ConfigError, match="read-out layer"):  # exit 4: layer 3 would be a band layer
        ListwiseReranker(model, proc, ListwiseConfig(mode="cached", exit_layer=4, band=(1, 4), readout="labels"))
    with pytest.raises(ConfigError, match="readout must be"):
        ListwiseReranker(model, proc, ListwiseConfig(mode="cached", readout="pointer"))
    r = ListwiseReranker(model, proc)
    with pytest.raises(EmptyCandidatesError):
        r.rerank(QUERY, [])
    with pytest.raises(InvalidQueryError):
        r.rerank("  ", pages_of(images))
    with pytest.raises(DuplicatePageIdError):
        r.rerank(QUERY, [Page(images[0], id="x"), Page(images[1], id="x")])
    with pytest.raises(ConfigError, match="top_n"):
        r.rerank(QUERY, pages_of(images), top_n=0)
    with pytest.raises(ConfigError, match="importance"):
        ListwiseReranker(model, proc, ListwiseConfig(mode="cached", keep_ratio=0.5)).rerank(QUERY, pages_of(images))
    assert r.index(pages_of(images)) is None  # single pass keeps no page cache: nothing to prepare
    # One candidate is a window of one: its score is the logit of label "A".
    (only,) = r.rerank(QUERY, [Page(images[0], id="solo")])
    with torch.no_grad():
        logits = model(**hf_inputs(r, proc, QUERY, images[:1])).logits[0, -1]
    assert (only.page_id, only.rank) == ("solo", 1)
    assert only.score == pytest.approx(float(logits[r.head.ids[0]]), rel=1e-4, abs=1e-5)


def test_from_pretrained_loads_a_saved_checkpoint(tiny, images, tmp_path):
    model, proc = tiny("qwen2_vl")
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    cfg = ListwiseConfig(mode="cached", exit_layer=4, band=(1, 3))
    loaded = ListwiseReranker.from_pretrained(tmp_path, cfg)
    assert loaded.config == ListwiseReranker(model, proc, cfg).config
    want = ListwiseReranker(model, proc, cfg).score(QUERY, pages_of(images[:2]))
    assert loaded.score(QUERY, pages_of(images[:2])) == pytest.approx(want, rel=1e-5, abs=1e-6)
