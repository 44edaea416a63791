"""Listwise settings in minirerank_config.json: one config per layout next to (never instead of) the point-wise
settings, read back by ListwiseReranker.from_pretrained; and the single-pass pruning rule they carry."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from minirerank_core import ConfigError, MiniReranker, Page, RerankConfig, UntrainedLayoutWarning
from minirerank_core import testing as T
from minirerank_core.engine.prompt import MONOQWEN_TEMPLATE
from minirerank_core.engine.settings import SETTINGS_FILE, read_settings, write_settings
from minirerank_core.rerankers.listwise import ListwiseConfig, ListwiseReranker, ListwiseTemplate
from minirerank_core.rerankers.listwise.settings import (ListwiseSettings, listwise_settings, read_listwise_settings,
                                                         write_listwise_settings)

SINGLE = ListwiseConfig(keep_ratio=0.5, prune_by="qiei", window=12, stride=6)
CACHED = ListwiseConfig(mode="cached", exit_layer=5, band=(1, 3), keep_ratio=0.75, device="cuda:1")


def test_round_trip_one_config_per_layout_without_the_device(tmp_path):
    template = ListwiseTemplate(label="\n<{label}> ")
    write_listwise_settings(tmp_path, listwise_settings([SINGLE, CACHED], template), training={"steps": 3})
    doc = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert doc["format"] == "minirerank-config/1" and "config" not in doc and "template" not in doc
    assert doc["listwise"]["mode"] == "single_pass" and "device" not in doc["listwise"]["configs"]["cached"]
    got = read_listwise_settings(tmp_path)
    assert got.config() == SINGLE and got.config("cached") == CACHED.replace(device="auto")
    assert got.template == template and read_settings(tmp_path).extra == {"training": {"steps": 3}}
    assert got.config("cached").band == (1, 3) and isinstance(got.config().labels, tuple)


def test_listwise_block_sits_next_to_the_pointwise_settings(tmp_path):
    cfg = RerankConfig(exit_layer=5, band=(1, 3), keep_ratio=0.5)
    write_settings(tmp_path, cfg, MONOQWEN_TEMPLATE, trained_by="x")
    assert read_listwise_settings(tmp_path) is None  # a point-wise checkpoint has no listwise settings
    write_listwise_settings(tmp_path, listwise_settings([SINGLE]))
    saved = read_settings(tmp_path)
    assert saved.config == cfg.replace(device=saved.config.device) and saved.template == MONOQWEN_TEMPLATE
    assert saved.extra == {"trained_by": "x"} and read_listwise_settings(tmp_path).config() == SINGLE
    # The point-wise writer keeps the block when given it back (as export does).
    write_settings(tmp_path, saved.config, saved.template, listwise=saved.listwise, **saved.extra)
    assert read_listwise_settings(tmp_path).config() == SINGLE


@pytest.mark.parametrize("block", [
    {"configs": {"single_pass": {"keep_ratio": 0.5, "bogus": 1}}},
    {"configs": {"cached": {"mode": "single_pass"}}},
    {"mode": "sideways", "configs": {}},
    {"template": {"intro": "no query placeholder"}},
])
def test_bad_listwise_blocks_raise_config_error(tmp_path, block):
    write_settings(tmp_path, None, None, listwise=block)
    with pytest.raises(ConfigError):
        read_listwise_settings(tmp_path)


def test_listwise_must_be_an_object(tmp_path):
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"format": "minirerank-config/1", "listwise": [1]}))
    with pytest.raises(ConfigError, match=SETTINGS_FILE):
        read_settings(tmp_path)


def test_save_pretrained_then_from_pretrained_runs_each_layout_as_saved(tiny, tmp_path):
    model, proc = tiny("qwen3_vl")
    r = ListwiseReranker(model, proc, SINGLE)
    r.save_pretrained(tmp_path, also=[CACHED.replace(device="cpu")])
    assert isinstance(r.settings(), ListwiseSettings)
    again = ListwiseReranker.from_pretrained(tmp_path)
    assert again.config == r.config
    cached = ListwiseReranker.from_pretrained(tmp_path, mode="cached")
    assert (cached.config.exit_layer, cached.config.band, cached.config.keep_ratio) == (5, (1, 3), 0.75)
    # An explicit config wins; a mode that contradicts it is an error.
    assert ListwiseReranker.from_pretrained(tmp_path, ListwiseConfig()).config.keep_ratio == 1.0
    with pytest.raises(ConfigError, match="mode"):
        ListwiseReranker.from_pretrained(tmp_path, ListwiseConfig(), mode="cached")
    # A folder without listwise settings: ZipRerank's defaults, as before.
    plain = tmp_path / "plain"
    MiniReranker(model, proc).save_pretrained(plain)
    assert ListwiseReranker.from_pretrained(plain).config.keep_ratio == 1.0


def test_a_layout_the_checkpoint_was_not_trained_for_warns(tiny, tmp_path):
    # The shipped listwise model is fitted for the cached layout only; its single pass ranks at chance (README).
    model, proc = tiny("qwen3_vl")
    ListwiseReranker(model, proc, CACHED.replace(device="cpu")).save_pretrained(tmp_path)
    with pytest.warns(UntrainedLayoutWarning, match="single_pass"):
        ListwiseReranker.from_pretrained(tmp_path, mode="single_pass")
    with pytest.warns(UntrainedLayoutWarning):
        ListwiseReranker.from_pretrained(tmp_path, ListwiseConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedLayoutWarning)
        ListwiseReranker.from_pretrained(tmp_path)  # the saved layout: no warning
        plain = tmp_path / "plain"
        MiniReranker(model, proc).save_pretrained(plain)
        ListwiseReranker.from_pretrained(plain, mode="single_pass")  # no listwise settings: nothing to compare


def test_prune_by_qiei_ignores_first_stage_maps(tiny):
    model, proc = tiny("qwen3_vl")
    imgs = [T.random_page_image(160, 120 + 20 * i, seed=40 + i) for i in range(3)]
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(imgs)]
    qiei = ListwiseReranker(model, proc, ListwiseConfig(keep_ratio=0.4, prune_by="qiei"))
    maps_first = ListwiseReranker(model, proc, ListwiseConfig(keep_ratio=0.4))
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(h * w, generator=g) for h, w in map(qiei.visual_grid, imgs)]
    q = "what was the revenue growth in 2023"
    assert qiei.score(q, pages, importance=maps) == pytest.approx(qiei.score(q, pages), rel=1e-6)
    assert maps_first.score(q, pages) == pytest.approx(qiei.score(q, pages), rel=1e-6)  # no maps: QI-EI
    with_maps = maps_first.score(q, pages, importance=maps)
    assert max(abs(a - b) for a, b in zip(with_maps, qiei.score(q, pages))) > 1e-4  # the check can fail
    with pytest.raises(ConfigError, match="prune_by"):
        ListwiseReranker(model, proc, ListwiseConfig(mode="cached", prune_by="qiei"))
