"""Training code on toy sizes: data stage, each training stage end to end (a few steps, loss goes down), resumable
checkpoints, and saved models that reload to identical scores."""

from __future__ import annotations

import json
import random

import pytest
import torch

from minirerank_core.engine.config import RerankConfig
from minirerank_core.train import common
from minirerank_core.train.corpus import Document, Section, clean_docstring
from minirerank_core.train.data import DataSet, build, content_words
from minirerank_core.train.models import FrozenVisionCache, ModelSpec, TextSpec, VisionSpec, visual_module
from minirerank_core.train.render import Block, render_blocks, sample_style

PAGE = (160, 224)  # 5 x 7 merged visual tokens: fast on a CPU
TINY = ModelSpec(
    vision=VisionSpec(depth=2, hidden=64, heads=1, mlp_ratio=2, deepstack=(0,)),
    reranker=TextSpec(layers=4, hidden=64, heads=2, kv_heads=1, intermediate=128),
    embedder=TextSpec(layers=2, hidden=64, heads=2, kv_heads=1, intermediate=128),
    max_visual_tokens=36,
)

WORDS = ("socket buffer thread lock queue parser token stream encoder decoder archive cipher signal timer "
         "packet header schema cursor vector matrix kernel module import export widget gadget").split()


def _documents(n_docs: int = 8) -> list[Document]:
    rng = random.Random(0)
    docs = []
    for d in range(n_docs):
        secs = []
        for s in range(3):
            words = [rng.choice(WORDS) for _ in range(40)] + [f"name{d}x{s}", f"key{d}y{s}"]
            rng.shuffle(words)
            secs.append(Section(f"mod{d}.func{s}", " ".join(words) + "."))
        docs.append(Document(f"mod{d}", secs))
    return docs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    build(root, seed=0, vocab_size=400, max_pages_per_doc=3, val_frac=0.15, test_frac=0.15, documents=_documents(),
          page_size=PAGE, show_progress=False)
    return root


def _spec_file(tmp_path):
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(TINY.to_dict()))
    return p


def test_clean_docstring_and_renderer_report_drawn_words():
    assert clean_docstring("Title line.\n\n    >>> code()\n    more text here that is long enough\n") == (
        "more text here that is long enough" if len("Title line.") < 20 else "")
    blocks = [Block("heading", "json.dumps"), Block("para", "Serialize obj to a JSON formatted str " * 30),
              Block("table", rows=[("Name", "Summary"), ("dumps", "serialize an object"), ("loads", "parse a document")])]
    page = render_blocks(blocks, sample_style(random.Random(1)), 320, 448)
    assert page.image.size == (320, 448)
    assert page.words and page.rest  # the long paragraph does not fit on one page
    for w in page.words:
        x0, y0, x1, y1 = w.box
        assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 448
    drawn = len([w for w in page.words if w.kind == "body"])
    assert drawn + len(page.rest[0].text.split()) == len(blocks[1].text.split())  # nothing lost, nothing repeated


def test_typewriter_layout_puts_one_glyph_in_each_patch():
    from minirerank_core.train.pretrain import CHARS, patch_char_targets

    style = sample_style(random.Random(3), grid_frac=1.0, grid_px=16)
    assert style.grid == 16 and style.margin % 32 == 0
    page = render_blocks([Block("heading", "heapq.heappush"), Block("para", "Push item onto heap, maintaining the heap invariant.")],
                         style, 320, 448)
    for w in page.words:
        x0, y0, x1, y1 = w.box
        assert x0 % 16 == 0 and y0 % 32 == 0 and (x1 - x0) == 16 * len(w.text) and y1 - y0 == 32
    t = patch_char_targets([[w.text, *w.box, w.kind] for w in page.words], (320, 448), (14, 10))
    rows = t.view(14, 10, 2, 2).permute(0, 2, 1, 3).reshape(28, 20)  # merge-window order -> patch grid
    first = "".join(" " if c == 0 else CHARS[c - 1] for c in rows[2].tolist()).strip()
    assert first == "heapq.heappush"[: len(first)] and len(first) >= 10
    assert torch.equal(rows[2], rows[3])  # a glyph spans the two patch rows of its 32-px line


def test_data_stage_splits_by_document_and_queries_are_unambiguous(dataset):
    ds = DataSet(dataset)
    docs = {s: {ds.pages[p]["doc_id"] for p in ds.page_ids(s)} for s in ("train", "val", "test")}
    assert docs["train"] and docs["val"] and docs["test"]
    assert not (docs["train"] & docs["val"]) and not (docs["train"] & docs["test"]) and not (docs["val"] & docs["test"])
    for q in ds.queries:
        split_pages = ds.page_ids(q["split"])
        holders = [p for p in split_pages
                   if set(content_words(q["query"])) <= set(content_words(" ".join(w[0] for w in ds.pages[p]["words"])))]
        assert holders == [q["positive"]]
        assert q["positive"] not in q["hard_negatives"] and set(q["hard_negatives"]) <= set(split_pages)
    tok = ds.tokenizer()
    for t in ("<|im_start|>", "<|vision_start|>", "<|image_pad|>"):
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id
    assert len(tok("yes", add_special_tokens=False)["input_ids"]) == 1
    # Reproducible from the seed.
    again = dataset.parent / "again"
    build(again, seed=0, vocab_size=400, max_pages_per_doc=3, val_frac=0.15, test_frac=0.15, documents=_documents(),
          page_size=PAGE, show_progress=False)
    assert (again / "queries.jsonl").read_text() == (dataset / "queries.jsonl").read_text()


def test_checkpoint_roundtrip_restores_model_and_optimizer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step():
        loss = model(torch.ones(2, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    common.save_checkpoint(tmp_path / "ckpt", model, opt, 1)
    step()
    ref = [p.detach().clone() for p in model.parameters()]
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    assert common.load_checkpoint(tmp_path / "ckpt", model2, opt2)["step"] == 1
    model, opt = model2, opt2
    step()
    assert all(torch.equal(a, b) for a, b in zip(ref, model.parameters()))


def _run(main, argv):
    main([str(a) for a in argv] + ["--quiet", "--threads", "1"])


def _losses(run_dir, key="loss"):
    return [e[key] for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if key in e]


@pytest.fixture(scope="module")
def stages(dataset, tmp_path_factory):
    """pretrain -> embedder -> teacher -> student, a few steps each on the toy dataset."""
    from minirerank_core.train import embedder, pretrain, reranker

    run = tmp_path_factory.mktemp("run")
    spec = _spec_file(run)
    _run(pretrain.main, ["--data", dataset, "--out", run / "pretrain", "--spec", spec, "--steps", 8, "--batch", 4,
                         "--lr", 3e-3, "--warmup", 1, "--log-every", 1, "--eval-every", 100, "--eval-pages", 2])
    _run(embedder.main, ["--data", dataset, "--init-pretrain", run / "pretrain", "--out", run / "embedder", "--steps", 6,
                         "--batch", 4, "--hard", 2, "--lr", 2e-3, "--warmup", 1, "--log-every", 1])
    _run(reranker.main, ["teacher", "--data", dataset, "--init-pretrain", run / "pretrain", "--out", run / "teacher",
                         "--steps", 6, "--lr", 2e-3, "--warmup", 1, "--log-every", 1, "--eval-queries", 3,
                         "--random-frac", 1.0, 0.0, "--guide-layers", 1, 2])
    _run(reranker.main, ["student", "--data", dataset, "--init", run / "teacher" / "final", "--teacher", run / "teacher" / "final",
                         "--embedder", run / "embedder" / "final", "--exit-layer", 3, "--band", 1, 3, "--keep-ratio", 0.5,
                         "--negatives", "first-stage",
                         "--out", run / "student", "--steps", 4, "--lr", 1e-3, "--warmup", 1, "--log-every", 1,
                         "--eval-queries", 3])
    return run


@pytest.mark.parametrize("module", ["data", "pretrain", "embedder", "reranker", "export", "recipe"])
def test_entry_points_have_help(module, capsys):
    import importlib

    mod = importlib.import_module(f"minirerank_core.train.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage" in out and ("--device" in out or module in ("data", "export"))


def test_every_stage_trains_and_writes_its_outputs(stages):
    for name in ("pretrain", "embedder", "teacher", "student"):
        assert (stages / name / "result.json").exists(), name
        losses = _losses(stages / name)
        assert all(l == l for l in losses)  # finite
    losses = _losses(stages / "pretrain")
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    guided = _losses(stages / "teacher", "match_loss")
    assert len(guided) == 6 and all(g == g for g in guided)  # the guided-attention loss ran at every step
    mined = json.loads((stages / "student" / "mined_negatives.json").read_text())
    assert mined and all(len(v) >= 1 for v in mined.values())
    cfg = json.loads((stages / "student" / "final" / "minirerank_config.json").read_text())
    assert cfg["config"]["exit_layer"] == 3 and cfg["config"]["band"] == [1, 3]
    assert cfg["config"]["query_positions"] == "shared" and cfg["config"]["keep_ratio"] == 0.5
    assert cfg["template"]["query"].count("{query}") == 1


def test_training_loss_goes_down_on_a_fixed_batch(stages):
    """Teacher and pruned/early-exit/shared-position student, trained through prefill_pages + score_cached."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from minirerank_core.testing import random_page_image
    from minirerank_core.train.reranker import PairScorer, distill_loss, label_loss

    path = stages / "teacher" / "final"
    proc = AutoProcessor.from_pretrained(path)
    images = [random_page_image(*PAGE, seed=i) for i in range(4)]  # visually distinct pages: learnable at once
    texts = ["socket buffer", "thread lock", "queue parser"]
    labels = torch.eye(3, 4)
    teacher = PairScorer(AutoModelForImageTextToText.from_pretrained(path).eval(), proc, RerankConfig())
    with torch.no_grad():
        t_scores = teacher(images, texts)
    g = torch.Generator().manual_seed(0)
    imp = [[torch.rand(35, generator=g) for _ in images] for _ in texts]
    cfg = RerankConfig(exit_layer=3, band=(1, 3), keep_ratio=0.5, query_positions="shared", shared_offset=60)
    for config, importance in ((RerankConfig(), None), (cfg, imp)):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(path).train()
        FrozenVisionCache(visual_module(model))
        scorer = PairScorer(model, proc, config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(12):
            s = scorer(images, texts, importance)
            loss = label_loss(s, labels) + (distill_loss(s, t_scores) if importance is not None else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert min(losses[-6:]) < losses[0] - 0.05, losses


def test_saved_models_reload_to_identical_scores(stages, dataset):
    from colpali_engine.models import ColQwen3, ColQwen3Processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from minirerank_core import MiniReranker, Page
    from minirerank_core.engine.settings import read_settings
    from minirerank_core.train.common import load_checkpoint
    from minirerank_core.train.reranker import PairScorer

    ds = DataSet(dataset)
    images = [ds.image(p) for p in ds.page_ids("test")[:3]]
    # Student: the final directory equals the last training checkpoint, and MiniReranker reads its config.
    final = stages / "student" / "final"
    cfg = read_settings(final).config
    a = AutoModelForImageTextToText.from_pretrained(final).eval()
    b = AutoModelForImageTextToText.from_pretrained(final).eval()
    load_checkpoint(stages / "student" / "ckpt", b)
    imp = [[torch.linspace(0, 1, 35) for _ in images]]
    proc = AutoProcessor.from_pretrained(final)
    with torch.no_grad():
        sa = PairScorer(a, proc, cfg)(images, ["socket buffer"], imp)
        sb = PairScorer(b, proc, cfg)(images, ["socket buffer"], imp)
    assert torch.equal(sa, sb)
    rr = MiniReranker(a, proc, cfg)
    got = rr.score("socket buffer", [Page(im, id=f"p{i}") for i, im in enumerate(images)], importance=imp[0])
    assert got == pytest.approx(sa[0].tolist(), rel=1e-5, abs=1e-5)
    # Embedder: save_pretrained round trip gives the same multi-vector embeddings.
    efinal = stages / "embedder" / "final"
    m1 = ColQwen3.from_pretrained(efinal).eval()
    p1 = ColQwen3Processor.from_pretrained(efinal)
    m1.save_pretrained(stages / "emb_again")
    p1.save_pretrained(stages / "emb_again")
    m2 = ColQwen3.from_pretrained(stages / "emb_again").eval()
    batch = p1.process_images(images)
    with torch.no_grad():
        assert torch.equal(m1(**batch), m2(**batch))


def test_frozen_vision_cache_is_exact(stages, dataset):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from minirerank_core.train.reranker import PairScorer

    ds = DataSet(dataset)
    images = [ds.image(p) for p in ds.page_ids("val")[:3]]
    path = stages / "teacher" / "final"
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    scorer = PairScorer(model, AutoProcessor.from_pretrained(path), RerankConfig())
    with torch.no_grad():
        ref = scorer(images, ["socket", "thread lock"])
        cache = FrozenVisionCache(visual_module(model))
        first = scorer(images, ["socket", "thread lock"])
        again = scorer(images[::-1], ["socket", "thread lock"])
        assert len(cache.store) == 3
        cache.close()
    assert torch.equal(ref, first) and torch.equal(ref.flip(1), again)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~2 min on an idle CI machine; generous for a busy one (time is not what it tests)
def test_recipe_smoke_chains_every_stage_resumes_and_exports(tmp_path):
    """`recipe --smoke` (the shipped sizes, a few steps each on 12 documents): teacher phase 2 resumes phase 1's
    checkpoint, a second run skips every finished stage, and export writes assets that reload offline."""
    import subprocess
    import sys

    from minirerank_core import MiniReranker
    from minirerank_core.engine.settings import read_settings
    from minirerank_core.train import export, recipe

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "minirerank_core.train.recipe", "--out", str(run), "--smoke", "--threads", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=3300)
    assert first.returncode == 0, first.stderr[-3000:]
    starts = [e["step"] for e in map(json.loads, (run / "teacher" / "log.jsonl").read_text().splitlines())
              if e.get("event") == "start"]
    assert starts == [0, 3]  # phase 2 continued from phase 1's checkpoint
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 10, again.stdout  # 6 + 4 listwise
    export.main(["--run", str(run), "--data", str(run / "data"), "--assets", str(tmp_path / "assets"),
                 "--sample-pages", "4", "--sample-docs", "2"])
    saved = read_settings(tmp_path / "assets" / "reranker")
    want = recipe.STUDENT
    assert (saved.config.exit_layer, saved.config.band, saved.config.keep_ratio) == (
        want["exit_layer"], want["band"], want["keep_ratio"])
    assert saved.config.query_positions == "shared" and saved.extra["embedder"] == "../embedder"
    rr = MiniReranker.from_pretrained(tmp_path / "assets" / "reranker")
    assert rr.config == saved.config.replace(device=rr.config.device)  # saved settings carry no device: resolved at load
    doc = json.loads((tmp_path / "assets" / "sample_corpus" / "queries.json").read_text())
    assert doc["queries"] and len(list((tmp_path / "assets" / "sample_corpus").glob("*.png"))) == 4
