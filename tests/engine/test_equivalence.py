"""Correctness anchors: the cached path against a plain HF forward, the sparse path against an explicit-mask
reference that runs the whole sequence."""

import pytest
import torch

from minirerank_core import MiniReranker, Page, RerankConfig
from minirerank_core.engine.prefill import select_top
from minirerank_core.engine.prompt import MONOQWEN_TEMPLATE, MLPHead
from minirerank_core.engine.reference import dense_scores, masked_scores

from tests.helpers import FAMILIES

QUERY = "what was the revenue growth in 2023"


def rel_err(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("family", FAMILIES)
def test_default_config_equals_plain_hf_forward(tiny, page_images, family):
    model, proc = tiny(family)
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(page_images)]
    r = MiniReranker(model, proc)
    assert len({r.visual_grid(p) for p in pages}) == 3  # three different grids in the one batch
    cached = r.score(QUERY, pages)
    dense = dense_scores(model, proc, r.template, r.head, QUERY, page_images, batch_size=8)  # padded batch
    single = torch.cat([dense_scores(model, proc, r.template, r.head, QUERY, [im]) for im in page_images])
    assert rel_err(cached, dense) < 1e-4
    assert rel_err(cached, single) < 1e-4
    # The YesNo head reads the same numbers as the full LM logits a transformers user would take.
    inputs = proc(text=[r.template.full_text(QUERY)], images=[page_images[0]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    yes, no = r.head.ids
    assert abs(float(logits[yes] - logits[no]) - cached[0]) < 1e-4 * max(1.0, abs(cached[0]))


def test_monoqwen_template_and_custom_head_equal_dense(tiny, page_images):
    model, proc = tiny("qwen2_vl")
    r = MiniReranker(model, proc, template=MONOQWEN_TEMPLATE)
    assert r.dense_scores(QUERY, page_images) == pytest.approx(r.score(QUERY, page_images), rel=1e-4, abs=1e-6)
    torch.manual_seed(0)
    head = MLPHead(model.config.text_config.hidden_size, inner=16)
    r = MiniReranker(model, proc, head=head)
    dense = r.dense_scores(QUERY, page_images)
    assert dense == pytest.approx(r.score(QUERY, page_images), rel=1e-4, abs=1e-6)


SPARSE = [
    dict(exit_layer=5, band=(2, 4)),
    dict(exit_layer=4, band=(0, 2), keep_ratio=0.5),
    dict(exit_layer=6, band=(3, 5), keep_ratio=0.3, index_keep_ratio=0.6),
    dict(exit_layer=5, band=(1, 3), keep_ratio=0.5, query_positions="shared"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", SPARSE, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_sparse_path_equals_explicit_mask_reference(tiny, page_images, family, settings):
    model, proc = tiny(family)
    r = MiniReranker(model, proc, RerankConfig(**settings))
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(page_images)]
    g = torch.Generator().manual_seed(1)
    grids = [r.visual_grid(p) for p in pages]
    q_imp = [torch.rand(h * w, generator=g) for h, w in grids]
    i_imp = [torch.rand(h * w, generator=g) for h, w in grids]
    cfg = r.config
    if cfg.index_keep_ratio < 1:
        r.index(pages, importance=i_imp)
    fast = r.score(QUERY, pages, importance=q_imp if cfg.keep_ratio < 1 else None)

    ref, ref_unpruned = [], []
    for im, qi, ii in zip(page_images, q_imp, i_imp):
        # The selection rule, written independently: top fraction by importance, among tokens still cached.
        n = qi.numel()
        index_keep = torch.topk(ii, max(1, round(cfg.index_keep_ratio * n))).indices.sort().values
        k = max(1, round(cfg.keep_ratio * len(index_keep)))
        query_keep = index_keep[torch.topk(qi[index_keep], k).indices].sort().values
        kw = dict(exit_layer=cfg.exit_layer, band=cfg.band, index_keep=index_keep,
                  shared_offset=cfg.shared_offset if cfg.query_positions == "shared" else None)
        ref.append(masked_scores(r.adapter, proc, r.template, r.head, QUERY, im, query_keep=query_keep, **kw))
        ref_unpruned.append(masked_scores(r.adapter, proc, r.template, r.head, QUERY, im, **kw))
    assert rel_err(fast, ref) < 1e-4
    # The check can fail: the sparse semantics change the scores well beyond the tolerance.
    dense = r.dense_scores(QUERY, pages)
    assert rel_err(fast, dense) > 1e-2
    if cfg.keep_ratio < 1:
        assert rel_err(ref_unpruned, ref) > 1e-3


def test_qwen2_5_vision_windows_are_exercised(tiny, page_images):
    """The tiny Qwen2.5-VL's pages span several attention windows, so the equivalence tests above run its windowed
    vision tower: attending over whole images instead gives other visual tokens."""
    model, proc = tiny("qwen2_5_vl")
    r = MiniReranker(model, proc)
    inputs = proc.image_processor(images=[page_images[0]], return_tensors="pt")
    encode = torch.no_grad()(lambda: r.adapter.encode_image(inputs["pixel_values"], inputs["image_grid_thw"])[0].embeds)
    windowed = encode()
    tower = model.model.visual
    assert tower.window_size // tower.patch_size // tower.spatial_merge_size < min(r.visual_grid(Page(page_images[0])))
    saved = tower.fullatt_block_indexes
    tower.fullatt_block_indexes = list(range(len(tower.blocks)))
    try:
        full = encode()
    finally:
        tower.fullatt_block_indexes = saved
    assert rel_err(windowed, full) > 1e-3


def test_sliding_window_layers_are_refused():
    """The engine builds full causal masks: a model whose config turns sliding-window layers on is refused."""
    from minirerank_core import UnsupportedModelError
    from minirerank_core.engine.families import adapter_for
    from minirerank_core.testing import tiny_model

    model = tiny_model("qwen2_5_vl", num_layers=2)
    adapter_for(model)
    model.config.text_config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        adapter_for(model)


def test_select_top_matches_independent_rule():
    imp = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.5])
    assert select_top(imp, 0.4).tolist() == [1, 3]
    assert select_top(imp, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert select_top(imp, 0.01).tolist() == [1]  # at least one token survives


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_positions_make_preband_query_states_page_independent(tiny, page_images, family):
    """With shared positions, the query's states entering the band are the same for every page (so the fast
    path may compute them once); with exact positions they are not."""
    model, proc = tiny(family)
    b0 = 2
    captured = []
    hook = None

    def grab(_m, _inp, out):
        captured.append((out[0] if isinstance(out, tuple) else out)[0, -8:].clone())

    for mode in ("shared", "exact"):
        r = MiniReranker(model, proc, RerankConfig(exit_layer=4, band=(b0, 4), query_positions=mode))
        captured.clear()
        hook = r.adapter.layers[b0 - 1].register_forward_hook(grab)
        try:
            for im in page_images:
                masked_scores(r.adapter, proc, r.template, r.head, QUERY, im, exit_layer=4, band=(b0, 4),
                              shared_offset=r.config.shared_offset if mode == "shared" else None)
        finally:
            hook.remove()
        states = captured[: len(page_images)]
        spread = max(float((s - states[0]).abs().max()) for s in states)
        if mode == "shared":
            assert spread < 1e-5
        else:
            assert spread > 1e-4
