"""PageEmbedder on tiny random ColQwen3 / ColQwen2 / ColQwen2.5: which rows are kept, patch layout, budgets, loading
(published checkpoint layouts: test_embedder_layouts.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from colpali_engine.models import ColQwen2, ColQwen2_5, ColQwen2_5_Processor, ColQwen2Processor, ColQwen3, ColQwen3Processor
from PIL import Image

from minirerank_core.errors import ConfigError, InvalidQueryError, UnsupportedModelError
from minirerank_core.pages import Page, PixelBudget, smart_resize
from minirerank_core.retrieval import PageIndex
from minirerank_core.retrieval.embedder import PageEmbedder
from minirerank_core import testing
from minirerank_core.testing import build_processor, build_tokenizer, random_page_image, tiny_config

FAMILIES = {
    "qwen3_vl": (ColQwen3, ColQwen3Processor, 32),
    "qwen2_vl": (ColQwen2, ColQwen2Processor, 28),
    "qwen2_5_vl": (ColQwen2_5, ColQwen2_5_Processor, 28),  # window attention in the tower: rows still row-major
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make(family: str, tokenizer, max_pixels: int | None = None):
    model_cls, proc_cls, factor = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(tiny_config(family, tokenizer)).eval()
    hp = build_processor(family, tokenizer, max_pixels=max_pixels or factor * factor * 24)
    proc = proc_cls(image_processor=hp.image_processor, tokenizer=hp.tokenizer, video_processor=hp.video_processor)
    return model, proc, factor


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tokenizer):
    return make(request.param, tokenizer)


def test_rows_and_layout_match_a_plain_colpali_forward(tiny):
    model, proc, factor = tiny
    img = random_page_image(3 * factor + 5, 5 * factor - 3, seed=1)
    emb = PageEmbedder(model, proc).encode_pages([Page(img, id="a", metadata={"k": 1})], show_progress=False)[0]
    batch = proc.process_images([img])  # one page: no padding, every row is real
    with torch.no_grad():
        ref = model(**batch)[0]
    torch.testing.assert_close(emb.vectors, ref)
    image_positions = (batch["input_ids"][0] == proc.image_token_id).nonzero().squeeze(1)
    assert torch.equal(emb.patch_rows, image_positions)
    _, h, w = batch["image_grid_thw"][0].tolist()
    assert emb.grid == (h // 2, w // 2) and emb.patch_rows.numel() == h * w // 4
    assert emb.page_id == "a" and emb.metadata == {"k": 1} and emb.content_hash == Page(img).content_hash


def test_batching_drops_padding_rows(tiny):
    model, proc, factor = tiny
    pages = [Page(random_page_image(w, h, seed=i)) for i, (w, h) in enumerate([(90, 150), (200, 60), (64, 64)])]
    embedder = PageEmbedder(model, proc)
    batched = embedder.encode_pages(pages, batch_size=3, show_progress=False)
    single = embedder.encode_pages(pages, batch_size=1, show_progress=False)
    assert len({e.vectors.shape[0] for e in batched}) == 3  # different lengths: the batch was padded
    for b, s in zip(batched, single):
        torch.testing.assert_close(b.vectors, s.vectors, atol=2e-5, rtol=1e-4)
        assert torch.equal(b.patch_rows, s.patch_rows) and b.grid == s.grid
        assert torch.isfinite(b.vectors).all()
        torch.testing.assert_close(b.vectors.norm(dim=-1), torch.ones(b.vectors.shape[0]))


def test_patch_rows_are_row_major_over_the_merged_grid(tiny):
    model, proc, f = tiny
    embedder = PageEmbedder(model, proc)
    base = np.array(random_page_image(6 * f, 4 * f, seed=3))  # exact multiples: grid (4, 6), no resize
    ref = embedder.encode_pages([Page(Image.fromarray(base))], show_progress=False)[0]
    assert ref.grid == (4, 6)
    for i, j in [(1, 4), (3, 0)]:
        changed = base.copy()
        changed[i * f : (i + 1) * f, j * f : (j + 1) * f] ^= 0xFF  # invert one merged cell's pixels
        emb = embedder.encode_pages([Page(Image.fromarray(changed))], show_progress=False)[0]
        moved = (emb.patch_vectors - ref.patch_vectors).norm(dim=-1)  # (4, 6)
        assert divmod(int(moved.argmax()), 6) == (i, j)


def test_queries(tiny):
    model, proc, _ = tiny
    embedder = PageEmbedder(model, proc)
    qs = embedder.encode_queries(["revenue growth", "table of results for the last quarter"], batch_size=2)
    for text, q in zip(["revenue growth", "table of results for the last quarter"], qs):
        batch = proc.process_queries(queries=[text])
        with torch.no_grad():
            torch.testing.assert_close(q, model(**batch)[0], atol=2e-5, rtol=1e-4)
    assert qs[0].shape[0] < qs[1].shape[0]  # padding rows dropped
    torch.testing.assert_close(embedder.encode_query("revenue growth"), qs[0], atol=2e-5, rtol=1e-4)
    for bad in ([""], ["  "], [None]):
        with pytest.raises(InvalidQueryError):
            embedder.encode_queries(bad)
    with pytest.raises(TypeError):
        embedder.encode_queries("not a list")


def test_index_ranking_equals_colpali_scoring(tiny):
    model, proc, factor = tiny
    embedder = PageEmbedder(model, proc)
    images = [random_page_image(4 * factor, 3 * factor, seed=10 + i) for i in range(6)]  # one size: no padding
    with torch.no_grad():
        docs = list(model(**proc.process_images(images)))
        # One query per call: in a padded batch colpali's 0/0 normalisation of pad rows gives NaN scores.
        queries = [model(**proc.process_queries(queries=[t]))[0] for t in ("revenue growth", "figure")]
    index = PageIndex(index_type="flat")
    index.add(embedder.encode_pages([Page(im, id=f"d{i}") for i, im in enumerate(images)], show_progress=False))
    ref = proc.score_multi_vector(queries, docs, device="cpu")
    for qi, text in enumerate(["revenue growth", "figure"]):
        hits = index.search(embedder.encode_query(text), k=6)
        assert [h.page_id for h in hits] == [f"d{int(i)}" for i in torch.argsort(ref[qi], descending=True)]
        np.testing.assert_allclose([h.score for h in hits], ref[qi].sort(descending=True).values, rtol=1e-4)


def test_pixel_budget_gives_the_rerankers_grid(tokenizer):
    from minirerank_core.rerankers import MiniReranker
    from minirerank_core.testing import tiny_model_and_processor

    rr_model, rr_proc = tiny_model_and_processor("qwen3_vl", max_pixels=32 * 32 * 12)
    reranker = MiniReranker(rr_model, rr_proc)
    model, proc, factor = make("qwen3_vl", tokenizer, max_pixels=32 * 32 * 40)  # its own default differs
    assert reranker.pages.patch_factor == factor
    embedder = PageEmbedder(model, proc, pixel_budget=reranker.pixel_budget)
    plain = PageEmbedder(model, proc)
    pages = [Page(random_page_image(w, h, seed=w)) for w, h in [(100, 150), (333, 77), (640, 480), (40, 40)]]
    embs = embedder.encode_pages(pages, batch_size=2, show_progress=False)
    for page, emb in zip(pages, embs):
        assert emb.grid == reranker.visual_grid(page)
        img = page.image()
        b = reranker.pixel_budget
        h, w = smart_resize(img.height, img.width, factor=factor, min_pixels=b.min_pixels, max_pixels=b.max_pixels)
        assert embedder.prepare_image(page).size == (w, h)
    assert [e.grid for e in plain.encode_pages(pages, show_progress=False)] != [e.grid for e in embs]
    assert proc.image_processor.size["longest_edge"] == 32 * 32 * 40  # the caller's processor is untouched


def test_from_pretrained_local_directory(tmp_path, tokenizer):
    model, proc, factor = make("qwen2_vl", tokenizer)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    loaded = PageEmbedder.from_pretrained(tmp_path / "ckpt", pixel_budget=PixelBudget(max_pixels=28 * 28 * 6))
    assert isinstance(loaded.model, ColQwen2) and loaded.dim == 128 and loaded.patch_factor == 28
    page = Page(random_page_image(120, 90, seed=2))
    reference = PageEmbedder(model, proc, pixel_budget=PixelBudget(max_pixels=28 * 28 * 6))
    torch.testing.assert_close(loaded.encode_pages([page], show_progress=False)[0].vectors,
                               reference.encode_pages([page], show_progress=False)[0].vectors)

    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match="bert"):
        PageEmbedder.from_pretrained(tmp_path / "bert")


def tiny_colpali(tokenizer):
    """ColPali (PaliGemma): a 56 px SigLIP with 14 px patches -> a fixed 4x4 grid."""
    model, proc = testing.tiny_colpali(tokenizer)
    return model, proc, 14, (56, 56), (4, 4)


def tiny_colidefics3(tokenizer):
    """ColIdefics3: 32 px tiles of 2x2 tokens (8 px patches, pixel shuffle 2) plus a global view."""
    model, proc = testing.tiny_colidefics3(tokenizer)
    # A 96 x 64 page: 3 x 2 tiles of 2 x 2 tokens -> one 4 x 6 grid of 16 px cells.
    return model, proc, 16, (96, 64), (4, 6)


@pytest.mark.parametrize("build", [tiny_colpali, tiny_colidefics3])
def test_colpali_and_colidefics3_layouts(build, tokenizer):
    model, proc, cell, size, grid = build(tokenizer)
    embedder = PageEmbedder(model, proc)
    base = np.array(random_page_image(*size, seed=4))
    ref = embedder.encode_pages([Page(Image.fromarray(base))], show_progress=False)[0]
    batch = proc.process_images([Image.fromarray(base)])
    with torch.no_grad():
        torch.testing.assert_close(ref.vectors, model(**batch)[0])  # every row kept, as colpali scores them
    assert ref.grid == grid and ref.patch_rows.numel() == grid[0] * grid[1]
    for i, j in [(1, 2), (3, 1)]:
        changed = base.copy()
        changed[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] ^= 0xFF
        emb = embedder.encode_pages([Page(Image.fromarray(changed))], show_progress=False)[0]
        moved = (emb.patch_vectors - ref.patch_vectors).norm(dim=-1)
        assert divmod(int(moved.argmax()), grid[1]) == (i, j)
    mixed = embedder.encode_pages([Page(random_page_image(20, 20, 1)), Page(Image.fromarray(base))], batch_size=2,
                                  show_progress=False)
    torch.testing.assert_close(mixed[1].vectors, ref.vectors, atol=2e-5, rtol=1e-4)
    assert embedder.patch_factor is None
    with pytest.raises(ConfigError):
        PageEmbedder(model, proc, pixel_budget=PixelBudget(max_pixels=10_000))


def test_bad_batch_size_and_no_pages(tiny):
    model, proc, _ = tiny
    with pytest.raises(ValueError):
        PageEmbedder(model, proc).encode_pages([], batch_size=0)
    assert PageEmbedder(model, proc).encode_pages([], show_progress=False) == []
