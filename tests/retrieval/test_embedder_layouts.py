"""Published embedder layouts (colpali-engine), on tiny replicas with their files and key names
(minirerank_core.testing), loaded offline by path through PageEmbedder; their maps reach any reranker on its grid."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from minirerank_core import ConfigError, MiniReranker, Page, RerankConfig
from minirerank_core.errors import ModelNotFoundError
from minirerank_core.retrieval import FirstStage
from minirerank_core.retrieval.embedder import PageEmbedder
from minirerank_core.testing import (
    merged_adapter_model,
    random_page_image,
    save_tiny_colpali,
    save_tiny_colqwen2_5,
    save_tiny_colqwen3,
    save_tiny_colsmol,
    tiny_embedder,
)

QUERY = "revenue growth"
SIZES = [(200, 150), (120, 260), (160, 160), (90, 90)]

# name (as published), builder, colpali-engine class, the reranker family it is paired with, shares its vision tower
LAYOUTS = {
    "colqwen2.5-v0.2": (save_tiny_colqwen2_5, "ColQwen2_5", "qwen2_5_vl", True),
    "colqwen3": (save_tiny_colqwen3, "ColQwen3", "qwen3_vl", True),
    "colpali-v1.3": (save_tiny_colpali, "ColPali", "qwen2_vl", False),
    "colSmol-256M": (save_tiny_colsmol, "ColIdefics3", "qwen2_5_vl", False),
}
ADAPTERS = {"colqwen2.5-v0.2", "colpali-v1.3", "colSmol-256M"}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedders")
    return {name: build(root / name) for name, (build, *_rest) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def pages():
    return [Page(random_page_image(w, h, seed=i), id=f"p{i}") for i, (w, h) in enumerate(SIZES)]


def embed(embedder: PageEmbedder, page: Page) -> torch.Tensor:
    batch = embedder.processor.process_images([embedder.prepare_image(page)])
    with torch.no_grad():
        return embedder.model(**batch)[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_loads_by_path_with_its_weights(name, replicas, pages):
    _, cls, _, _ = LAYOUTS[name]
    path = replicas[name]
    embedder = PageEmbedder.from_pretrained(path)
    assert type(embedder.model).__name__ == cls and embedder.name == str(path)
    if name in ADAPTERS:
        assert (path / "adapter_config.json").is_file() and not (path / "config.json").exists()
        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert json.loads((path.parent / f"{name}-base" / "config.json").read_text())["architectures"] == [cls]
        assert str((path.parent / f"{name}-base").resolve()) == base
        # The adapter is applied: equal to the base with every LoRA pair added by hand, unlike the base alone.
        reference = PageEmbedder(merged_adapter_model(path), embedder.processor)
        plain = PageEmbedder(type(embedder.model).from_pretrained(base, local_files_only=True), embedder.processor)
        got, want, base_only = embed(embedder, pages[0]), embed(reference, pages[0]), embed(plain, pages[0])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        assert float((base_only - want).abs().max()) > 1e-2
    else:
        # A merged checkpoint under the published key names: every weight found (it equals the model it was saved from).
        model, processor = tiny_embedder("qwen3_vl", max_pixels=32 * 32 * 24)
        torch.testing.assert_close(embed(embedder, pages[0]), embed(PageEmbedder(model, processor), pages[0]),
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_first_stage_gives_maps_on_the_rerankers_grid(name, replicas, pages, tiny):
    _, _, family, same_tower = LAYOUTS[name]
    model, processor = tiny(family)
    reranker = MiniReranker(model, processor, RerankConfig(keep_ratio=0.5, index_keep_ratio=0.75))
    embedder = PageEmbedder.for_reranker(replicas[name], reranker)
    first_stage = FirstStage(embedder)
    first_stage.add(pages)
    candidates = first_stage.candidates(QUERY, k=len(pages), reranker=reranker)
    assert sorted(c.page.id for c in candidates) == sorted(p.id for p in pages)
    embedder_grids = []
    for c in candidates:
        grid = reranker.visual_grid(c.page)
        assert c.importance.grid == grid and c.index_importance.grid == grid
        assert torch.isfinite(torch.as_tensor(c.importance.values)).all()
        embedder_grids.append(first_stage.index.embedding(c.page.id).grid)
    reranker_grids = [reranker.visual_grid(c.page) for c in candidates]
    if same_tower:  # one vision tower, one pixel budget: the embedder's patch grid is the reranker's token grid
        assert embedder.pixel_budget == reranker.pixel_budget and embedder_grids == reranker_grids
    else:  # another tower: the maps were resampled
        assert embedder.pixel_budget is None and embedder_grids != reranker_grids
    results = reranker.rerank(QUERY, candidates)
    assert sorted(r.page_id for r in results) == sorted(p.id for p in pages)


def test_adapter_without_processor_files_uses_its_bases(replicas, pages, tmp_path):
    adapter = tmp_path / "colqwen2.5-v0.2"
    shutil.copytree(replicas["colqwen2.5-v0.2"], adapter)
    for f in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (adapter / f).unlink()
    embedder = PageEmbedder.from_pretrained(adapter)
    torch.testing.assert_close(embed(embedder, pages[1]),
                               embed(PageEmbedder.from_pretrained(replicas["colqwen2.5-v0.2"]), pages[1]))


def test_adapter_whose_base_is_unavailable_names_both(replicas, tmp_path):
    adapter = tmp_path / "colqwen2.5-v0.2"
    shutil.copytree(replicas["colqwen2.5-v0.2"], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "vidore/colqwen2.5-base"  # what the published adapter names
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelNotFoundError, match="vidore/colqwen2.5-base") as err:
        PageEmbedder.from_pretrained(adapter, local_files_only=True)
    assert str(adapter) in str(err.value)


def test_unknown_hub_id_offline_raises_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "minirerank-tests/no-such-embedder"
    with pytest.raises(ModelNotFoundError, match=name) as err:
        PageEmbedder.from_pretrained(name)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, OSError)
    with pytest.raises(ModelNotFoundError, match=name):
        FirstStage.from_pretrained(name)
