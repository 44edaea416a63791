"""minirerank_config.json: one format written by save_pretrained and the training stages, read by every loader."""

from __future__ import annotations

import json

import pytest

from minirerank_core import ConfigError, MiniReranker, RerankConfig
from minirerank_core.engine.prompt import JINA_M0_TEMPLATE, MONOQWEN_TEMPLATE
from minirerank_core.engine.settings import SETTINGS_FILE, SETTINGS_FORMAT, read_settings, write_settings


def test_round_trip_keeps_config_template_and_metadata_but_not_the_device(tmp_path):
    cfg = RerankConfig(exit_layer=5, band=(1, 3), keep_ratio=0.5, query_positions="shared", shared_offset=77,
                       device="cuda:1")
    write_settings(tmp_path, cfg, MONOQWEN_TEMPLATE, training={"steps": 3})
    doc = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert doc["format"] == "minirerank-config/1" and "device" not in doc["config"]
    got = read_settings(tmp_path)
    assert got.config == cfg.replace(device="auto") and got.template == MONOQWEN_TEMPLATE  # the loading machine picks
    assert got.extra == {"training": {"steps": 3}}
    assert not [p for p in tmp_path.iterdir() if p.name != SETTINGS_FILE]  # written atomically: no temporary left


def test_template_suffix_ids_round_trip(tmp_path):
    """JSON gives the score-token ids back as a list; the template still compares equal."""
    write_settings(tmp_path, RerankConfig(), JINA_M0_TEMPLATE)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["template"]["suffix_ids"] == [100]
    got = read_settings(tmp_path).template
    assert got == JINA_M0_TEMPLATE and got.suffix_ids == (100,) and hash(got) == hash(JINA_M0_TEMPLATE)


def test_absent_file_means_plain_checkpoint(tmp_path):
    got = read_settings(tmp_path)
    assert got.config is None and got.template is None
    assert read_settings("org/some-hub-id").config is None and read_settings(None).config is None


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "other/9", "config": {}}),
                                  json.dumps({"config": {"exit_layer": 3}}),  # no format tag
                                  json.dumps({"format": SETTINGS_FORMAT, "config": {"exit_layer": 3, "banned": 1}}),
                                  json.dumps({"format": SETTINGS_FORMAT, "template": {"prefix": "p", "query": "no placeholder"}}),
                                  "[]"])
def test_bad_files_raise_config_error_naming_the_file(tmp_path, text):
    (tmp_path / SETTINGS_FILE).write_text(text)
    with pytest.raises(ConfigError, match=SETTINGS_FILE):
        read_settings(tmp_path)


def test_save_pretrained_then_from_pretrained_restores_settings(tiny, tmp_path):
    model, proc = tiny("qwen3_vl")
    cfg = RerankConfig(exit_layer=4, band=(1, 3), query_positions="shared")
    rr = MiniReranker(model, proc, cfg, template=MONOQWEN_TEMPLATE)
    rr.save_pretrained(tmp_path)
    again = MiniReranker.from_pretrained(tmp_path)
    assert again.config == rr.config and again.template == MONOQWEN_TEMPLATE
    # An explicit config wins over the saved one.
    assert MiniReranker.from_pretrained(tmp_path, RerankConfig()).config.exit_layer == rr.adapter.num_layers
