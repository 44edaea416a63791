"""`minirerank tune`: make a miniReranker from any supported reranker, on your own pages.

    from minirerank_core.train.tune import tune
    report = tune("Qwen/Qwen3-VL-Reranker-2B", "reports/", "out/", embedder="vidore/colqwen2.5-v0.2",
                  exit_layer=16, band=(10, 14), keep_ratio=0.25, device="cuda")
    print(report.table())                      # held-out agreement with the teacher, time per query
    MiniReranker.from_pretrained("out/")       # the student, with the settings it was trained in

What it does (every intermediate result is kept under OUT/run/, so a killed run continues where it stopped):

1. Queries: drawn from the PDFs' text layer (`calibrate.queries_from_pdfs`), or given, each tied to the page it
   came from when that is known (`{"query", "page"}`; the page by id, file name or file stem).
2. Hold-out by page: a share of the queried pages (default 20 % of the queries) and all their queries are held
   out. Training never sees those pages, not even as negatives.
3. First stage: the embedder indexes every page (OUT/run/index). A training query's hard negatives are its top
   pages among the training pages; a held-out query is reranked over its top-k among all pages, as in use.
4. Teacher scores: every (query, page) pair a training batch or the held-out evaluation uses is scored once by
   the teacher's own dense forward in its own prompt order (`Checkpoint.dense_scores`; query-first
   Qwen3-VL-Reranker included) and kept in OUT/run/teacher_scores.json. Batches are drawn from the step's seed,
   so the pairs are known before training starts.
5. Student: the teacher's weights; the teacher's prompt when it is vision-first, else `DEFAULT_TEMPLATE` (yes/no,
   page first). It trains in exactly its target setting (exit, band, keep ratio with the embedder's maps, query
   positions) through the engine's cached path (`PairScorer`) with the recipe's losses:
   `label_weight * label_loss` on the query's source page + `distill_loss` to the teacher's scores. The vision
   tower, the token embeddings and the layers after the exit stay fixed (`trainable_parameters`).
6. Report on the held-out queries: agreement with the teacher's ranking of the same candidates (nDCG@5 with the
   teacher's top 5 graded 5..1, and top-1), nDCG@5 against the source pages for teacher and student, and the time
   per query of the student's mini setting over cached pages against the teacher's dense forward.
7. OUT: a `save_pretrained` folder whose `minirerank_config.json` holds the setting it was trained in and the
   report (`MiniReranker.from_pretrained(OUT)`, `minirerank rerank --model OUT`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..calibrate import CalibrationQuery, _ndcg5, queries_from_pdfs
from ..candidates import Candidate
from ..engine.config import RerankConfig
from ..engine.prompt import DEFAULT_TEMPLATE, PromptTemplate
from ..engine.settings import write_settings
from ..errors import ConfigError, InvalidQueryError
from ..fileio import format_tag, read_json, write_json
from ..pages import Page
from ..validation import check_choice, check_positive_int, check_query, check_ratio
from .common import (Logger, autocast, has_checkpoint, lr_at, optimizer_step, progress, save_checkpoint, set_lr,
                     setup_runtime)
from .common import load_checkpoint as load_training_state
from .metrics import ndcg_at
from .readback import HEAD_COPY_SCALE, HEAD_RELEVANCE
from .reranker import (PairScorer, distill_loss, label_loss, max_visual_tokens_of, sample_batch, shared_offset_for,
                       trainable_parameters)

SCORES_FORMAT = format_tag("teacher-scores", 1)
RUN_FORMAT = format_tag("tune-run", 1)
MINED = 8  # hard-negative pool per training query (sample_batch draws from the top 8, as in the recipe)


@dataclass(frozen=True)
class TuneSettings:
    """What `tune` trains and how. exit_layer / band default to the shipped student's proportions (exit after
    3/4 of the layers, band [L/4, 5L/8): 6 and [2, 5) of 8 layers)."""

    exit_layer: int | None = None
    band: tuple[int, int] | None = None
    keep_ratio: float = 0.5
    query_positions: str = "shared"
    steps: int = 300
    groups: int = 2  # queries with distinct source pages per step
    hard: int = 3  # first-stage hard negatives per query
    extra_queries: int = 2  # further queries of pages already in the batch
    lr: float = 3e-4
    warmup: int = 10
    label_weight: float = 0.5
    holdout: float = 0.2
    candidates: int = 10  # first-stage top-k reranked per held-out query
    seed: int = 0
    ckpt_every: int = 20
    log_every: int = 10
    # listwise=True: a cached listwise (ZipRerank-style) student instead of the point-wise one (`_train_listwise`)
    # Its defaults are the setting that measured best on the toy (README, "A listwise student"): the analytic
    # read-back head the shipped listwise models use, "[" reading the label tokens alone, no copy task (alone it
    # stays at chance on fresh windows, and it pulls a relevance-keyed head back to even labels).
    listwise: bool = False
    copy_weight: float = 0.0  # listwise: weight of the copy task next to the ranking loss
    attn_scale: float = 1.0  # listwise: attention sharpening of the trained layers (1: none)
    readback_init: int = 60  # listwise: fit an analytic read-back head on this many windows first (0: none)
    readback_relevance: float = HEAD_RELEVANCE  # listwise: key that head on each label's own judgement (0: evenly)
    readback_copy_scale: float = HEAD_COPY_SCALE  # listwise: a copied label's norm against the state at "["
    readout: str = "labels"  # listwise: ListwiseConfig.readout ("labels": "[" reads the label tokens only there)

    def check(self) -> TuneSettings:
        check_choice("query_positions", self.query_positions, ("exact", "shared"))
        check_choice("readout", self.readout, ("all", "labels"))
        check_ratio("keep_ratio", self.keep_ratio)
        check_ratio("holdout", self.holdout)
        for name in ("steps", "groups", "candidates", "ckpt_every", "log_every"):
            check_positive_int(name, getattr(self, name))
        for name in ("hard", "extra_queries", "warmup", "readback_init"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.keep_ratio <= 0:
            raise ConfigError(f"keep_ratio must be > 0, got {self.keep_ratio!r}")
        if not isinstance(self.readback_relevance, (int, float)) or self.readback_relevance < 0:
            raise ConfigError(f"readback_relevance must be a number >= 0, got {self.readback_relevance!r}")
        if not isinstance(self.readback_copy_scale, (int, float)) or self.readback_copy_scale <= 0:
            raise ConfigError(f"readback_copy_scale must be a number > 0, got {self.readback_copy_scale!r}")
        if not isinstance(self.copy_weight, (int, float)) or self.copy_weight < 0:
            raise ConfigError(f"copy_weight must be a number >= 0, got {self.copy_weight!r}")
        if not isinstance(self.attn_scale, (int, float)) or self.attn_scale <= 0:
            raise ConfigError(f"attn_scale must be a number > 0, got {self.attn_scale!r}")
        return replace(self, band=tuple(self.band) if self.band is not None else None)

    def config(self, num_layers: int, tokenizer, template: PromptTemplate, max_visual_tokens: int) -> RerankConfig:
        """The student's RerankConfig (resolved for a model of `num_layers` layers; float32 for training)."""
        exit_layer = self.exit_layer if self.exit_layer is not None else max(1, round(0.75 * num_layers))
        band = self.band
        if band is None:
            b0 = min(round(0.25 * num_layers), exit_layer - 1)
            band = (b0, min(exit_layer, max(b0 + 1, round(0.625 * num_layers))))
        offset = shared_offset_for(tokenizer, template, max_visual_tokens) if self.query_positions == "shared" else None
        return RerankConfig(exit_layer=exit_layer, band=tuple(band), keep_ratio=self.keep_ratio,
                            query_positions=self.query_positions, shared_offset=offset, dtype="float32"
                            ).resolve(num_layers)


# --- the held-out split -------------------------------------------------------------------------------------
def _rank_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_by_page(queries: Sequence[CalibrationQuery], share: float, seed: int = 0
                  ) -> tuple[list[CalibrationQuery], list[CalibrationQuery], set[str]]:
    """(training queries, held-out queries, held-out pages). Queried pages, in a seeded order, are held out with
    all their queries until `share` of the queries is; at least one queried page stays for training. Queries
    without a source page are held out one by one (seeded)."""
    by_page: dict[str, list[CalibrationQuery]] = {}
    for q in queries:
        if q.page_id is not None:
            by_page.setdefault(q.page_id, []).append(q)
    target = max(1, round(share * len(queries))) if share > 0 else 0
    held_pages: set[str] = set()
    n = 0
    for page in sorted(by_page, key=lambda p: _rank_key(seed, p)):
        if n >= target or len(held_pages) >= len(by_page) - 1:
            break
        held_pages.add(page)
        n += len(by_page[page])
    held = [q for q in queries if (q.page_id in held_pages if q.page_id is not None
                                   else int(_rank_key(seed, q.query)[:8], 16) / 16**8 < share)]
    held_ids = {id(q) for q in held}
    return [q for q in queries if id(q) not in held_ids], held, held_pages


def resolve_queries(queries: Sequence[CalibrationQuery | str | Mapping], pages: Sequence[Page]) -> list[CalibrationQuery]:
    """Queries as CalibrationQuery with `page_id` naming one of `pages` (given by page id, by file name or file
    stem, or by an ingested id without its content-hash suffix); duplicate query texts are dropped."""
    names: dict[str, str] = {}
    for p in pages:
        for name in _page_names(p):
            names.setdefault(name, p.id)
    out, seen = [], set()
    for q in queries:
        if isinstance(q, str):
            q = CalibrationQuery(check_query(q))
        elif isinstance(q, Mapping):
            q = CalibrationQuery(check_query(q.get("query")), q.get("page") or q.get("page_id"))
        page = q.page_id
        if page is not None:
            if page not in names:
                raise ConfigError(f"query {q.query!r} names page {page!r}, which is not among the {len(pages)} pages")
            page = names[page]
        if q.query not in seen:
            seen.add(q.query)
            out.append(CalibrationQuery(q.query, page))
    if not out:
        raise InvalidQueryError("tune needs at least one query")
    return out


def _page_names(page: Page) -> list[str]:
    names = [page.id]
    head, _, tail = page.id.rpartition("-")
    if head and len(tail) == 12:  # ingest's ids end in "-<content hash[:12]>"
        names.append(head)
    source = page.metadata.get("image_path") or page.source
    if source:
        names += [Path(source).name, Path(source).stem]
    return names


# --- teacher scores, kept on disk -------------------------------------------------------------------------------
class TeacherScores:
    """The teacher's dense score of each (query, page) pair, in a JSON file written atomically, and the time they
    took (seconds per pair, for the time ratio)."""

    def __init__(self, path: str | os.PathLike[str], teacher: str):
        self.path, self.teacher = Path(path), teacher
        self.scores: dict[str, dict[str, float]] = {}
        self.seconds, self.pairs = 0.0, 0
        if self.path.exists():
            doc = read_json(self.path, format=SCORES_FORMAT)
            if doc["teacher"] != teacher:
                raise ConfigError(f"{self.path} holds scores of teacher {doc['teacher']!r}, not {teacher!r}: use another --out")
            self.scores = doc["scores"]
            self.seconds, self.pairs = float(doc["timing"]["seconds"]), int(doc["timing"]["pairs"])

    def __contains__(self, pair: tuple[str, str]) -> bool:
        return pair[1] in self.scores.get(pair[0], {})

    def __getitem__(self, pair: tuple[str, str]) -> float:
        return self.scores[pair[0]][pair[1]]

    def __len__(self) -> int:
        return sum(len(v) for v in self.scores.values())

    @property
    def seconds_per_pair(self) -> float:
        return self.seconds / self.pairs if self.pairs else math.nan

    def add(self, query: str, page_ids: Sequence[str], scores: Sequence[float], seconds: float) -> None:
        self.scores.setdefault(query, {}).update(zip(page_ids, map(float, scores)))
        self.seconds += seconds
        self.pairs += len(page_ids)

    def save(self) -> None:
        write_json(self.path, {"teacher": self.teacher, "scores": self.scores,
                               "timing": {"seconds": self.seconds, "pairs": self.pairs}}, format=SCORES_FORMAT)

    def fill(self, ckpt: Any, pairs: Mapping[str, Sequence[str]], pages: Mapping[str, Page], *, device: torch.device,
             amp: torch.dtype | None, flush_every: float = 60.0, show_progress: bool = False) -> int:
        """Score the pairs not yet known with the teacher's own dense forward; returns how many were scored."""
        todo = {q: [p for p in dict.fromkeys(ps) if (q, p) not in self] for q, ps in pairs.items()}
        todo = {q: ps for q, ps in todo.items() if ps}
        total = sum(len(ps) for ps in todo.values())
        bar = progress(total, 0, "teacher scores", not show_progress)
        last = time.time()
        for q, ps in todo.items():
            t = time.perf_counter()
            with autocast(device, amp):
                scores = ckpt.dense_scores(q, [pages[p] for p in ps])
            self.add(q, ps, scores, time.perf_counter() - t)
            bar.update(len(ps))
            if time.time() - last > flush_every:
                self.save()
                last = time.time()
        bar.close()
        if total:
            self.save()
        return total


# --- losses and batches -----------------------------------------------------------------------------------------
def student_loss(scores: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor,
                 label_weight: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """The recipe's student loss on an (M, N) batch: `label_weight * label_loss` over the rows whose query has
    its source page in the batch, plus `distill_loss` to the teacher's scores over every row."""
    loss = distill_loss(scores, teacher)
    parts = {"distill": float(loss.detach())}
    if bool(labelled.any()):
        lab = label_loss(scores[labelled], labels[labelled])
        loss = loss + label_weight * lab
        parts["label_loss"] = float(lab.detach())
    return loss, parts


@dataclass
class Batches:
    """The training batches: batch `step` is drawn by the recipe's `sample_batch` from Random(f"{seed}:{step}"), so
    it is the same in every run (the teacher pairs are known in advance; a resumed run sees the same batches)."""

    queries: list[dict]  # {"qid", "query", "positive", "hard_negatives", "labelled"}
    groups: int
    hard: int
    extra: int
    seed: int
    by_page: dict[str, list[dict]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_page = {}
        for q in self.queries:
            if q["labelled"]:
                self.by_page.setdefault(q["positive"], []).append(q)

    def __call__(self, step: int) -> tuple[list[str], list[dict]]:
        rng = random.Random(f"{self.seed}:{step}")
        pages, qs = sample_batch(None, self.by_page, self.queries, rng, self.groups, self.hard, self.extra)
        return pages, list({q["qid"]: q for q in qs}.values())


# --- the held-out report ------------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """A student measured on held-out queries against the teacher (see `evaluate_heldout`)."""

    n_queries: int
    n_pages: int  # held-out (unseen) pages
    candidates_per_query: float
    agreement_ndcg5: float  # the student's ranking against the teacher's, teacher's top 5 graded 5..1
    agreement_top1: float
    student_ndcg5: float | None  # against the queries' source pages (None when no query has one)
    teacher_ndcg5: float | None
    first_stage_recall: float | None  # share of labelled queries whose page is among the candidates
    student_seconds_per_query: float  # mini setting, page caches filled beforehand
    teacher_seconds_per_query: float  # dense forward of every candidate
    per_query: list[dict] = field(default_factory=list, repr=False)

    @property
    def time_ratio(self) -> float:
        return self.student_seconds_per_query / self.teacher_seconds_per_query if self.teacher_seconds_per_query else math.nan

    @property
    def retention(self) -> float | None:
        """Student nDCG@5 / teacher nDCG@5 (labels)."""
        if self.student_ndcg5 is None or not self.teacher_ndcg5:
            return None
        return self.student_ndcg5 / self.teacher_ndcg5

    def summary(self) -> dict[str, Any]:
        r = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 5)  # noqa: E731
        return {"queries": self.n_queries, "heldout_pages": self.n_pages,
                "candidates_per_query": round(self.candidates_per_query, 2),
                "agreement_ndcg5": r(self.agreement_ndcg5), "agreement_top1": r(self.agreement_top1),
                "student_ndcg5": r(self.student_ndcg5), "teacher_ndcg5": r(self.teacher_ndcg5),
                "retention": r(self.retention), "first_stage_recall": r(self.first_stage_recall),
                "student_seconds_per_query": r(self.student_seconds_per_query),
                "teacher_seconds_per_query": r(self.teacher_seconds_per_query), "time_ratio": r(self.time_ratio)}


def agreement(student: Sequence[Sequence[str]], teacher: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Mean nDCG@5 of each student ranking against the teacher's (graded 5..1 by the teacher's top 5), and the
    share of queries whose top page is the teacher's."""
    n = max(1, len(student))
    return (sum(_ndcg5(s, t) for s, t in zip(student, teacher)) / n,
            sum(bool(s) and bool(t) and s[0] == t[0] for s, t in zip(student, teacher)) / n)


def evaluate_heldout(reranker: Any, first_stage: Any, pages: Mapping[str, Page], queries: Sequence[CalibrationQuery],
                     candidates: Mapping[str, Sequence[str]], teacher: TeacherScores, *, n_pages: int = 0,
                     show_progress: bool = False) -> HeldOut:
    """Rerank each held-out query's candidates (page ids, first-stage order) with `reranker` (a MiniReranker or a
    ListwiseReranker;
    pruning maps from `first_stage`'s embedder and index), and compare with the teacher's scores of the same
    candidates. Time: `reranker.rerank` per query with every page's cache filled beforehand, against the teacher's
    measured seconds per pair times the candidates per query."""
    from ..retrieval.importance import query_importance

    needs_maps = reranker.pruning.keep_ratio < 1.0
    q_embs = dict(zip([q.query for q in queries], first_stage.embedder.encode_queries([q.query for q in queries])))
    cands = {}
    for q in queries:
        row = []
        for pid in candidates[q.query]:
            page = pages[pid]
            imp = query_importance(q_embs[q.query], first_stage.index.embedding(pid), reranker.visual_grid(page)) \
                if needs_maps else None
            row.append(Candidate(page, importance=imp))
        cands[q.query] = row
    reranker.index(list({c.page_id: c.page for cs in cands.values() for c in cs}.values()), show_progress=show_progress)
    seconds, per_query = 0.0, []
    for q in queries:
        t = time.perf_counter()
        results = reranker.rerank(q.query, cands[q.query])
        seconds += time.perf_counter() - t
        ids = list(candidates[q.query])
        t_scores = [teacher[q.query, p] for p in ids]
        t_rank = [ids[i] for i in sorted(range(len(ids)), key=lambda i: -t_scores[i])]
        per_query.append({"query": q.query, "page": q.page_id, "candidates": ids, "teacher_scores": t_scores,
                          "teacher_ranking": t_rank, "student_ranking": [r.page_id for r in results],
                          "student_scores": [float(r.score) for r in results]})
    n = max(1, len(queries))
    agree_ndcg, agree_top1 = agreement([r["student_ranking"] for r in per_query], [r["teacher_ranking"] for r in per_query])
    labelled = [r for r in per_query if r["page"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if labelled else None  # noqa: E731
    n_cand = sum(len(r["candidates"]) for r in per_query) / n
    return HeldOut(
        n_queries=len(queries), n_pages=n_pages, candidates_per_query=n_cand,
        agreement_ndcg5=agree_ndcg, agreement_top1=agree_top1,
        student_ndcg5=mean([ndcg_at(r["student_ranking"], {r["page"]}, 5) for r in labelled]),
        teacher_ndcg5=mean([ndcg_at(r["teacher_ranking"], {r["page"]}, 5) for r in labelled]),
        first_stage_recall=mean([float(r["page"] in r["candidates"]) for r in labelled]),
        student_seconds_per_query=seconds / n, teacher_seconds_per_query=teacher.seconds_per_pair * n_cand,
        per_query=per_query)


@dataclass
class TuneReport:
    """What `tune` did: where the student is, the setting it was trained in, the steps, the held-out report."""

    out: Path
    config: RerankConfig
    template: PromptTemplate
    teacher: str
    teacher_prompt: str  # "vision-first" or "query-first"
    embedder: str
    steps: int
    n_train_queries: int
    heldout: HeldOut | None
    teacher_pairs_scored: int  # by this run (0 when every pair came from OUT/run/teacher_scores.json)
    seconds: float
    kind: str = "pointwise"  # or "listwise" (a ListwiseReranker folder, cached layout)

    def setting(self) -> str:
        c = self.config
        return f"exit {c.exit_layer}, band [{c.band[0]}, {c.band[1]}), keep {c.keep_ratio:g}, {c.query_positions} positions"

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {"out": str(self.out), "kind": self.kind, "teacher": self.teacher, "teacher_prompt": self.teacher_prompt,
                "embedder": self.embedder, "setting": {"exit_layer": c.exit_layer, "band": list(c.band),
                                                       "keep_ratio": c.keep_ratio, "query_positions": c.query_positions},
                "steps": self.steps, "train_queries": self.n_train_queries,
                "teacher_pairs_scored": self.teacher_pairs_scored, "seconds": round(self.seconds, 1),
                "heldout": self.heldout.summary() if self.heldout else None}

    def table(self) -> str:
        lines = [f"student: {self.setting()}; {self.steps} steps on {self.n_train_queries} queries "
                 f"(teacher {self.teacher}, {self.teacher_prompt})"]
        h = self.heldout
        student = "student (listwise, cached pages)" if self.kind == "listwise" else "student (mini, cached pages)"
        if h is None:
            lines.append("no held-out queries (holdout=0): no report")
        else:
            f = lambda v, p=4: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa: E731
            head = f"{'held-out':34s} {'nDCG@5':>7s} {'agree nDCG@5':>12s} {'agree top-1':>11s} {'s/query':>9s} {'x dense':>8s}"
            lines += [head, "-" * len(head),
                      f"{'teacher (dense forward)':34s} {f(h.teacher_ndcg5):>7s} {1.0:12.4f} {1.0:11.3f} "
                      f"{f(h.teacher_seconds_per_query):>9s} {1.0:8.4f}",
                      f"{student:34s} {f(h.student_ndcg5):>7s} {h.agreement_ndcg5:12.4f} "
                      f"{h.agreement_top1:11.3f} {f(h.student_seconds_per_query):>9s} {f(h.time_ratio):>8s}",
                      f"{h.n_queries} queries on {h.n_pages} unseen pages, {h.candidates_per_query:g} first-stage "
                      f"candidates each (first-stage recall {f(h.first_stage_recall, 3)}); "
                      f"retention {f(h.retention, 3)} of the teacher's nDCG@5"]
        cls = "ListwiseReranker" if self.kind == "listwise" else "MiniReranker"
        lines.append(f"saved to {self.out} ({cls}.from_pretrained({str(self.out)!r}))")
        return "\n".join(lines)


# --- tune ---------------------------------------------------------------------------------------------------------
def default_embedder(model_config: Any) -> str:
    """The shipped ColQwen3 when the reranker has its vision tower config, else ConfigError (pass one)."""
    from transformers import AutoConfig

    from ..defaults import DEFAULT_EMBEDDER_DIR

    ignore = {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "architectures"}
    mine = {k: v for k, v in model_config.vision_config.to_dict().items() if k not in ignore}
    shipped = AutoConfig.from_pretrained(str(DEFAULT_EMBEDDER_DIR), local_files_only=True).vision_config.to_dict()
    if mine != {k: v for k, v in shipped.items() if k not in ignore}:
        raise ConfigError("the teacher's vision tower is not the shipped ColQwen3's: pass --embedder (a colpali-engine "
                          "checkpoint, e.g. vidore/colqwen2.5-v0.2) for the hard negatives and the pruning maps")
    return str(DEFAULT_EMBEDDER_DIR)


def tune(teacher: str | os.PathLike[str], pages: Sequence[Page] | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
         out: str | os.PathLike[str], *, queries: Sequence[CalibrationQuery | str | Mapping] | None = None,
         embedder: str | os.PathLike[str] | None = None, device: str = "auto", amp: str = "auto",
         threads: int | None = None, quiet: bool = True, show_progress: bool = False, **settings: Any) -> TuneReport:
    """Distil `teacher` (any checkpoint `load_checkpoint` reads) into a miniReranker on `pages` (Pages, or PDFs /
    images / folders to ingest), with `queries` (default: from the PDFs' text layer), first-stage hard negatives
    and pruning maps from `embedder` (default: the shipped ColQwen3 when the teacher shares its vision tower).
    `settings`: TuneSettings fields (exit_layer, band, keep_ratio, query_positions, steps, ...). Writes the student
    to `out` (resumable: OUT/run/); see the module docstring."""
    from ..engine.devices import resolve_device
    from ..pages import as_pages, ingest
    from ..rerankers import ListwiseReranker, MiniReranker
    from ..rerankers.listwise.settings import listwise_settings, write_listwise_settings
    from ..rerankers.loading import load_checkpoint
    from ..rerankers.page_side import num_layers
    from ..retrieval import FirstStage, PageIndex
    from ..retrieval.index import MANIFEST
    from .models import FrozenVisionCache, visual_module

    t_start = time.time()
    opts = TuneSettings(**settings).check()
    out = Path(out)
    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    dev, amp_dtype = setup_runtime(SimpleNamespace(device=resolve_device(device), amp=amp, threads=threads))
    log = Logger(run / "log.jsonl", quiet=quiet)

    # Pages and queries.
    if isinstance(pages, (str, os.PathLike)) or (pages and not isinstance(list(pages)[0], Page)):
        paths = [pages] if isinstance(pages, (str, os.PathLike)) else list(pages)
        report = ingest(paths, show_progress=show_progress)
        pages = report.pages
        if not pages:
            raise ConfigError(f"no readable pages in {', '.join(map(str, paths))}")
    pages = as_pages(list(pages))
    if not pages:
        raise ConfigError("tune needs at least one page")
    by_id = {p.id: p for p in pages}
    if queries is None:
        queries = queries_from_pdfs([], pages)
        if not queries:
            raise InvalidQueryError("no text layer to draw queries from (scanned pages or images): pass queries")
    queries = resolve_queries(queries, pages)
    train_q, held_q, held_pages = split_by_page(queries, opts.holdout, opts.seed)
    if not train_q:
        raise ConfigError(f"holdout={opts.holdout} leaves no training query ({len(queries)} queries)")

    # Student (the teacher's weights, float32) and its setting.
    ckpt = load_checkpoint(teacher, dtype="float32", device=str(dev))
    if ckpt.head is not None:
        raise ConfigError(f"{ckpt.name}: its own score head ({type(ckpt.head).__name__}) is not a yes/no head; tune "
                          "trains yes/no students only")
    _merge_adapters(ckpt.model)
    model, processor = ckpt.model, ckpt.processor
    template = ckpt.template if ckpt.vision_first else DEFAULT_TEMPLATE
    mvt = max_visual_tokens_of(processor)
    cfg = opts.config(num_layers(model), processor.tokenizer, template, mvt)
    embedder = _name(embedder) if embedder is not None else default_embedder(model.config)
    manifest = {"teacher": _name(ckpt.name), "embedder": embedder, "config": cfg.to_dict(), "holdout": opts.holdout,
                "seed": opts.seed, "groups": opts.groups, "hard": opts.hard, "extra_queries": opts.extra_queries,
                "queries": hashlib.sha256(json.dumps([asdict(q) for q in queries]).encode()).hexdigest(),
                "pages": hashlib.sha256(json.dumps(sorted(by_id)).encode()).hexdigest()}
    if opts.listwise:
        manifest["listwise"] = {"copy_weight": opts.copy_weight, "attn_scale": opts.attn_scale,
                                "readback_init": opts.readback_init, "readback_relevance": opts.readback_relevance,
                                "readback_copy_scale": opts.readback_copy_scale, "readout": opts.readout}
    if (run / "tune.json").exists():
        before = read_json(run / "tune.json", format=RUN_FORMAT)
        changed = sorted(k for k in {*manifest, "listwise"} if before.get(k) != manifest.get(k))
        if changed:
            raise ConfigError(f"{run} belongs to a run with other {', '.join(changed)}: use another output directory")
    write_json(run / "tune.json", manifest, format=RUN_FORMAT)
    log(event="start", teacher=ckpt.name, prompt="vision-first" if ckpt.vision_first else "query-first",
        embedder=embedder, pages=len(pages), queries=len(queries), train_queries=len(train_q),
        heldout_queries=len(held_q), heldout_pages=len(held_pages), config=cfg.to_dict())

    # The frozen tower's features, memoised per page (Qwen3-VL towers; only while they fit in ~2 GB).
    vision_cache = None
    if model.config.model_type == "qwen3_vl":
        vc = model.config.vision_config
        per_page = mvt * vc.out_hidden_size * 4 * (1 + len(getattr(vc, "deepstack_visual_indexes", []) or []))
        if per_page * len(pages) < 2 << 30:
            vision_cache = FrozenVisionCache(visual_module(model))

    # First stage: every page indexed once (OUT/run/index), hard negatives among training pages, held-out candidates.
    rr = MiniReranker(model, processor, cfg, template=template)  # grids and pixel budget; not used for scoring
    index = PageIndex.open(run / "index") if (run / "index" / MANIFEST).exists() else PageIndex.create(run / "index")
    first_stage = FirstStage.from_pretrained(embedder, reranker=rr, index=index, dtype="auto")
    first_stage.add([p for p in pages if p.id not in index], show_progress=show_progress)
    mined_file = run / "first_stage.json"
    if mined_file.exists():
        mined = read_json(mined_file, format=format_tag("tune-first-stage", 1))
    else:
        train_pages = [p.id for p in pages if p.id not in held_pages]
        train_index = PageIndex()
        train_index.add([index.embedding(p) for p in train_pages])
        embs = first_stage.embedder.encode_queries([q.query for q in train_q + held_q])
        mined = {"train": {}, "heldout": {}}
        for q, e in zip(train_q, embs):
            hits = [h.page_id for h in train_index.search(e, min(len(train_pages), MINED + 1))]
            mined["train"][q.query] = [h for h in hits if h != q.page_id][:MINED + (q.page_id is None)]
        for q, e in zip(held_q, embs[len(train_q):]):
            mined["heldout"][q.query] = [h.page_id for h in index.search(e, min(len(index), opts.candidates))]
        write_json(mined_file, mined, format=format_tag("tune-first-stage", 1))
    # A query without a source page takes its first-stage top page as the batch's anchor (distillation only).
    batches = Batches([{"qid": q.query, "query": q.query, "labelled": q.page_id is not None,
                        "positive": q.page_id if q.page_id is not None else mined["train"][q.query][0],
                        "hard_negatives": [p for p in mined["train"][q.query] if p != q.page_id][:MINED]
                        if q.page_id is not None else mined["train"][q.query][1:]} for q in train_q],
                      opts.groups, opts.hard, opts.extra_queries, opts.seed)

    # Teacher scores of every pair the run will use (before any training state is loaded: the weights are the
    # teacher's), scored in the teacher's own prompt.
    pairs: dict[str, list[str]] = {}
    for step in range(opts.steps):
        page_ids, qs = batches(step)
        for q in qs:
            pairs.setdefault(q["query"], []).extend(page_ids)
    for q in held_q:
        pairs.setdefault(q.query, []).extend(mined["heldout"][q.query])
    scores = TeacherScores(run / "teacher_scores.json", _name(ckpt.name))
    scored = scores.fill(ckpt, pairs, by_id, device=dev, amp=amp_dtype, show_progress=show_progress)
    log(event="teacher_scores", scored=scored, known=len(scores), seconds_per_pair=scores.seconds_per_pair)

    # First-stage maps of (query, page) pairs, from the index's page embeddings (query embeddings memoised).
    q_embs: dict[str, torch.Tensor] = {}
    page_embs: dict[str, Any] = {}

    def maps(texts: list[str], page_ids: list[str]) -> list[list[torch.Tensor]]:
        from ..retrieval.importance import query_importance

        new = [t for t in texts if t not in q_embs]
        if new:
            q_embs.update(zip(new, first_stage.embedder.encode_queries(new)))
        for p in page_ids:
            if p not in page_embs:
                page_embs[p] = index.embedding(p)
        return [[query_importance(q_embs[t], page_embs[p], rr.visual_grid(by_id[p])).flat() for p in page_ids]
                for t in texts]

    # Training.
    model.train()
    if opts.listwise:
        step, lw_template, lw_config = _train_listwise(model, processor, cfg, opts, batches, scores, by_id, maps, run,
                                                        dev, amp_dtype, log, show_progress)
    else:
        step = _train_pointwise(model, processor, cfg, template, opts, batches, scores, by_id, maps, run, dev,
                                amp_dtype, log, show_progress)
    model.eval()
    if vision_cache is not None:
        vision_cache.close()

    # The student folder, then the held-out report measured in the setting it was saved with (on a GPU: bf16).
    model.save_pretrained(out)
    processor.save_pretrained(out)
    saved = cfg.replace(dtype="auto", device="auto")  # the loading machine's own device and precision
    heldout = None
    if held_q:
        if opts.listwise:
            student = ListwiseReranker(model, processor, lw_config.replace(device=str(dev), dtype="float32"),
                                       template=lw_template)
        else:
            student = MiniReranker(model, processor, saved.replace(device=str(dev)), template=template)
        heldout = evaluate_heldout(student, first_stage, by_id, held_q, mined["heldout"], scores,
                                   n_pages=len(held_pages), show_progress=show_progress)
        write_json(run / "heldout.json", {**heldout.summary(), "per_query": heldout.per_query},
                   format=format_tag("tune-heldout", 1))
        log(event="heldout", **heldout.summary())
    training = {"by": "minirerank tune", "teacher": ckpt.name, "teacher_prompt": "vision-first" if ckpt.vision_first
                else "query-first", "steps": step, "train_queries": len(train_q), "label_weight": opts.label_weight,
                "lr": opts.lr, "heldout": heldout.summary() if heldout else None}
    if opts.listwise:
        training.update(kind="listwise", frozen_below=cfg.band[1], copy_weight=opts.copy_weight,
                        attn_scale=opts.attn_scale, readback_init=opts.readback_init,
                        readback_relevance=opts.readback_relevance, readback_copy_scale=opts.readback_copy_scale,
                        readout=opts.readout)
        write_listwise_settings(out, listwise_settings([lw_config.replace(dtype="auto", device="auto")], lw_template),
                                embedder=embedder, training=training)
    else:
        write_settings(out, saved, template, max_visual_tokens=mvt, embedder=embedder, training=training)
    return TuneReport(out, saved, template, ckpt.name, training["teacher_prompt"], embedder, step, len(train_q),
                      heldout, scored, time.time() - t_start, kind="listwise" if opts.listwise else "pointwise")


def _train_pointwise(model, processor, cfg: RerankConfig, template: PromptTemplate, opts: TuneSettings,
                     batches: Batches, scores: TeacherScores, by_id: Mapping[str, Page], maps, run: Path,
                     dev: torch.device, amp_dtype, log, show_progress: bool) -> int:
    """The point-wise student's loop (the recipe's losses through the engine's cached path); returns the step."""
    scorer = PairScorer(model, processor, cfg, template)
    params = trainable_parameters(model, cfg.exit_layer)
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01)
    state = load_training_state(run / "ckpt", model, opt)
    step = state["step"] if state else 0
    log(event="train", step=step, steps=opts.steps, trainable=sum(p.numel() for p in params))
    bar = progress(opts.steps, step, "tune", not show_progress)
    t_last = time.time()
    while step < opts.steps:
        page_ids, qs = batches(step)
        images = [by_id[p].image() for p in page_ids]
        texts = [q["query"] for q in qs]
        labels = torch.tensor([[float(q["positive"] == p) for p in page_ids] for q in qs], device=dev)
        labelled = torch.tensor([q["labelled"] for q in qs], device=dev)
        t_scores = torch.tensor([[scores[t, p] for p in page_ids] for t in texts], device=dev)
        imp = maps(texts, page_ids) if cfg.keep_ratio < 1.0 else None
        set_lr(opt, lr_at(step, opts.steps, opts.lr, opts.warmup))
        with autocast(dev, amp_dtype):
            s = scorer(images, texts, imp).float()
            loss, parts = student_loss(s, t_scores, labels, labelled, opts.label_weight)
        optimizer_step(opt, loss, params)
        step += 1
        bar.update(1)
        if step % opts.log_every == 0 or step == opts.steps:
            log(step=step, loss=float(loss.detach()), pages=len(page_ids), queries=len(qs),
                sec_per_step=(time.time() - t_last) / opts.log_every, **parts)
            t_last = time.time()
        if step % opts.ckpt_every == 0 or step == opts.steps:
            save_checkpoint(run / "ckpt", model, opt, step)
    bar.close()
    return step


def _train_listwise(model, processor, cfg: RerankConfig, opts: TuneSettings, batches: Batches, scores: TeacherScores,
                    by_id: Mapping[str, Page], maps, run: Path, dev: torch.device, amp_dtype, log, show_progress: bool):
    """A cached listwise student on the same batches: for each query of a batch, one window of the batch's pages
    (its source page among them, at most 20, in a seeded random order), scored by the label logits after "["
    and trained with the listwise stage's window loss (RankNet on the source page + soft-ranking distillation of
    the teacher's scores) plus the copy task. The layers below the band's end stay the teacher's, so each page's
    band KV is the teacher's page cache, prefilled once; the layers from there to the exit learn to compare the
    labels. Returns (step, template, ListwiseConfig)."""
    from ..engine.families import adapter_for
    from ..rerankers.listwise import ListwiseConfig
    from ..rerankers.listwise.prompt import DEFAULT_LISTWISE_TEMPLATE
    from .listwise import TRAINED_CACHED_LABEL, ListwiseScorer, accumulate, copy_loss, copy_window, window_loss
    from .models import sharpen_attention
    from .readback import readback_init

    template = replace(DEFAULT_LISTWISE_TEMPLATE, cached_label=TRAINED_CACHED_LABEL)
    lcfg = ListwiseConfig(mode="cached", exit_layer=cfg.exit_layer, band=tuple(cfg.band), keep_ratio=cfg.keep_ratio,
                          readout=opts.readout, dtype="float32", device=str(dev))
    lcfg.resolve(adapter_for(model).num_layers)  # a read-out layer inside the band is refused before any work
    scorer = ListwiseScorer(model, processor, template)
    scorer.readout = opts.readout
    scorer.frozen_kv = {}  # the frozen page side: the teacher's band KV, once per page
    n_max = len(lcfg.labels)
    params = trainable_parameters(model, cfg.exit_layer, first_layer=cfg.band[1])
    fresh = not has_checkpoint(run / "ckpt")  # a resumed run's checkpoint already holds what follows
    if opts.attn_scale != 1.0 and fresh:
        sharpen_attention(adapter_for(model), range(cfg.band[1], cfg.exit_layer), opts.attn_scale)
    if opts.readback_init and fresh:
        frozen = []
        for step in range(opts.steps):
            page_ids, qs = batches(step)
            for q in qs:
                ids = page_ids[:n_max]
                imp = maps([q["query"]], ids)[0] if cfg.keep_ratio < 1.0 else None
                frozen.append(scorer.cached_frozen(q["query"], [by_id[p].image() for p in ids], cfg.exit_layer,
                                                   tuple(cfg.band), cfg.exit_layer - 1, cfg.keep_ratio, imp, page_ids=ids))
            if len(frozen) >= opts.readback_init:
                break
        fit = readback_init(scorer, frozen[: opts.readback_init], opts.readback_relevance,
                            copy_scale=opts.readback_copy_scale)
        log(event="readback_init", layer=cfg.exit_layer - 1, windows=len(frozen[: opts.readback_init]),
            probe_labels=round(fit.probe_labels, 3), probe_others=round(fit.probe_others, 3))
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01)
    state = load_training_state(run / "ckpt", model, opt)
    step = state["step"] if state else 0
    log(event="train", kind="listwise", step=step, steps=opts.steps, trainable=sum(p.numel() for p in params))
    bar = progress(opts.steps, step, "tune --listwise", not show_progress)
    t_last = time.time()

    def window(query: str, ids: list[str], labels: list[str] | None = None) -> torch.Tensor:
        imp = maps([query], ids)[0] if cfg.keep_ratio < 1.0 else None
        with autocast(dev, amp_dtype):
            return scorer.cached(query, [by_id[p].image() for p in ids], cfg.exit_layer, tuple(cfg.band),
                                 cfg.keep_ratio, imp, page_ids=ids, labels=labels).logits

    while step < opts.steps:
        page_ids, qs = batches(step)
        set_lr(opt, lr_at(step, opts.steps, opts.lr, opts.warmup))
        opt.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        for k, q in enumerate(qs):
            rng = random.Random(f"{opts.seed}:listwise:{step}:{k}")
            others = [p for p in page_ids if p != q["positive"]]
            rng.shuffle(others)
            ids = [q["positive"]] + others[: n_max - 1]
            rng.shuffle(ids)
            pos = ids.index(q["positive"]) if q["labelled"] else None
            loss, lp = window_loss(window(q["query"], ids), pos, [scores[q["query"], p] for p in ids])
            total = loss
            if opts.copy_weight > 0:
                c_ids, c_labels = copy_window(q["positive"], page_ids, scorer.labels, rng)
                c = copy_loss(window(q["query"], c_ids, c_labels), [scorer.labels.index(x) for x in c_labels])
                total = total + opts.copy_weight * c
                lp["copy"] = float(c.detach())
            (total / len(qs)).backward()
            accumulate(parts, {"loss": float(loss.detach()), **lp}, len(qs))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % opts.log_every == 0 or step == opts.steps:
            log(step=step, pages=len(page_ids), queries=len(qs), sec_per_step=(time.time() - t_last) / opts.log_every,
                **parts)
            t_last = time.time()
        if step % opts.ckpt_every == 0 or step == opts.steps:
            save_checkpoint(run / "ckpt", model, opt, step)
    bar.close()
    return step, template, lcfg


def _name(path_or_id: str | os.PathLike[str]) -> str:
    """A local checkpoint by its absolute path (a rerun from another directory is the same run), else the hub id."""
    return str(Path(path_or_id).resolve()) if Path(path_or_id).exists() else str(path_or_id)


def _merge_adapters(model: torch.nn.Module) -> None:
    """Fold a PEFT adapter that transformers applied at load (MonoQwen2-VL) into the weights it adapts, so the
    student trains and saves as one plain checkpoint."""
    if not getattr(model, "_hf_peft_config_loaded", False):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    model._hf_peft_config_loaded = False
    if hasattr(model, "peft_config"):
        del model.peft_config
    # The key renamings recorded while loading the adapter (prefix "base_model.model.", legacy names) would be
    # reversed by save_pretrained; the merged weights save under the model's own names.
    model._weight_conversions = None


__all__ = ["Batches", "HeldOut", "TeacherScores", "TuneReport", "TuneSettings", "agreement", "default_embedder",
           "evaluate_heldout", "resolve_queries", "split_by_page", "student_loss", "tune"]
