"""`minirerank tune`: distil a vision-first and a query-first teacher into a miniReranker on a real PDF's pages with
text-layer queries, resume after an interruption, reload the student with its settings; the pieces (split by page,
the loss, the held-out metrics against the teacher) on their own."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from minirerank_core import MiniReranker
from minirerank_core import testing as T
from minirerank_core.calibrate import CalibrationQuery
from minirerank_core.engine.config import RerankConfig
from minirerank_core.engine.prompt import DEFAULT_TEMPLATE
from minirerank_core.engine.settings import read_settings
from minirerank_core.errors import ConfigError
from minirerank_core.rerankers.loading import Checkpoint, load_checkpoint
from minirerank_core.train import tune as tune_mod
from minirerank_core.train.tune import (TeacherScores, agreement, default_embedder, evaluate_heldout, resolve_queries,
                                        split_by_page, student_loss, tune)

MAX_PIXELS = 32 * 32 * 12  # at most 12 merged visual tokens: fast on a CPU
TOPICS = [
    ("Quarterly Revenue Report", "Revenue grew by twelve percent in the northern region while shipping costs fell."),
    ("Network Protocol Design", "Packets are retransmitted after a timeout; congestion windows shrink on loss."),
    ("Garden Plant Care", "Tomatoes need full sun, deep watering and stakes before the flowering season."),
    ("Medieval Castle Architecture", "Curtain walls, moats and gatehouses protected the keep from siege engines."),
    ("Volcanic Eruption Forecasting", "Seismometers and gas sensors warn of magma rising beneath the crater."),
    ("Sourdough Baking Basics", "A lively starter, long fermentation and steam give the loaf an open crumb."),
]
# Small and quick, and still every stage: 2 queries per page, 1/4 held out (by page), 4 training steps.
FAST = dict(steps=4, holdout=0.25, groups=2, hard=2, extra_queries=1, candidates=4, ckpt_every=1, log_every=1, lr=1e-3,
            warmup=1)


def text_pdf(path):
    """A real PDF with a text layer (TrueType fonts embedded by matplotlib), one page per topic."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["pdf.fonttype"] = 42
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        for i, (title, body) in enumerate(TOPICS):
            fig = plt.figure(figsize=(3, 4))
            fig.text(0.05, 0.9, title, fontsize=10)
            for j, chunk in enumerate([body[k : k + 38] for k in range(0, len(body), 38)]):
                fig.text(0.05, 0.8 - 0.06 * j, chunk, fontsize=6)
            fig.patches.append(plt.Rectangle((0.1, 0.1), 0.2 + 0.1 * i, 0.15, transform=fig.transFigure, color="0.3"))
            pdf.savefig(fig)
            plt.close(fig)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A text PDF, a tiny vision-first teacher (minirerank layout, DEFAULT_TEMPLATE), a tiny Qwen3-VL-Reranker
    replica (query-first) and a tiny ColQwen3 sharing their vision tower config."""
    root = tmp_path_factory.mktemp("tune")
    model, proc = T.tiny_model_and_processor("qwen3_vl", seed=1, max_pixels=MAX_PIXELS)
    MiniReranker(model, proc).save_pretrained(root / "vision-first")
    T.save_tiny_qwen3_vl_reranker(root / "Qwen3-VL-Reranker-2B", seed=2, max_pixels=MAX_PIXELS)
    T.save_tiny_colqwen3(root / "colqwen3", seed=3, max_pixels=MAX_PIXELS)
    return {"root": root, "pdf": text_pdf(root / "topics.pdf"), "vision_first": root / "vision-first",
            "query_first": root / "Qwen3-VL-Reranker-2B", "embedder": root / "colqwen3"}


def _counting_dense_scores(monkeypatch) -> list[int]:
    """Count the (query, page) pairs the teacher scores with its dense forward."""
    calls: list[int] = []
    real = Checkpoint.dense_scores

    def counted(self, query, images, batch_size=8):
        calls.append(len(images))
        return real(self, query, images, batch_size)

    monkeypatch.setattr(Checkpoint, "dense_scores", counted)
    return calls


def test_vision_first_teacher_end_to_end_resumes_after_interruption(files, tmp_path, monkeypatch):
    calls = _counting_dense_scores(monkeypatch)
    setting = dict(exit_layer=4, band=(1, 3), keep_ratio=0.5, query_positions="shared")
    out = tmp_path / "student"

    # Killed right after the checkpoint of step 2 (a kill during the save is common.py's recover_dir's business).
    real_save = tune_mod.save_checkpoint

    def save_then_die(ckpt_dir, model, opt, step, extra=None):
        real_save(ckpt_dir, model, opt, step, extra)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tune_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tune(files["vision_first"], [files["pdf"]], out, embedder=files["embedder"], **setting, **FAST)
    scored_first = sum(calls)
    assert scored_first > 0 and (out / "run" / "teacher_scores.json").exists()
    assert json.loads((out / "run" / "ckpt" / "state.json").read_text())["step"] == 2

    monkeypatch.setattr(tune_mod, "save_checkpoint", real_save)
    calls.clear()
    report = tune(files["vision_first"], [files["pdf"]], out, embedder=files["embedder"], **setting, **FAST)
    assert sum(calls) == 0 and report.teacher_pairs_scored == 0  # every teacher score came from the disk
    starts = [e["step"] for e in map(json.loads, (out / "run" / "log.jsonl").read_text().splitlines())
              if e.get("event") == "train"]
    assert starts == [0, 2]  # the rerun continued from the checkpoint
    assert report.steps == 4 and report.teacher_prompt == "vision-first"

    # The resumed run ends exactly where an uninterrupted one does (same batches, optimizer state, schedule).
    whole = tune(files["vision_first"], [files["pdf"]], tmp_path / "whole", embedder=files["embedder"], **setting, **FAST)
    assert whole.teacher_pairs_scored == scored_first
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    teacher = load_file(files["vision_first"] / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], teacher[k]) for k in a if k in teacher)  # and training changed the weights

    # The folder reloads with the setting it was trained in, and records the held-out report.
    student = MiniReranker.from_pretrained(out)
    c = student.config
    assert (c.exit_layer, c.band, c.keep_ratio, c.query_positions) == (4, (1, 3), 0.5, "shared")
    assert c.shared_offset == report.config.shared_offset and student.template == DEFAULT_TEMPLATE
    saved = read_settings(out)
    assert saved.extra["training"]["teacher_prompt"] == "vision-first"
    assert saved.extra["training"]["heldout"] == report.heldout.summary()

    # Held-out pages are unseen: never a positive, a mined negative or a scored pair of a training query.
    heldout = json.loads((out / "run" / "heldout.json").read_text())
    held_pages = {r["page"] for r in heldout["per_query"]}
    held_queries = {r["query"] for r in heldout["per_query"]}
    assert held_pages and report.heldout.n_pages == len(held_pages)
    mined = json.loads((out / "run" / "first_stage.json").read_text())
    scores = json.loads((out / "run" / "teacher_scores.json").read_text())["scores"]
    assert set(mined["train"]).isdisjoint(held_queries) and any(q in scores for q in mined["train"])
    for q, negatives in mined["train"].items():
        assert held_pages.isdisjoint(negatives) and held_pages.isdisjoint(scores.get(q, {})), q
    # ... and the held-out metrics are computed against the teacher's scores of the same candidates.
    for r in heldout["per_query"]:
        assert r["teacher_scores"] == [scores[r["query"]][p] for p in r["candidates"]]
        assert r["teacher_ranking"] == sorted(r["candidates"], key=lambda p: -scores[r["query"]][p])
    ndcg, top1 = agreement([r["student_ranking"] for r in heldout["per_query"]],
                           [r["teacher_ranking"] for r in heldout["per_query"]])
    assert heldout["agreement_ndcg5"] == pytest.approx(ndcg, abs=1e-5) and heldout["agreement_top1"] == pytest.approx(top1)

    # The same directory with another setting is refused, not silently mixed.
    with pytest.raises(ConfigError, match="other"):
        tune(files["vision_first"], [files["pdf"]], out, embedder=files["embedder"], **{**setting, "exit_layer": 5}, **FAST)


def test_query_first_teacher_through_the_cli(files, tmp_path, capsys):
    from minirerank_core.cli import main

    out = tmp_path / "student"
    code = main(["tune", "--teacher", str(files["query_first"]), "--pages", str(files["pdf"]), "--out", str(out),
                 "--embedder", str(files["embedder"]), "--exit", "5", "--band", "2", "4", "--keep", "0.5",
                 "--positions", "exact", "--steps", "3", "--holdout", "0.25", "--candidates", "4", "--json", "-q"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["teacher_prompt"] == "query-first" and payload["steps"] == 3
    assert payload["setting"] == {"exit_layer": 5, "band": [2, 4], "keep_ratio": 0.5, "query_positions": "exact"}
    h = payload["heldout"]
    assert h["queries"] >= 1 and 0.0 <= h["agreement_ndcg5"] <= 1.0 and h["time_ratio"] > 0

    # The student is vision-first (yes/no DEFAULT_TEMPLATE) on the same backbone, and reloads.
    student = MiniReranker.from_pretrained(out)
    assert student.template == DEFAULT_TEMPLATE and student.config.query_positions == "exact"
    assert student.config.exit_layer == 5 and student.config.keep_ratio == 0.5

    # The teacher's scores are its own query-first prompt's (not its weights read in the student's prompt).
    heldout = json.loads((out / "run" / "heldout.json").read_text())["per_query"][0]
    teacher = load_checkpoint(files["query_first"], dtype="float32", device="cpu")
    assert not teacher.vision_first
    from minirerank_core.pages import ingest

    pages = {p.id: p for p in ingest([files["pdf"]], show_progress=False).pages}
    cands = [pages[p] for p in heldout["candidates"]]
    own = teacher.dense_scores(heldout["query"], cands)
    assert heldout["teacher_scores"] == pytest.approx(own, rel=1e-4, abs=1e-5)
    as_student = MiniReranker(teacher.model, teacher.processor).dense_scores(heldout["query"], cands)
    assert max(abs(a - b) for a, b in zip(own, as_student)) > 1e-3

    # ... and the CLI ranks with it.
    code = main(["rerank", "garden tomatoes", str(files["pdf"]), "--model", str(out), "--json", "-q"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)["results"]) == len(TOPICS)


def test_adapter_teacher_keeps_its_prompt_and_saves_merged(files, tmp_path):
    """A PEFT LoRA teacher (MonoQwen2-VL's layout, True/False prompt, Qwen2-VL with another patch size than the
    embedder: maps resampled): the student keeps the teacher's vision-first prompt and saves as one plain
    checkpoint."""
    from transformers import AutoModelForImageTextToText

    from minirerank_core.engine.prompt import MONOQWEN_TEMPLATE

    teacher = T.save_tiny_monoqwen(tmp_path / "MonoQwen2-VL-v0.1", max_pixels=28 * 28 * 12)
    report = tune(teacher, [files["pdf"]], tmp_path / "student", embedder=files["embedder"], exit_layer=5, band=(1, 4),
                  keep_ratio=0.5, **{**FAST, "steps": 2})
    assert report.template == MONOQWEN_TEMPLATE and report.teacher_prompt == "vision-first"
    assert not (tmp_path / "student" / "adapter_config.json").exists()
    _, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    student = MiniReranker.from_pretrained(tmp_path / "student")
    assert student.template == MONOQWEN_TEMPLATE and student.config.exit_layer == 5


def test_student_loss_goes_down_on_a_fixed_batch(files):
    """The tune loss through the engine's cached path, in a mini setting with pruning maps."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from minirerank_core.train.models import FrozenVisionCache, visual_module
    from minirerank_core.train.reranker import PairScorer, shared_offset_for, trainable_parameters

    path = files["vision_first"]
    proc = AutoProcessor.from_pretrained(path)
    images = [T.random_page_image(96, 128, seed=i) for i in range(4)]  # 3 x 4 merged tokens each
    texts = ["revenue report", "network packets", "garden tomatoes"]
    labels = torch.eye(3, 4)
    labelled = torch.tensor([True, True, False])  # the last query has no source page: distillation only
    teacher = torch.tensor([[2.0, -1.0, 0.0, -2.0], [-1.0, 1.5, 0.5, 0.0], [0.0, 0.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    imp = [[torch.rand(12, generator=g) for _ in images] for _ in texts]
    cfg = RerankConfig(exit_layer=4, band=(1, 3), keep_ratio=0.5, query_positions="shared",
                       shared_offset=shared_offset_for(proc.tokenizer, DEFAULT_TEMPLATE, 12))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path).train()
    FrozenVisionCache(visual_module(model))
    scorer = PairScorer(model, proc, cfg)
    params = trainable_parameters(model, 4)
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(12):
        loss, parts = student_loss(scorer(images, texts, imp), teacher, labels, labelled)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert set(parts) == {"distill", "label_loss"}
    assert min(losses[-4:]) < losses[0] - 0.1, losses
    # Rows without a source page add no label loss.
    s = torch.zeros(3, 4)
    only_distill, p = student_loss(s, teacher, labels, torch.zeros(3, dtype=torch.bool))
    assert "label_loss" not in p and float(only_distill) == pytest.approx(p["distill"])


class _Ranker:
    """A stand-in student that returns a fixed order, to check what the held-out metrics are measured against."""

    class pruning:
        keep_ratio = 1.0

    def __init__(self, order):
        self.order = order

    def index(self, pages, show_progress=False):
        return []

    def rerank(self, query, candidates):
        from types import SimpleNamespace

        ids = [c.page_id for c in candidates]
        return [SimpleNamespace(page_id=p, score=float(-i)) for i, p in enumerate(sorted(ids, key=self.order.index))]


def test_heldout_metrics_are_against_the_teacher_not_the_labels(tmp_path):
    from types import SimpleNamespace

    from minirerank_core import Page

    pages = {pid: Page(T.random_page_image(32, 32, seed=i), id=pid) for i, pid in enumerate("abc")}
    scores = TeacherScores(tmp_path / "scores.json", "teacher")
    scores.add("q", ["a", "b", "c"], [0.5, 2.0, -1.0], seconds=0.3)  # the teacher puts b first; the label is a
    stage = SimpleNamespace(embedder=SimpleNamespace(encode_queries=lambda qs: [None] * len(qs)))
    queries = [CalibrationQuery("q", "a")]
    like_teacher = evaluate_heldout(_Ranker(["b", "a", "c"]), stage, pages, queries, {"q": ["a", "b", "c"]}, scores)
    assert like_teacher.agreement_ndcg5 == pytest.approx(1.0) and like_teacher.agreement_top1 == 1.0
    assert like_teacher.student_ndcg5 == pytest.approx(1 / torch.log2(torch.tensor(3.0)).item())  # label at rank 2
    assert like_teacher.teacher_ndcg5 == pytest.approx(like_teacher.student_ndcg5)
    like_labels = evaluate_heldout(_Ranker(["a", "b", "c"]), stage, pages, queries, {"q": ["a", "b", "c"]}, scores)
    assert like_labels.student_ndcg5 == pytest.approx(1.0) and like_labels.agreement_top1 == 0.0
    log2 = lambda x: torch.log2(torch.tensor(float(x))).item()  # noqa: E731
    # Teacher's gains b=5, a=4, c=3: the order a, b, c against the ideal b, a, c.
    assert like_labels.agreement_ndcg5 == pytest.approx((4 + 5 / log2(3) + 3 / 2) / (5 + 4 / log2(3) + 3 / 2))
    assert like_labels.retention > 1.0
    assert like_teacher.teacher_seconds_per_query == pytest.approx(0.3)  # 0.1 s per pair x 3 candidates
    # The scores survive a reload, and a different teacher's file is refused.
    scores.save()
    assert TeacherScores(tmp_path / "scores.json", "teacher")["q", "b"] == 2.0
    with pytest.raises(ConfigError):
        TeacherScores(tmp_path / "scores.json", "another")


def test_split_holds_out_whole_pages():
    queries = [CalibrationQuery(f"q{i}-{j}", f"p{i}") for i in range(10) for j in range(2)] + [CalibrationQuery("free")]
    train, held, pages = split_by_page(queries, 0.2, seed=0)
    assert len(held) + len(train) == len(queries) and pages
    assert {q.page_id for q in held if q.page_id} == pages
    assert pages.isdisjoint(q.page_id for q in train)
    assert 3 <= len([q for q in held if q.page_id]) <= 5  # about 20 % of 21, whole pages only
    assert split_by_page(queries, 0.2, seed=0)[2] == pages  # seeded
    assert len({frozenset(split_by_page(queries, 0.2, seed=s)[2]) for s in range(4)}) > 1
    assert split_by_page(queries, 0.0)[1] == []
    one_page = [CalibrationQuery("a", "p"), CalibrationQuery("b", "p")]
    assert split_by_page(one_page, 0.5)[0] == one_page  # the only queried page stays for training


def test_queries_name_pages_by_id_file_or_stem(tmp_path):
    from minirerank_core.pages import ingest

    for i in range(2):
        T.random_page_image(64, 64, seed=i).save(tmp_path / f"page-{i}.png")
    pages = ingest([tmp_path], show_progress=False).pages
    got = resolve_queries(["plain", {"query": "by stem", "page": "page-1"}, {"query": "by file", "page": "page-0.png"},
                           {"query": "by id", "page": pages[1].id}, {"query": "plain"}], pages)
    assert [q.query for q in got] == ["plain", "by stem", "by file", "by id"]
    assert [q.page_id for q in got] == [None, pages[1].id, pages[0].id, pages[1].id]
    with pytest.raises(ConfigError, match="page-9"):
        resolve_queries([{"query": "x", "page": "page-9"}], pages)


def test_default_embedder_is_the_shipped_one_only_for_its_vision_tower(files):
    from transformers import AutoConfig

    from minirerank_core.defaults import DEFAULT_EMBEDDER_DIR, DEFAULT_RERANKER_DIR

    assert default_embedder(AutoConfig.from_pretrained(DEFAULT_RERANKER_DIR)) == str(DEFAULT_EMBEDDER_DIR)
    with pytest.raises(ConfigError, match="--embedder"):
        default_embedder(AutoConfig.from_pretrained(files["vision_first"]))


def test_listwise_student_through_the_cli(files, tmp_path, capsys):
    """`tune --listwise`: a cached listwise student on the same pages and teacher scores; the layers below the
    band's end stay the teacher's (the page cache is the teacher's), the rest trains; the folder reloads as a
    ListwiseReranker in the setting it was trained in, and ranks through the CLI. The read-back head's key, copy
    scale and read-out come from tune's defaults (the shipped heads' setting), recorded with the student."""
    from minirerank_core.cli import main
    from minirerank_core.rerankers.listwise import ListwiseReranker
    from minirerank_core.train.listwise import TRAINED_CACHED_LABEL
    from minirerank_core.train.readback import HEAD_COPY_SCALE, HEAD_RELEVANCE

    out = tmp_path / "listwise"
    args = ["tune", "--teacher", str(files["vision_first"]), "--pages", str(files["pdf"]), "--out", str(out),
            "--embedder", str(files["embedder"]), "--exit", "4", "--band", "1", "3", "--keep", "0.5", "--steps", "3",
            "--holdout", "0.25", "--candidates", "4", "--lr", "1e-3", "--listwise", "--attn-scale", "2", "--readback-init", "4", "--copy-weight", "1",
            "--json", "-q"]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["kind"] == "listwise" and payload["steps"] == 3
    h = payload["heldout"]
    assert h["queries"] >= 1 and 0.0 <= h["agreement_ndcg5"] <= 1.0 and h["time_ratio"] > 0
    events = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    (fit,) = [e for e in events if e.get("event") == "readback_init"]
    assert fit["layer"] == 3 and fit["windows"] == 4 and fit["probe_labels"] > abs(fit["probe_others"])
    steps = [e for e in events if "loss" in e]
    assert steps[-1]["step"] == 3 and all(e["copy"] > 0 and e["ranknet"] >= 0 and e["soft"] >= 0 for e in steps)

    student = ListwiseReranker.from_pretrained(out)
    c = student.config
    assert (c.mode, c.exit_layer, c.band, c.keep_ratio, c.readout) == ("cached", 4, (1, 3), 0.5, "labels")
    assert student.template.cached_label == TRAINED_CACHED_LABEL
    training = json.loads((out / "minirerank_config.json").read_text())["training"]
    assert (training["readback_relevance"], training["readback_copy_scale"], training["readout"]) == (
        HEAD_RELEVANCE, HEAD_COPY_SCALE, "labels")
    a, teacher = load_file(out / "model.safetensors"), load_file(files["vision_first"] / "model.safetensors")

    def layer(weights, i, name="self_attn.q_proj.weight"):
        (key,) = [k for k in weights if k.endswith(f"layers.{i}.{name}")]
        return weights[key]

    assert torch.equal(layer(a, 2), layer(teacher, 2))  # below the band's end: the teacher's
    assert not torch.equal(layer(a, 3), layer(teacher, 3))  # the compare layers trained
    # layer 3 (before the exit) holds the read-back head: its MLP was switched off, 3 small steps since
    assert float(layer(a, 3, "mlp.down_proj.weight").abs().max()) < 0.05 < float(layer(teacher, 3, "mlp.down_proj.weight").abs().max())

    assert main(["rerank", "garden tomatoes", str(files["pdf"]), "--model", str(out), "--listwise", "--embedder",
                 str(files["embedder"]), "--json", "-q"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == len(TOPICS)
    # A point-wise run into the listwise run's directory is refused.
    with pytest.raises(ConfigError, match="other listwise"):
        tune(files["vision_first"], [files["pdf"]], out, embedder=files["embedder"], exit_layer=4, band=(1, 3),
             keep_ratio=0.5, steps=3, holdout=0.25, candidates=4, lr=1e-3)
