"""Stage `listwise`: a ZipRerank listwise student, distilled from the dense point-wise teacher.

    python -m minirerank_core.train.listwise --data DATA --init RUN/teacher/final --teacher RUN/teacher/final \\
        --embedder RUN/embedder/final --out RUN/listwise

The student trains through the listwise reranker's own inference code, differentiably:

  single pass (ZipRerank)  query first, pages labelled [A]..., "[" appended, the label logits as scores; pages
                           pruned by QI-EI at --keep-ratio with their original M-RoPE positions
                           (single_pass.window_sequence / pruned_sequence / single_pass_logits)
  cached (vision-first)    each page's band KV from the point-wise page prefill (engine.prefill.prefill_pages,
                           differentiable), one query segment with bound labels (cached.cached_window /
                           cached_logits) at --cached-exit-layer / --cached-band / --cached-keep-ratio

Both layouts train the same weights (--layouts picks which; each step runs the same candidates in both, each in
its own shuffled order). A step is one window of one training query: its positive page, first-stage hard
negatives (the embedder's top pages, mined once into OUT/mined_negatives.json) with a --random-frac share
replaced by random training pages, --min-window..--window candidates in all, in random order, so no position
carries the label. Loss per layout (train/listwise_losses.py):

    --ranknet-weight x RankNet(scores, labels)
  + --distill-weight x soft-ranking distillation (positive first, then the teacher's order; weights decay^k)

The teacher is a MiniReranker over the teacher checkpoint in its saved (dense) config. Windows come from
random.Random(f"{seed}:{step}"), so every (query, page) pair the run will need is known before training: their
teacher scores are computed first, page by page (each page's KV once), and kept in OUT/teacher_scores.json; a
resumed or extended run computes only the pairs it lacks. Training resumes from OUT/ckpt (model, optimizer,
step). The vision tower, the token embeddings (tied to the label head) stay frozen.

Options for a student that has never had to read a label back (docs/DESIGN.md, listwise training):
--template readback (the default) puts each label after the point-wise question about its page and keeps label
tokens out of the fixed text (--label / --label-after-page / --cached-label override parts); --freeze-below keeps
the layers below it as the init has them (at or above the cached band's end the page KV is the init's point-wise
page cache, prefilled once per page); --readback-init N writes an analytic read-back head into the cached layout's
last layer (train/readback.py); --copy-warmup / --copy-weight add the copy task (copy_loss); --attn-scale sharpens
the trained layers' attention; --pool N trains epochs over N fixed windows whose frozen layers run once;
--distill-weight 0 runs no teacher; --windows-per-step accumulates several windows per step. For the single pass:
--single-pass-aux relevance --label-weight 0 trains each page's label token to judge its page (the cached layout's
relevance loss, at --bind-layer) with no loss at "[" yet; --layouts single_pass --readback-init N --readout labels
then fits the read-back head in the last layer on single-pass windows (docs/DESIGN.md has what each measured).

Validation reranks each validation query's first-stage top --eval-candidates (the embedder's exact MaxSim over
the split) with ListwiseReranker, the inference facade. OUT/final is a save_pretrained folder whose
minirerank_config.json holds one ListwiseConfig per trained layout (`ListwiseReranker.from_pretrained(OUT/final)`
runs single pass as trained; `mode="cached"` the cached layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.families import adapter_for
from ..engine.prefill import prefill_pages, prefix_kv, tokenize
from ..engine.prompt import DEFAULT_TEMPLATE, YesNoHead, label_token_id
from ..engine.scorer import kept_rows
from ..fileio import format_tag, read_json, write_json
from ..rerankers.listwise.cached import CachedWindow, cached_answer, cached_states, cached_window, readout_layer
from ..rerankers.listwise.config import RANKGPT_LABELS, ListwiseConfig
from ..rerankers.listwise.prompt import DEFAULT_LISTWISE_TEMPLATE, LabelHead, ListwiseTemplate, single_token_ids
from ..rerankers.listwise.settings import listwise_settings, write_listwise_settings
from ..rerankers.listwise.single_pass import encode_pages, single_pass_logits, window_sequence
from .common import (Logger, add_runtime_args, autocast, has_checkpoint, load_checkpoint, lr_at, progress,
                     save_checkpoint, set_lr, setup_runtime)
from .data import DataSet
from .listwise_losses import ranknet_loss, soft_ranking_loss
from .metrics import summarize
from .models import FrozenVisionCache, n_params, sharpen_attention, visual_module

SCORES_FORMAT = format_tag("listwise-teacher-scores", 1)
# The trained model's label segment: the point-wise question about the page (the page is judged there, as the
# point-wise student judges it), then the label, so the label token carries the judgement.
TRAINED_CACHED_LABEL = ("\nquery: {query}\ndoes the page answer the query?<|im_end|>\n<|im_start|>assistant\n"
                        "{label}")
# Its prompt: no token of the fixed text is a label token. RankGPT's wording ("Query", "Does", "Rank", "List", "I
# will", ...) puts the single-letter tokens Q, D, R, L, I, ... of a small vocabulary into every window, 63 label
# tokens for 20 labels, so "[" cannot copy "the label tokens" without also knowing where each one sits.
READBACK_TEMPLATE = ListwiseTemplate(
    prefix="<|im_start|>system\nyou rank pages by their relevance to a search query.<|im_end|>\n<|im_start|>user\n",
    intro="here are {n} pages, each with an identifier. the search query: {query}\n",
    label=TRAINED_CACHED_LABEL,
    instruction="\nsearch query: {query}\nrank the {n} pages above by their relevance to the search query, the most "
                "relevant first, as [] > [].<|im_end|>\n<|im_start|>assistant\n",
    cached_label=TRAINED_CACHED_LABEL,
    label_after_page=True,
)
TEMPLATES = {"rankgpt": DEFAULT_LISTWISE_TEMPLATE, "readback": READBACK_TEMPLATE}
LAYOUTS = ("single_pass", "cached")


# --- the student's forward: the reranker's own window code, with gradients ------------------------------------------
class LayerTap:
    """Records the output of one LM decoder layer (a forward hook; the inference code is unchanged)."""

    def __init__(self, adapter, layer: int):
        self.out: torch.Tensor | None = None
        self.handle = adapter.layers[layer].register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.out = output[0] if isinstance(output, tuple) else output

    def close(self) -> None:
        self.handle.remove()


@dataclass
class FrozenWindow:
    """A cached-layout window and its query states entering layer `split` (None: from the embeddings, split 0)."""
    window: CachedWindow
    exit_layer: int
    band: tuple[int, int]
    split: int
    hidden: torch.Tensor | None
    labels: Sequence[str] | None = None


@dataclass
class WindowOutput:
    logits: torch.Tensor  # (n,) label logits, the scores
    anchors: torch.Tensor | None = None  # (m, H) hidden states of the anchor rows at the tapped layer
    owners: torch.Tensor | None = None  # (m,) the page (label index) of each anchor row


class ListwiseScorer:
    """Label logits of one window, for training, built by the same functions ListwiseReranker runs.

    With `tap_layer`, also the hidden states after that layer at the anchor rows the auxiliary losses read: single
    pass, every kept visual token (owner: its page); cached, the last token of each page's label segment L_i
    (it sees the query and only its own page).

    Why auxiliaries: the point-wise teacher already matches query tokens to the page cells that show them. A label
    logit needs two more things it never learnt: which label a page carries, and which page is best. Single pass
    (ZipRerank's layout): the instruction's query tokens attend to matching cells across all pages, so cells that
    carry their page's label hand it to the query tokens, and the final token reads it; the binding loss teaches
    the cells their label early (--bind-layer), which the label loss alone did not do in a few hundred steps on
    this CPU. Cached: each label segment sees only its page, so its last token can score the page as the
    point-wise head does (the relevance loss, --relevance-layer); the tail compares the labels.
    """

    def __init__(self, model: torch.nn.Module, processor, template: ListwiseTemplate = DEFAULT_LISTWISE_TEMPLATE,
                 labels: Sequence[str] = RANKGPT_LABELS, image_batch: int = 32):
        self.model, self.processor, self.template = model, processor, template
        self.tok = processor.tokenizer
        self.adapter = adapter_for(model)
        self.labels = tuple(labels)
        self.head = LabelHead(model.lm_head, single_token_ids(self.tok, self.labels, "labels"))
        self.relevance = YesNoHead(model.lm_head, label_token_id(self.tok, DEFAULT_TEMPLATE.positive),
                                   label_token_id(self.tok, DEFAULT_TEMPLATE.negative))
        self.answer_id = single_token_ids(self.tok, [template.answer], "the answer prefix")[0]
        self.prefix_ids = tokenize(self.tok, template.prefix)
        self.image_batch = image_batch
        self.readout = "all"  # the cached layout's ListwiseConfig.readout (the stage sets its config's)
        self.single_pass_aux = "binding"  # the single pass's auxiliary loss: "binding" or "relevance" (label rows)
        # page id -> PageKV, when the layers that compute the page KV are frozen (see --freeze-below): each page's
        # band KV is then a constant, prefilled once without gradients and reused by every window that holds it.
        self.frozen_kv: dict[str, object] | None = None

    def single_pass(self, query: str, images: list, keep_ratio: float = 1.0,
                    importance: list[torch.Tensor | None] | None = None, tap_layer: int | None = None,
                    labels: Sequence[str] | None = None, readout: str = "all") -> WindowOutput:
        """ZipRerank's single pass over `images` in this order (QI-EI when importance is None). `labels`: the
        pages' labels (default: the first len(images) of self.labels); the logits are always over all labels.
        With tap_layer, the anchors are the visual rows (binding) or, with single_pass_aux = "relevance", each
        page's label token (as the cached layout's)."""
        feats, grid_thw = encode_pages(self.adapter, self.processor.image_processor, images, self.image_batch)
        seq = window_sequence(self.adapter, self.tok, self.template, labels or self.labels, self.answer_id, query,
                              feats, grid_thw, keep_ratio, importance)
        tap = LayerTap(self.adapter, tap_layer) if tap_layer is not None else None
        try:
            logits = single_pass_logits(self.adapter, [seq], self.head, readout)[0]
        finally:
            if tap is not None:
                tap.close()
        if tap is None:
            return WindowOutput(self._window_logits(logits, len(images), labels))
        if self.single_pass_aux == "relevance":
            if seq.label_rows is None:
                raise ValueError("this tokenizer does not locate the template's labels in context")
            rows, owners = seq.label_rows.to(tap.out.device), torch.arange(len(images))
            return WindowOutput(self._window_logits(logits, len(images), labels), tap.out[0, rows], owners.to(rows.device))
        rows = torch.nonzero(seq.visual).squeeze(1)  # one unpadded sequence: rows are the sequence's own
        owners = torch.repeat_interleave(torch.arange(len(seq.keep)), torch.tensor([len(k) for k in seq.keep]))
        return WindowOutput(self._window_logits(logits, len(images), labels), tap.out[0, rows], owners.to(rows.device))

    def single_pass_frozen(self, query: str, images: list, split: int, keep_ratio: float = 1.0,
                           importance: list[torch.Tensor | None] | None = None):
        """A single-pass window's states entering layer `split` (1, S, H), without gradients, and its sequence
        (whose label_rows locate the label tokens): what the read-back fit reads from this layout."""
        feats, grid_thw = encode_pages(self.adapter, self.processor.image_processor, images, self.image_batch)
        seq = window_sequence(self.adapter, self.tok, self.template, self.labels, self.answer_id, query, feats,
                              grid_thw, keep_ratio, importance)
        want = torch.tensor(self.head.ids[: len(images)])
        if seq.label_rows is None or not torch.equal(seq.ids[seq.label_rows.to(seq.ids.device)].cpu(), want):
            raise ValueError("this tokenizer does not keep the template's labels as tokens of their own in context")
        tap = LayerTap(self.adapter, split - 1)
        try:
            with torch.no_grad():
                single_pass_logits(self.adapter, [seq], self.head)
        finally:
            tap.close()
        return tap.out, seq

    def cached(self, query: str, images: list, exit_layer: int, band: tuple[int, int], keep_ratio: float = 1.0,
               importance: list[torch.Tensor] | None = None, tap_layer: int | None = None,
               page_ids: Sequence[str] | None = None, labels: Sequence[str] | None = None) -> WindowOutput:
        """The cached layout; the page KV is prefilled here with gradients (the point-wise prefill), or read from
        `frozen_kv` by page id when the page side is frozen."""
        window = self._cached_window(query, images, band, keep_ratio, importance, page_ids, labels)
        return self._cached_run(FrozenWindow(window, exit_layer, band, 0, None, labels), tap_layer)

    def cached_frozen(self, query: str, images: list, exit_layer: int, band: tuple[int, int], split: int,
                      keep_ratio: float = 1.0, importance: list[torch.Tensor] | None = None,
                      page_ids: Sequence[str] | None = None, labels: Sequence[str] | None = None) -> FrozenWindow:
        """The cached window run without gradients up to layer `split`, at or above the band's end (the layers
        that see pages), so `cached_tail` can run the rest any number of times: with the layers below `split`
        frozen, the same window gives the same states there every epoch."""
        if not band[1] <= split <= exit_layer:
            raise ValueError(f"the frozen split must lie in [{band[1]}, {exit_layer}] (band end .. exit), got {split}")
        window = self._cached_window(query, images, band, keep_ratio, importance, page_ids, labels)
        with torch.no_grad():
            pk = prefix_kv(self.adapter, self.prefix_ids, split)
            hidden = cached_states(self.adapter, pk, [window], range(split), band,
                                   readout_at=readout_layer(self.readout, exit_layer))
        return FrozenWindow(window, exit_layer, band, split, hidden, labels)

    def cached_tail(self, frozen: FrozenWindow, tap_layer: int | None = None) -> WindowOutput:
        """The layers from `frozen.split` to the exit, with gradients (see cached_frozen)."""
        return self._cached_run(frozen, tap_layer)

    def _cached_window(self, query, images, band, keep_ratio, importance, page_ids, labels) -> CachedWindow:
        kvs = self._page_kvs(images, band, page_ids)
        imps = importance if importance is not None else [None] * len(kvs)
        rows = [kept_rows(kv, imp, keep_ratio) for kv, imp in zip(kvs, imps)]
        return cached_window(self.tok, self.template, labels or self.labels, self.answer_id, query, kvs, rows)

    def _cached_run(self, f: FrozenWindow, tap_layer: int | None) -> WindowOutput:
        pk = prefix_kv(self.adapter, self.prefix_ids, f.exit_layer)
        at = readout_layer(self.readout, f.exit_layer)
        n, hidden, split = len(f.window.kvs), f.hidden, f.split
        tapped = None
        if tap_layer is not None:  # the query states after the tap layer: run up to it, then on from there
            if not f.split <= tap_layer < f.exit_layer:
                raise ValueError(f"tap layer {tap_layer} is outside the layers run here [{f.split}, {f.exit_layer})")
            hidden = tapped = cached_states(self.adapter, pk, [f.window], range(split, tap_layer + 1), f.band, hidden,
                                            readout_at=at)
            split = tap_layer + 1
        answer = cached_answer(self.adapter, pk, [f.window], range(split, f.exit_layer), f.band, hidden, readout_at=at)
        logits = self._window_logits(self.head(self.adapter.norm(answer))[0], n, f.labels)
        if tapped is None:
            return WindowOutput(logits)
        return WindowOutput(logits, tapped[0, f.window.query.label_rows()], torch.arange(n))

    def _window_logits(self, logits: torch.Tensor, n: int, labels: Sequence[str] | None) -> torch.Tensor:
        """The pages' scores (n,) in the default labelling; with explicit `labels`, every label's logit."""
        return logits if labels else logits[:n]

    def _page_kvs(self, images: list, band: tuple[int, int], page_ids: Sequence[str] | None) -> list:
        if self.frozen_kv is None or page_ids is None:
            return prefill_pages(self.adapter, self.processor.image_processor, self.prefix_ids, images, band)
        todo = [i for i, p in enumerate(page_ids) if p not in self.frozen_kv]
        if todo:
            with torch.no_grad():
                got = prefill_pages(self.adapter, self.processor.image_processor, self.prefix_ids,
                                    [images[i] for i in todo], band)
            self.frozen_kv.update((page_ids[i], kv) for i, kv in zip(todo, got))
        return [self.frozen_kv[p] for p in page_ids]

    def window(self, config: ListwiseConfig, query: str, images: list, importance: list[torch.Tensor] | None = None,
               tap_layer: int | None = None, page_ids: Sequence[str] | None = None,
               labels: Sequence[str] | None = None) -> WindowOutput:
        """`config`'s layout (resolved: exit_layer / band filled). With `labels` (the pages' labels, e.g. a random
        subset as the copy task uses), the logits of every label instead of the pages' scores."""
        if config.mode == "cached":
            if config.readout != self.readout:
                raise ValueError(f"the scorer reads out {self.readout!r}, the config {config.readout!r}")
            return self.cached(query, images, config.exit_layer, config.band, config.keep_ratio, importance, tap_layer,
                               page_ids, labels)
        imp = importance if config.prune_by == "maps" else None
        return self.single_pass(query, images, config.keep_ratio, imp, tap_layer, labels, config.readout)

    def scores(self, config: ListwiseConfig, query: str, images: list,
               importance: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(n,) label logits of `config`'s layout."""
        return self.window(config, query, images, importance).logits

    def aux_loss(self, out: WindowOutput, mode: str, positive: int | None, teacher: Sequence[float],
                 **loss_kw) -> tuple[torch.Tensor, dict[str, float]]:
        """The auxiliary loss at the anchors (see the class docstring). single_pass, binding: each visual row's
        label logits (the label head on the tapped state) name its own page's label (cross-entropy). cached,
        relevance: each label segment's last row scores its page as logit("yes") - logit("no"), trained with the
        window loss (RankNet on the label, soft-ranking distillation of the teacher); the single pass's label tokens
        get the same relevance loss with single_pass_aux = "relevance"."""
        h = self.adapter.norm(out.anchors)
        if mode == "single_pass" and self.single_pass_aux == "binding":
            n = int(out.owners.max()) + 1
            bind = F.cross_entropy(self.head(h)[:, :n], out.owners.to(h.device))
            return bind, {"aux_binding": float(bind.detach())}
        rel, parts = window_loss(self.relevance(h), positive, teacher, **loss_kw)
        return rel, {f"aux_{k}": v for k, v in parts.items()}


# --- windows -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    qid: str
    pages: tuple[str, ...]  # the window's candidates (page ids), in no meaningful order
    orders: tuple[tuple[int, ...], ...]  # per layout: the prompt order (indices into pages)


def sample_window(positive: str, hard: Sequence[str], all_pages: Sequence[str], rng: random.Random, size: int,
                  random_frac: float) -> list[str]:
    """The positive, then hard negatives in first-stage order with a `random_frac` share of slots given to random
    pages instead, filled up with random pages; `size` distinct pages (the caller shuffles)."""
    pages, hard = [positive], [p for p in hard if p != positive]
    while len(pages) < size:
        if hard and rng.random() >= random_frac:
            p = hard.pop(0)
        else:
            p = rng.choice(all_pages)
        if p not in pages:
            pages.append(p)
    return pages


@dataclass(frozen=True)
class Curriculum:
    """Window sizes and the random-negative share, moved linearly from their start to their end values over the
    first `ramp` share of the steps: a student that has not yet bound labels to pages first learns it on short lists
    of easy negatives (a few pages, several times cheaper per step), then on full windows of first-stage negatives."""

    window: tuple[int, int]  # (smallest, largest) at the end
    window_start: tuple[int, int] | None = None  # at step 0 (None: the end range throughout)
    random_frac: tuple[float, float] = (0.25, 0.25)  # (start, end)
    ramp: float = 0.5

    def at(self, step: int, steps: int) -> tuple[int, int, float]:
        t = min(1.0, step / max(1.0, self.ramp * steps))
        lo0, hi0 = self.window_start or self.window
        lo = round(lo0 + t * (self.window[0] - lo0))
        hi = max(lo, round(hi0 + t * (self.window[1] - hi0)))
        return lo, hi, self.random_frac[0] + t * (self.random_frac[1] - self.random_frac[0])


def plan_step(step: int, seed: int, train_q: Sequence[dict], mined: dict[str, list[str]], all_pages: Sequence[str],
              window: int, min_window: int, random_frac: float, n_layouts: int) -> StepPlan:
    """The window of `step`: a function of (seed, step) and the sizes only, so a resumed run and the teacher
    precompute agree."""
    rng = random.Random(f"{seed}:listwise:{step}")
    q = train_q[rng.randrange(len(train_q))]
    size = rng.randint(min_window, window)
    pages = sample_window(q["positive"], mined.get(q["qid"], q.get("hard_negatives", [])), all_pages, rng, size,
                          random_frac)
    orders = []
    for _ in range(n_layouts):  # each layout sees the candidates in its own random order
        perm = list(range(len(pages)))
        rng.shuffle(perm)
        orders.append(tuple(perm))
    return StepPlan(q["qid"], tuple(pages), tuple(orders))


# --- teacher scores, cached on disk ------------------------------------------------------------------------------
class TeacherScores:
    """Dense point-wise teacher scores per (query id, page id), kept in one JSON file (written atomically)."""

    def __init__(self, path: str | Path, teacher: str):
        self.path, self.teacher = Path(path), str(teacher)
        self.scores: dict[str, dict[str, float]] = {}
        if self.path.exists():
            doc = read_json(self.path, format=SCORES_FORMAT)
            if doc.get("teacher") != self.teacher:
                raise SystemExit(f"{self.path} holds scores of teacher {doc.get('teacher')!r}, not {self.teacher!r}; "
                                 "remove it or use another --out")
            self.scores = doc["scores"]

    def __len__(self) -> int:
        return sum(len(v) for v in self.scores.values())

    def missing(self, pairs: dict[str, set[str]]) -> dict[str, set[str]]:
        out = {q: {p for p in ps if p not in self.scores.get(q, {})} for q, ps in pairs.items()}
        return {q: ps for q, ps in out.items() if ps}

    def get(self, qid: str, pages: Sequence[str]) -> list[float]:
        return [self.scores[qid][p] for p in pages]

    def save(self) -> None:
        write_json(self.path, {"teacher": self.teacher, "scores": self.scores}, format=SCORES_FORMAT)

    def fill(self, teacher_dir: str | Path, pairs: dict[str, set[str]], query_text: dict[str, str],
             page_path, device: str = "cpu", chunk: int = 64, vision_cache: FrozenVisionCache | None = None,
             log=None) -> int:
        """Score the missing pairs with a MiniReranker over the teacher in its saved config, page chunk by page
        chunk (each page's KV is computed once, then every query that needs it reads it); saves after each chunk.
        `vision_cache`: the student's frozen-tower cache, shared when the teacher's tower is the same. Returns the
        number of pairs scored."""
        from ..engine.config import RerankConfig
        from ..engine.settings import read_settings
        from ..pages import Page
        from ..rerankers import MiniReranker

        todo = self.missing(pairs)
        if not todo:
            return 0
        config = (read_settings(teacher_dir).config or RerankConfig()).replace(device=str(device))
        teacher = MiniReranker.from_pretrained(str(teacher_dir), config, memory_cache_bytes=512 * 1024**2)
        if vision_cache is not None:
            try:
                vision_cache.share_with(visual_module(teacher.model))
            except ValueError:  # another tower: the teacher computes its own features
                pass
        by_page: dict[str, list[str]] = {}
        for q, ps in todo.items():
            for p in ps:
                by_page.setdefault(p, []).append(q)
        page_ids = sorted(by_page)
        done, t0 = 0, time.time()
        for s in range(0, len(page_ids), chunk):
            ids = page_ids[s : s + chunk]
            pages = {p: Page(page_path(p), id=p) for p in ids}
            teacher.index(list(pages.values()))
            queries: dict[str, list[str]] = {}
            for p in ids:
                for q in by_page[p]:
                    queries.setdefault(q, []).append(p)
            for q, ps in queries.items():
                got = teacher.score(query_text[q], [pages[p] for p in ps])
                self.scores.setdefault(q, {}).update({p: float(x) for p, x in zip(ps, got)})
                done += len(ps)
            self.save()
            if log is not None:
                log(event="teacher_scores", pages=min(s + chunk, len(page_ids)), of=len(page_ids), pairs=done,
                    seconds=round(time.time() - t0, 1))
        return done


# --- loss ------------------------------------------------------------------------------------------------------
def window_loss(scores: torch.Tensor, positive: int | None, teacher: Sequence[float], *, ranknet_weight: float = 1.0,
                distill_weight: float = 1.0, decay: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """RankNet on the label + soft-ranking distillation of the teacher's order, for one window's (n,) scores (both
    in the window's prompt order). RankNet is unweighted: with one relevant page the rank weights would only
    depend on the arbitrary order of the tied negatives."""
    s = scores[None].float()
    rel = torch.zeros_like(s)
    if positive is not None:
        rel[0, positive] = 1.0
    rank = ranknet_loss(s, rel, weighted=False)
    t_order = sorted(range(len(teacher)), key=lambda i: -teacher[i])
    soft = soft_ranking_loss(s, [t_order], [[positive] if positive is not None else []], decay=decay)
    loss = ranknet_weight * rank + distill_weight * soft
    return loss, {"ranknet": float(rank.detach()), "soft": float(soft.detach())}


def fit_readback_on(scorer: ListwiseScorer, configs: Sequence[ListwiseConfig], plans: Sequence[StepPlan],
                    query_of: dict[str, dict], importance, ds: DataSet, relevance_scale: float = 0.0,
                    single_pass: int = 0, centre: bool = True, copy_scale: float = 3.0):
    """Fit and install the read-back head (train/readback.py) in the cached layout's last layer, from the
    current (init) states of these windows; with single_pass=N, also from the first N of them in the single-pass
    layout (all visual tokens), so that one head serves both layouts. A single-pass config alone: the head in the
    model's last layer, fitted on the single-pass windows (at the config's keep ratio, QI-EI)."""
    from .readback import readback_init

    (cfg,) = configs
    if cfg.mode == "single_pass":
        last, single = scorer.adapter.num_layers - 1, []
        for plan in plans:
            ids = [plan.pages[i] for i in plan.orders[0]]
            single.append(scorer.single_pass_frozen(query_of[plan.qid]["query"], [ds.image(p) for p in ids], last,
                                                    cfg.keep_ratio))
        return readback_init(scorer, [], relevance_scale, single, layer=last, centre=centre, copy_scale=copy_scale)
    frozen, single = [], []
    for k, plan in enumerate(plans):
        q = query_of[plan.qid]
        ids = [plan.pages[i] for i in plan.orders[0]]
        imp = importance.maps(ds, ids, [q["query"]])[0] if cfg.keep_ratio < 1.0 else None
        images = [ds.image(p) for p in ids]
        frozen.append(scorer.cached_frozen(q["query"], images, cfg.exit_layer, cfg.band, cfg.exit_layer - 1,
                                           cfg.keep_ratio, imp, page_ids=ids))
        if k < single_pass:
            single.append(scorer.single_pass_frozen(q["query"], images, cfg.exit_layer - 1))
    return readback_init(scorer, frozen, relevance_scale, single, centre=centre, copy_scale=copy_scale)


def pool_indices(step: int, per_step: int, pool: int, seed: int) -> list[int]:
    """The pool windows of `step`: epochs of the pool, each in its own seeded order (a resumed run agrees)."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, pool)
        order = list(range(pool))
        random.Random(f"{seed}:pool:{epoch}").shuffle(order)
        out.append(order[i])
    return out


def copy_window(positive: str, all_pages: Sequence[str], labels: Sequence[str], rng: random.Random
                ) -> tuple[list[str], list[str]]:
    """The copy task's window: 1-3 pages (the query's positive half the time) under randomly drawn labels."""
    n = min(rng.choice((1, 1, 2, 3)), len(set(all_pages)))
    pages = [positive] if rng.random() < 0.5 else []
    while len(pages) < n:
        p = rng.choice(all_pages)
        if p not in pages:
            pages.append(p)
    return pages, rng.sample(list(labels), n)


def copy_loss(logits: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
    """Cross-entropy of the label logits against the labels present in the window (uniform over them).

    Why: "[" can only name the best page if it reads the label tokens back, and the ranking loss alone gives
    that circuit no gradient until it exists (attention that does not yet prefer the relevant label moves no
    label's logit, and vice versa). After it, the ranking loss only has to make the attention prefer relevant
    labels. On the toy student gradient descent did not find the copy circuit (train/readback.py says what
    happened); --readback-init writes one down and this loss keeps it while the ranking loss trains."""
    target = torch.zeros_like(logits, dtype=torch.float32)
    target[list(present)] = 1.0 / len(present)
    return -(target * torch.log_softmax(logits.float(), -1)).sum()


def accumulate(parts: dict[str, float], values: dict[str, float], n: int) -> None:
    """Add each value / n to its running mean in `parts` (n: the windows that make one step)."""
    for k, v in values.items():
        parts[k] = parts.get(k, 0.0) + v / n


# --- first stage: mined negatives and evaluation candidates -----------------------------------------------------
def first_stage_top(importance, ds: DataSet, split: str, k: int, queries: Sequence[dict]) -> dict[str, list[str]]:
    """Each query's top-k pages of `split` by the embedder's exact MaxSim (as the first stage returns them)."""
    from ..pages import Page
    from ..retrieval.maxsim import maxsim_scores

    pids = ds.page_ids(split)
    todo = [p for p in pids if p not in importance.pages]
    for s in range(0, len(todo), 64):
        chunk = todo[s : s + 64]
        importance.pages.update(zip(chunk, importance.embedder.encode_pages([Page(ds.image(p), id=p) for p in chunk],
                                                                            batch_size=8, show_progress=False)))
    vecs = [importance.pages[p].vectors.numpy() for p in pids]
    flat = np.concatenate(vecs)
    offsets = np.zeros(len(vecs) + 1, dtype=np.int64)
    np.cumsum([len(v) for v in vecs], out=offsets[1:])
    out = {}
    for q, e in zip(queries, importance.embedder.encode_queries([q["query"] for q in queries])):
        scores = maxsim_scores(e.numpy(), flat, offsets)
        out[q["qid"]] = [pids[j] for j in np.argsort(-scores, kind="stable")[:k]]
    return out


@torch.no_grad()
def evaluate(model, processor, configs: Sequence[ListwiseConfig], ds: DataSet, queries: Sequence[dict],
             candidates: dict[str, list[str]], template: ListwiseTemplate = DEFAULT_LISTWISE_TEMPLATE,
             importance=None) -> dict[str, float]:
    """Rerank each query's first-stage candidates with ListwiseReranker (the inference facade) in each config's
    layout; returns metrics prefixed by the mode."""
    from ..pages import Page
    from ..rerankers import ListwiseReranker

    was_training = model.training
    out: dict[str, float] = {}
    pages = {p: Page(ds.image_path(p), id=p) for q in queries for p in candidates[q["qid"]]}
    for cfg in configs:
        r = ListwiseReranker(model, processor, cfg, template=template, memory_cache_bytes=256 * 1024**2)
        rankings, rel = [], []
        for q in queries:
            cand = candidates[q["qid"]]
            imp = None
            if cfg.mode == "cached" and cfg.keep_ratio < 1.0:
                imp = importance.maps(ds, cand, [q["query"]])[0]
            res = r.rerank(q["query"], [pages[p] for p in cand], importance=imp)
            rankings.append([x.page_id for x in res])
            rel.append({q["positive"]})
        out.update({f"{cfg.mode}_{k}": v for k, v in summarize(rankings, rel).items()})
    model.train(was_training)
    return out


# --- the stage -----------------------------------------------------------------------------------------------
def configs_of(args, n_layers: int) -> list[ListwiseConfig]:
    """The ListwiseConfig of every trained layout, resolved for this model (single pass first: the default mode)."""
    out = []
    for mode in args.layouts:
        if mode == "single_pass":
            cfg = ListwiseConfig(keep_ratio=args.keep_ratio, prune_by="qiei", window=args.window, readout=args.readout,
                                 stride=args.window // 2, dtype="float32", device=args.device)
        else:
            band = tuple(args.cached_band) if args.cached_band else None
            cfg = ListwiseConfig(mode="cached", exit_layer=args.cached_exit_layer, band=band, readout=args.readout,
                                 keep_ratio=args.cached_keep_ratio, window=args.window, stride=args.window // 2,
                                 dtype="float32", device=args.device)
        out.append(cfg.resolve(n_layers))
    return out


def curriculum_of(args) -> Curriculum:
    start = tuple(args.window_start) if args.window_start else None
    frac = tuple(args.random_frac) if len(args.random_frac) == 2 else (args.random_frac[0],) * 2
    return Curriculum((args.min_window, args.window), start, frac, args.ramp)


def train(args) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .reranker import Importance, max_visual_tokens_of, trainable_parameters

    for lo, hi in [(args.min_window, args.window)] + ([tuple(args.window_start)] if args.window_start else []):
        if not 2 <= lo <= hi <= len(RANKGPT_LABELS):
            raise SystemExit(f"windows need 2 <= smallest <= largest <= {len(RANKGPT_LABELS)}, got {lo}..{hi}")
    device, amp = setup_runtime(args)
    ds = DataSet(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "log.jsonl", quiet=args.quiet)

    model = AutoModelForImageTextToText.from_pretrained(str(args.init), dtype=torch.float32).to(device).train()
    processor = AutoProcessor.from_pretrained(str(args.init))
    n_layers = adapter_for(model).num_layers
    configs = configs_of(args, n_layers)
    template = TEMPLATES[args.template]
    if args.cached_label:
        template = dataclasses.replace(template, cached_label=args.cached_label)
    if args.label:
        template = dataclasses.replace(template, label=args.label)
    if args.label_after_page:
        template = dataclasses.replace(template, label_after_page=True)
    scorer = ListwiseScorer(model, processor, template)
    scorer.readout = args.readout
    scorer.single_pass_aux = args.single_pass_aux
    cache = FrozenVisionCache(visual_module(model))  # frozen tower: each page's features are computed once
    importance = Importance(args.embedder, device, max_visual_tokens_of(processor), cache)

    # Hard negatives: the first stage's top pages of each training query (mined once).
    train_q = ds.split_queries("train")
    mined_file = Path(args.mined) if args.mined else out / "mined_negatives.json"
    if mined_file.exists():
        mined = json.loads(mined_file.read_text())
    else:
        t0 = time.time()
        mined = importance.mine(ds, "train", args.window)
        write_json(mined_file, mined)
        log(event="mined", queries=len(mined), seconds=round(time.time() - t0, 1))
    all_pages = ds.page_ids("train")
    query_of = {q["qid"]: q for q in train_q}
    curriculum = curriculum_of(args)
    W = args.windows_per_step
    if args.pool:
        # A fixed pool of windows, drawn at the curriculum's final sizes, visited in a new order every epoch.
        lo, hi, frac = curriculum.at(args.steps - 1, args.steps)
        pool = [plan_step(i, args.seed, train_q, mined, all_pages, hi, lo, frac, len(configs)) for i in range(args.pool)]
        plans = [[pool[i] for i in pool_indices(step, W, args.pool, args.seed)] for step in range(args.steps)]
    else:
        plans = []  # plans[step]: the step's windows (--windows-per-step of them)
        for s in range(args.steps):
            lo, hi, frac = curriculum.at(s, args.steps)
            plans.append([plan_step(s * W + b, args.seed, train_q, mined, all_pages, hi, lo, frac, len(configs))
                          for b in range(W)])

    # Teacher scores of every pair the run needs, before training (a resumed run computes only what it lacks).
    # With --distill-weight 0 no teacher is run (RankNet on the labels alone).
    teacher = TeacherScores(out / "teacher_scores.json", str(args.teacher)) if args.distill_weight > 0 else None
    if teacher is not None:
        pairs: dict[str, set[str]] = {}
        for p in (x for step_plans in plans for x in step_plans):
            pairs.setdefault(p.qid, set()).update(p.pages)
        text = {q["qid"]: q["query"] for q in train_q}
        t0 = time.time()
        computed = teacher.fill(args.teacher, pairs, text, ds.image_path, device=str(device), vision_cache=cache,
                                log=log)
        log(event="teacher", pairs_computed=computed, pairs_cached=len(teacher), seconds=round(time.time() - t0, 1))

    # Validation: each query's first-stage top --eval-candidates over the validation split (computed once).
    val_q = ds.split_queries("val")[: args.eval_queries]
    cand_file = out / "val_candidates.json"
    if cand_file.exists():
        val_cands = json.loads(cand_file.read_text())
    else:
        val_cands = first_stage_top(importance, ds, "val", args.eval_candidates, val_q)
        write_json(cand_file, val_cands)
    val_q = [q for q in val_q if q["qid"] in val_cands]

    if args.relevance_layer is None:
        exits = [c.exit_layer for c in configs if c.mode == "cached"] or [n_layers]
        # its output leaves two layers to compare the labels; never a frozen layer (nothing there to train)
        args.relevance_layer = min(max(args.freeze_below, exits[0] - 3), exits[0] - 1)
    params = trainable_parameters(model, n_layers, train_vision=False, train_embeddings=False,
                                  first_layer=args.freeze_below)
    if args.freeze_below and all(c.mode != "cached" or args.freeze_below >= c.band[1] for c in configs):
        # The frozen layers cover every layer the page prefill runs (the cached band): the page KV is the init's own
        # point-wise page cache, computed once per page here, and at inference shared with a MiniReranker over the init.
        scorer.frozen_kv = {}
    single_head = args.readback_init and [c.mode for c in configs] == ["single_pass"] and not args.pool
    if (args.pool or args.readback_init) and not single_head and (
            scorer.frozen_kv is None or any(c.mode != "cached" for c in configs)):
        raise SystemExit("--pool and --readback-init need the cached layout alone and --freeze-below at or above its "
                         "band's end (or, --readback-init alone, the single-pass layout alone)")
    fresh = not has_checkpoint(out / "ckpt")  # a resumed run's checkpoint (loaded below) has all of this
    if args.readback_uncentred and args.readout != "labels":
        raise SystemExit("--readback-uncentred needs --readout labels (only then does \"[\" see the label rows alone)")
    if args.attn_scale != 1.0 and fresh:
        sharpen_attention(adapter_for(model), range(args.freeze_below, n_layers), args.attn_scale)
    if args.readback_init and fresh:
        planned = pool if args.pool else [p for step_plans in plans for p in step_plans]
        if not args.pool and len(planned) < args.readback_init:  # e.g. --steps 0: the head alone, windows drawn alike
            lo, hi, frac = curriculum.at(max(args.steps - 1, 0), max(args.steps, 1))
            planned = [plan_step(i, args.seed, train_q, mined, all_pages, hi, lo, frac, len(configs))
                       for i in range(args.readback_init)]
        if len(planned) < args.readback_init:
            raise SystemExit(f"--readback-init {args.readback_init} needs that many windows; the run plans "
                             f"{len(planned)} (--pool / --steps x --windows-per-step)")
        fit = fit_readback_on(scorer, configs, planned[: args.readback_init], query_of, importance, ds,
                              args.readback_relevance, args.readback_single_pass, not args.readback_uncentred,
                              args.readback_copy_scale)
        log(event="readback_init", layer=n_layers - 1 if single_head else configs[0].exit_layer - 1,
            windows=args.readback_init,
            single_pass_windows=min(args.readback_single_pass, args.readback_init),
            probe_labels=round(fit.probe_labels, 3), probe_others=round(fit.probe_others, 3))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    meta = load_checkpoint(out / "ckpt", model, opt)
    step = meta["step"] if meta else 0
    log(event="start", step=step, params=n_params(model), trainable=sum(p.numel() for p in params),
        configs=[c.to_dict() for c in configs])
    def validate() -> dict[str, float]:
        got = evaluate(model, processor, configs, ds, val_q, val_cands, template, importance=importance)
        return {f"val_{k}": v for k, v in got.items()}

    if args.eval_at_start and step == 0:
        log(step=0, **validate())
    weights = {"single_pass": 1.0, "cached": args.cached_weight}
    loss_kw = dict(ranknet_weight=args.ranknet_weight, distill_weight=args.distill_weight, decay=args.decay)
    a0, a1 = (args.aux_weight * 2)[:2] if len(args.aux_weight) == 1 else args.aux_weight[:2]

    def aux_weight(step: int) -> float:  # linear from a0 to a1 over the run
        return a0 + (a1 - a0) * step / max(1, args.steps - 1)
    bar = progress(args.steps, step, "listwise", args.quiet)
    t_last, stats = time.time(), []

    frozen: dict[tuple, FrozenWindow] = {}  # --pool: each pooled window's states below the trained layers

    def run_window(cfg: ListwiseConfig, query: str, ids: list[str], tap_layer: int | None = None,
                   labels: list[str] | None = None) -> WindowOutput:
        """One window of these pages in `cfg`'s layout (with the embedder's maps when the cached layout prunes)."""
        key = (cfg.mode, query, tuple(ids), tuple(labels or ()))
        with autocast(device, amp):
            if key in frozen:
                return scorer.cached_tail(frozen[key], tap_layer)
            imp = importance.maps(ds, ids, [query])[0] if cfg.mode == "cached" and cfg.keep_ratio < 1.0 else None
            images = [ds.image(p) for p in ids]
            if not args.pool:
                return scorer.window(cfg, query, images, imp, tap_layer=tap_layer, page_ids=ids, labels=labels)
            frozen[key] = scorer.cached_frozen(query, images, cfg.exit_layer, cfg.band, args.freeze_below,
                                               cfg.keep_ratio, imp, page_ids=ids, labels=labels)
            return scorer.cached_tail(frozen[key], tap_layer)

    while step < args.steps:
        set_lr(opt, lr_at(step, args.steps, args.lr, args.warmup))
        opt.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        copy_only = step < args.copy_warmup
        for plan in ([] if copy_only else plans[step]):
            q = query_of[plan.qid]
            for cfg, order in zip(configs, plan.orders):
                ids = [plan.pages[i] for i in order]
                aux_w = aux_weight(step)
                tap = (args.bind_layer if cfg.mode == "single_pass" else args.relevance_layer) if aux_w > 0 else None
                w = run_window(cfg, q["query"], ids, tap_layer=tap)
                with autocast(device, amp):
                    s = w.logits
                    t_scores = teacher.get(plan.qid, ids) if teacher is not None else [0.0] * len(ids)
                    pos = ids.index(q["positive"]) if q["positive"] in ids else None
                    loss, lp = window_loss(s, pos, t_scores, **loss_kw)
                    total = args.label_weight * loss
                    if aux_w > 0:
                        aux, ap = scorer.aux_loss(w, cfg.mode, pos, t_scores, **loss_kw)
                        total = total + aux_w * aux
                        lp.update(ap)
                # one window's graph at a time: peak memory of one window
                (weights[cfg.mode] * total / len(plans[step])).backward()
                accumulate(parts, {f"{cfg.mode}_loss": float(loss.detach()),
                                    **{f"{cfg.mode}_{k}": v for k, v in lp.items()},
                                    f"{cfg.mode}_top1": float(pos is not None and int(s.detach().argmax()) == pos)},
                            len(plans[step]))
        copy_w = 1.0 if copy_only else args.copy_weight
        if copy_w > 0:
            copy_ids = pool_indices(step, W, args.pool, args.seed) if args.pool else range(step * W, step * W + W)
            for k in copy_ids:
                rng = random.Random(f"{args.seed}:copy:{k}")
                q = train_q[rng.randrange(len(train_q))]
                ids, labels = copy_window(q["positive"], all_pages, scorer.labels, rng)
                for cfg in configs:
                    loss = copy_loss(run_window(cfg, q["query"], ids, labels=labels).logits,
                                     [scorer.labels.index(x) for x in labels])
                    (copy_w * weights[cfg.mode] * loss / W).backward()
                    accumulate(parts, {f"{cfg.mode}_copy": float(loss.detach())}, W)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        stats.append(parts)
        if step % args.log_every == 0:
            keys = sorted({k for p in stats for k in p})  # copy-only steps log fewer parts
            mean = {k: sum(p[k] for p in stats if k in p) / sum(k in p for p in stats) for k in keys}
            log(step=step, window=len(plans[step - 1][0].pages), sec_per_step=(time.time() - t_last) / len(stats), **mean)
            t_last, stats = time.time(), []
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(out / "ckpt", model, opt, step)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            log(step=step, **validate())
    bar.close()
    result = validate()
    log(event="done", step=step, **result)
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(final)
    processor.save_pretrained(final)
    trained = {"stage": "listwise", "steps": step, "teacher": str(args.teacher) if teacher is not None else None,
               "init": str(args.init), "freeze_below": args.freeze_below, "curriculum": asdict(curriculum),
               "template": args.template, "readback_init": args.readback_init,
               "readback_relevance": args.readback_relevance, "readback_single_pass": args.readback_single_pass,
               "readback_uncentred": args.readback_uncentred, "readback_copy_scale": args.readback_copy_scale,
               "pool": args.pool, "attn_scale": args.attn_scale,
               "copy_weight": args.copy_weight,
               "eval": f"val split, first-stage top {args.eval_candidates}, {len(val_q)} queries", **result}
    settings = listwise_settings([c.replace(device="auto", dtype="auto") for c in configs], template)
    write_listwise_settings(final, settings, training=trained)
    write_json(out / "result.json", {"step": step, **result})
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minirerank_core.train.listwise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="run directory (resumes from OUT/ckpt; final model in OUT/final)")
    ap.add_argument("--init", required=True, help="the checkpoint the student starts from (the point-wise teacher)")
    ap.add_argument("--teacher", required=True, help="the dense point-wise teacher (a minirerank checkpoint) to distil")
    ap.add_argument("--embedder", required=True, help="ColQwen first stage: hard negatives, validation candidates, maps")
    ap.add_argument("--mined", default=None, help="a mined-negatives JSON to reuse (default: mine OUT/mined_negatives.json)")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                    help="layouts trained (the first is the saved default mode)")
    ap.add_argument("--keep-ratio", type=float, default=0.5, help="single pass: QI-EI keep ratio it trains and ships with")
    ap.add_argument("--cached-exit-layer", type=int, default=None, help="cached: exit layer (default: every layer)")
    ap.add_argument("--cached-band", type=int, nargs=2, default=None, metavar=("B0", "B1"),
                    help="cached: the layers where labels see their page (default: every layer)")
    ap.add_argument("--cached-keep-ratio", type=float, default=1.0,
                    help="cached: keep ratio by the embedder's importance maps (< 1 needs the maps at inference)")
    ap.add_argument("--readout", choices=("all", "labels"), default="all",
                    help="'labels' makes the last layer before the exit (single pass: the last layer) a read-out layer "
                         "in which \"[\" attends to the label tokens only (ListwiseConfig.readout; saved with the model)")
    ap.add_argument("--cached-weight", type=float, default=1.0, help="weight of the cached layout's loss")
    ap.add_argument("--window", type=int, default=20, help="largest window (candidates per prompt)")
    ap.add_argument("--min-window", type=int, default=12, help="smallest window (sizes are drawn uniformly)")
    ap.add_argument("--window-start", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                    help="window sizes at step 0, moved to --min-window..--window over --ramp of the run (a curriculum)")
    ap.add_argument("--random-frac", type=float, nargs="+", default=[0.25], metavar="FRAC",
                    help="share of negatives drawn at random, not mined; two values: from START to END over --ramp")
    ap.add_argument("--ramp", type=float, default=0.5, help="share of the steps over which the curriculum moves")
    ap.add_argument("--aux-weight", type=float, nargs="+", default=[0.0], metavar="W",
                    help="weight of the auxiliary page-anchor losses (see ListwiseScorer.aux_loss); two values: linear "
                         "from START to END over the run (0: off)")
    ap.add_argument("--bind-layer", type=int, default=1,
                    help="single pass: the LM layer whose output the binding loss reads (early: the cells carry their "
                         "label before the query tokens read them)")
    ap.add_argument("--single-pass-aux", choices=["binding", "relevance"], default="binding",
                    help="single pass: the auxiliary loss at --bind-layer: binding (visual rows name their label) or "
                         "relevance (each label token scores its page as the point-wise head does, as the cached "
                         "layout's relevance loss)")
    ap.add_argument("--relevance-layer", type=int, default=None,
                    help="cached: the LM layer whose output the relevance loss reads (default: the third from the "
                         "exit, leaving two layers to compare the labels)")
    ap.add_argument("--template", choices=sorted(TEMPLATES), default="readback",
                    help="the prompt: readback (default; label after the point-wise question, no label token in the "
                         "fixed text) or rankgpt (ZipRerank's RankGPT wording); --label / --cached-label override parts")
    ap.add_argument("--cached-label", default=None,
                    help="cached layout: the label segment L_i ({label}, {query}; default: the template's)")
    ap.add_argument("--freeze-below", type=int, default=0,
                    help="keep LM layers below this one as the init has them (0: train every layer); at or above the "
                         "cached band's end the page KV is the init's point-wise page cache, prefilled once per page")
    ap.add_argument("--label", default=None,
                    help="single pass: the label segment L_i ({label}, {query}; default: the template's)")
    ap.add_argument("--label-after-page", action="store_true",
                    help="single pass: put each label segment after its page (see rerankers/listwise/prompt.py)")
    ap.add_argument("--windows-per-step", type=int, default=1, help="windows whose gradients make one optimizer step")
    ap.add_argument("--pool", type=int, default=0,
                    help="train on a fixed pool of this many windows (and as many copy windows), epoch after epoch: "
                         "each window's layers below --freeze-below run once (cached layout only; 0: new windows "
                         "every step)")
    ap.add_argument("--readback-init", type=int, default=0, metavar="N",
                    help="set the cached layout's last layer to an analytic read-back head fitted on the init's states "
                         "of the first N training windows (train/readback.py), then train (cached layout only; or "
                         "the single-pass layout alone, its head in the model's last layer)")
    ap.add_argument("--readback-relevance", type=float, default=0.0, metavar="C",
                    help="--readback-init: also key the head on each label's own yes/no judgement at this weight, so "
                         "that \"[\" reads the labels of the pages judged relevant most (0: the labels evenly)")
    ap.add_argument("--readback-uncentred", action="store_true",
                    help="--readback-relevance: key on each label's judgement as it is, not centred over the label "
                         "rows (needs --readout labels; the single pass reads its labels back far better so: see "
                         "train/readback.fit_readback)")
    ap.add_argument("--readback-copy-scale", type=float, default=3.0, metavar="G",
                    help="--readback-init: a copied label's norm in units of the residual state's at \"[\" (larger: the "
                         "label logits follow the attention over the labels more closely, less the state \"[\" "
                         "brings in)")
    ap.add_argument("--readback-single-pass", type=int, default=0, metavar="N",
                    help="--readback-init: also fit the head on the first N of its windows in the single-pass layout "
                         "(unpruned), so that the one head reads labels back in both layouts (0: cached only)")
    ap.add_argument("--attn-scale", type=float, default=1.0,
                    help="multiply the attention logits of the trained layers (those from --freeze-below up) by "
                         "this at the start: a sharper attention lets the copy task find the label it reads")
    ap.add_argument("--copy-weight", type=float, default=0.0,
                    help="weight of the copy task (name the labels present in a 1-3 page window; see copy_loss)")
    ap.add_argument("--copy-warmup", type=int, default=0,
                    help="first steps that train the copy task alone (at weight 1), before the ranking losses")
    ap.add_argument("--label-weight", type=float, default=1.0,
                    help="weight of the window loss on the label logits at \"[\" (0: the auxiliary loss alone, e.g. "
                         "to train the single pass's label tokens before a read-back head is fitted on them; the "
                         "run's own validation then reads \"[\" before any head is)")
    ap.add_argument("--ranknet-weight", type=float, default=1.0)
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--decay", type=float, default=0.5, help="soft-ranking target weight decay per position")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-at-start", action="store_true", help="also validate the initial model")
    ap.add_argument("--eval-queries", type=int, default=60)
    ap.add_argument("--eval-candidates", type=int, default=20)
    ap.add_argument("--ckpt-every", type=int, default=20)
    add_runtime_args(ap)
    return ap


def main(argv=None) -> None:
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
