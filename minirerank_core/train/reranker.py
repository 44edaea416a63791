"""Stage `reranker`: the dense vision-first teacher, then the mini student distilled from it.

    python -m minirerank_core.train.reranker teacher --data DATA --init-pretrain RUN/pretrain --out RUN/teacher
    python -m minirerank_core.train.reranker student --data DATA --init RUN/teacher/final --teacher RUN/teacher/final \
        --embedder RUN/embedder/final --exit-layer 6 --band 2 5 --keep-ratio 0.5 --out RUN/student

Both stages train through the engine's own inference path: `prefill_pages` (page -> band KV, differentiable)
and `score_cached` (query segment against cached pages) with the engine's DEFAULT_TEMPLATE and YesNoHead
(score = logit("yes") - logit("no") at the last query token). The teacher uses the dense configuration (every
layer, exact M-RoPE positions, no pruning), which equals a plain HF forward of P + V + Q (the engine's invariant
1), so the teacher *is* a standard point-wise MLLM reranker. The student starts from the teacher's weights and
trains in exactly the configuration it ships with: early exit, interaction band, `shared` query positions and
query-dependent pruning by the ColQwen3 embedder's importance maps at the shipped keep ratio. The page prefill
only runs layers < b1 and the query only layers < exit, so a student step is cheaper than a teacher step.

A step draws G training queries with distinct positive pages, adds K BM25 hard negatives per query (data stage),
adds up to --extra-queries further queries whose positives are already in the batch, and scores every query
against every page of the batch (M x N point-wise scores from one prefill per page). Loss:
    teacher: balanced BCE(scores, labels) + listwise CE over each query's row
             + --guide-weight x guided attention in --guide-layers (see AttentionGuide)
    student: the same on labels + KL(softmax(teacher row) || softmax(student row)) + 0.1 * MSE(student, teacher)
The vision tower stays frozen (shared with the embedder; trained by `pretrain`).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import write_json
from ..engine.config import RerankConfig
from ..engine.families import adapter_for
from ..engine.prefill import prefill_pages, prefix_kv, query_ids, tokenize
from ..engine.prompt import DEFAULT_TEMPLATE, PromptTemplate, YesNoHead, label_token_id
from ..engine.scorer import score_cached
from ..engine.settings import write_settings
from .common import (Logger, add_runtime_args, autocast, load_checkpoint, lr_at, optimizer_step, progress,
                     save_checkpoint, set_lr, setup_runtime)
from .data import DataSet
from .metrics import summarize
from .models import (FrozenVisionCache, lm_layer, load_pretrained_reader, n_params, reranker_processor,
                     text_embeddings, visual_module)

def shared_offset_for(tokenizer, template: PromptTemplate, max_visual_tokens: int) -> int:
    """The offset MiniReranker picks by default: any page's query start is <= |P| + 2 + max visual tokens."""
    return len(tokenize(tokenizer, template.prefix)) + 2 + max_visual_tokens


def max_visual_tokens_of(processor) -> int:
    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    max_pixels = size.get("longest_edge") or ip.max_pixels
    return int(max_pixels) // (ip.patch_size * ip.merge_size) ** 2


class AttentionCapture:
    """Records the (rotated) queries and keys that given LM layers attend with, for the guided-attention loss.

    Registered as a transformers attention implementation that delegates to sdpa; only used while training."""

    NAME = "minirerank_capture"

    def __init__(self, model, layers: set[int]):
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.layers = set(layers)
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def capture(module, query, key, value, attention_mask, **kwargs):
            if getattr(module, "layer_idx", None) in self.layers:
                self.store[module.layer_idx] = (query, key)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.NAME, capture)
        self.config = model.config.text_config
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = self.NAME

    def close(self) -> None:
        self.config._attn_implementation = self.previous


class PageTokenCells:
    """For each page: which merged visual tokens show which text token (the renderer's boxes, as in `pretrain`)."""

    def __init__(self, ds: DataSet, tokenizer):
        from .pretrain import CELL, CellTargets

        # Dataset pages are rendered at the model's resolution (they fit the pixel budget: no resize).
        self.size = tuple(ds.recipe.get("page_size", (320, 448)))
        self.ds, self.grid = ds, (self.size[1] // CELL, self.size[0] // CELL)
        self.targets = CellTargets(tokenizer)
        self.cache: dict[str, dict[int, list[int]]] = {}

    def __call__(self, page_id: str) -> dict[int, list[int]]:
        if page_id not in self.cache:
            r = self.ds.pages[page_id]
            cells, toks, _ = self.targets.page(r["words"], self.size, self.grid)
            m: dict[int, list[int]] = {}
            for c, t in zip(cells.tolist(), toks.tolist()):
                if t != self.targets.blank:
                    m.setdefault(t, []).append(c)
            self.cache[page_id] = m
        return self.cache[page_id]


def guided_attention_loss(capture: AttentionCapture, q_ids: torch.Tensor, page_cells: list[dict[int, list[int]]],
                          prefix_len: int, n_visual: int) -> torch.Tensor | None:
    """Cross-entropy of each query token's attention over the page's visual tokens (sdpa logits restricted to them)
    against the cells that show that token; positions whose token is not on the page are not supervised."""
    losses = []
    for layer, (q, k) in capture.store.items():
        B, H, Tq, d = q.shape
        kv_heads = k.shape[1]
        kv = k[:, :, prefix_len + 1 : prefix_len + 1 + n_visual]  # rows after <|vision_start|>
        kv = kv.repeat_interleave(H // kv_heads, dim=1)
        logits = (q @ kv.transpose(-1, -2)) * d ** -0.5  # (B, H, Tq, n_visual)
        target = torch.zeros(B, Tq, n_visual, device=q.device)
        for b, cells in enumerate(page_cells):
            for t, tid in enumerate(q_ids.tolist()):
                where = cells.get(tid)
                if where:
                    target[b, t, where] = 1.0 / len(where)
        mask = target.sum(-1) > 0
        if mask.any():
            logp = torch.log_softmax(logits.float(), -1)
            ce = -(logp * target[:, None]).sum(-1)  # (B, H, Tq)
            losses.append(ce.permute(0, 2, 1)[mask].mean())
    capture.store.clear()
    return torch.stack(losses).mean() if losses else None


class AttentionGuide:
    """Guided attention for the teacher trained from scratch: in `layers`, each query token's attention over the
    page's visual tokens is trained towards the cells that show that token (the renderer knows every token's
    cells; see guided_attention_loss). This builds the query -> page reading circuit in the layers that become
    the student's interaction band; it only shapes the model's own weights and is not used at inference."""

    def __init__(self, model, cells: PageTokenCells, layers):
        self.cells = cells
        self.capture = AttentionCapture(model, set(layers))

    def reset(self) -> None:
        self.capture.store.clear()

    def close(self) -> None:
        self.capture.close()

    def loss(self, q_ids: torch.Tensor, page_ids: list[str], prefix_len: int, n_visual: int) -> torch.Tensor | None:
        return guided_attention_loss(self.capture, q_ids, [self.cells(p) for p in page_ids], prefix_len, n_visual)


class PairScorer(torch.nn.Module):
    """Scores M queries x N pages through the engine's cached path (differentiable)."""

    def __init__(self, model, processor, cfg: RerankConfig, template: PromptTemplate = DEFAULT_TEMPLATE):
        super().__init__()
        self.model = model
        self.processor = processor
        self.tok = processor.tokenizer
        self.adapter = adapter_for(model)
        self.cfg = cfg.resolve(self.adapter.num_layers)
        self.template = template
        self.head = YesNoHead(model.lm_head, label_token_id(self.tok, template.positive), label_token_id(self.tok, template.negative))
        self.prefix_ids = tokenize(self.tok, template.prefix)

    def forward(self, images: list, queries: list[str], importance: list[list[torch.Tensor]] | None = None,
                guide: tuple[AttentionGuide, list[str]] | None = None):
        """(M, N) scores; with `guide` = (AttentionGuide, page ids) also the mean guided-attention loss."""
        kvs = prefill_pages(self.adapter, self.processor.image_processor, self.prefix_ids, images, self.cfg.band)
        pk = prefix_kv(self.adapter, self.prefix_ids, self.cfg.exit_layer)
        rows, aux = [], {}
        for m, q in enumerate(queries):
            ids = query_ids(self.tok, self.template, q)
            if guide is not None:
                guide[0].reset()  # only this query pass is supervised
            rows.append(score_cached(self.adapter, pk, ids, kvs, self.cfg, self.head,
                                     None if importance is None else importance[m]))
            if guide is not None:
                g = guide[0].loss(ids, guide[1], len(self.prefix_ids), kvs[0].n_visual)
                if g is not None:
                    aux.setdefault("match", []).append(g)
        scores = torch.stack(rows)
        if guide is None:
            return scores
        return scores, {k: torch.stack(v).mean() for k, v in aux.items()}


class Importance:
    """Query-dependent pruning maps from the ColQwen3 embedder (retrieval.importance), cached per page/query."""

    def __init__(self, embedder_dir, device, max_visual_tokens: int, vision_cache: FrozenVisionCache | None = None):
        from ..pages import PixelBudget
        from ..retrieval.embedder import PageEmbedder

        budget = PixelBudget.from_visual_tokens(max_visual_tokens, patch_size=16, merge_size=2)
        self.embedder = PageEmbedder.from_pretrained(str(embedder_dir), device=str(device), pixel_budget=budget)
        self.pages: dict[str, object] = {}
        self.queries: dict[str, torch.Tensor] = {}
        if vision_cache is not None:
            try:  # the embedder's tower is the reranker's (both from `pretrain`): compute each page's features once
                vision_cache.share_with(visual_module(self.embedder.model))
            except ValueError:
                FrozenVisionCache(visual_module(self.embedder.model))

    def mine(self, ds: DataSet, split: str, k: int, pool: int = 96, seed: int = 0) -> dict[str, list[str]]:
        """First-stage hard negatives: each query's top-k pages by the embedder's MaxSim (positive excluded).

        Scoring every query against every page of the split costs O(queries x pages) MaxSims (hours on a CPU for
        the full training split), so each query is scored against a candidate pool: its BM25 list, the pages of
        its own document and seeded random pages, `pool` pages in all - the pages a first stage confuses.
        """
        from ..pages import Page
        from ..retrieval.maxsim import maxsim_scores

        pids = ds.page_ids(split)
        by_doc: dict[str, list[str]] = {}
        for p in pids:
            by_doc.setdefault(ds.pages[p]["doc_id"], []).append(p)
        todo = [p for p in pids if p not in self.pages]
        for s in range(0, len(todo), 64):
            chunk = todo[s : s + 64]
            self.pages.update(zip(chunk, self.embedder.encode_pages([Page(ds.image(p), id=p) for p in chunk], batch_size=8,
                                                                    show_progress=False)))
        out = {}
        qs = ds.split_queries(split)
        embs = self.embedder.encode_queries([q["query"] for q in qs])
        for q, e in zip(qs, embs):
            rng = random.Random(f"{seed}:mine:{q['qid']}")
            cand = list(dict.fromkeys(q["hard_negatives"] + by_doc[ds.pages[q["positive"]]["doc_id"]]))
            cand += rng.sample(pids, min(len(pids), max(0, pool - len(cand))))
            cand = [p for p in dict.fromkeys(cand) if p != q["positive"]][:pool]
            vecs = [self.pages[p].vectors.numpy() for p in cand]
            offsets = np.zeros(len(vecs) + 1, dtype=np.int64)
            np.cumsum([len(v) for v in vecs], out=offsets[1:])
            scores = maxsim_scores(e.numpy(), np.concatenate(vecs), offsets)
            out[q["qid"]] = [cand[j] for j in np.argsort(-scores, kind="stable")[:k]]
        return out

    def maps(self, ds: DataSet, page_ids: list[str], queries: list[str], grids: list[tuple[int, int]] | None = None):
        from ..pages import Page
        from ..retrieval.importance import query_importance

        todo = [p for p in page_ids if p not in self.pages]
        if todo:
            embs = self.embedder.encode_pages([Page(ds.image(p), id=p) for p in todo], batch_size=8, show_progress=False)
            self.pages.update(zip(todo, embs))
        tq = [q for q in dict.fromkeys(queries) if q not in self.queries]
        if tq:
            self.queries.update(zip(tq, self.embedder.encode_queries(tq)))
        return [[query_importance(self.queries[q], self.pages[p], None if grids is None else grids[j]).flat()
                 for j, p in enumerate(page_ids)] for q in queries]


def sample_batch(ds: DataSet, queries_by_page: dict[str, list[dict]], train_q: list[dict], rng: random.Random,
                 groups: int, hard: int, extra: int, mined: dict[str, list[str]] | None = None,
                 random_frac: float = 0.0, all_pages: list[str] | None = None) -> tuple[list[str], list[dict]]:
    """G queries with distinct positives, K negatives each (a `random_frac` share drawn from all pages, the rest
    from the query's hard-negative pool), and up to `extra` further queries of pages already in the batch."""
    qs, pages = [], []
    for q in rng.sample(train_q, min(len(train_q), 4 * groups)):  # the same draws whenever 4G queries exist
        if q["positive"] in pages:
            continue
        qs.append(q)
        pages.append(q["positive"])
        if len(qs) == groups:
            break
    for q in list(qs):
        pool = mined[q["qid"]] if mined and q["qid"] in mined else q["hard_negatives"][:8]
        cands = [p for p in pool[:8] if p not in pages]
        for _ in range(hard):
            if all_pages and rng.random() < random_frac:
                p = rng.choice(all_pages)
            elif cands:
                p = cands.pop(rng.randrange(len(cands)))
            else:
                continue
            if p not in pages:
                pages.append(p)
    others = [p for p in pages[groups:] if queries_by_page.get(p)]
    for p in rng.sample(others, min(extra, len(others))):
        qs.append(rng.choice(queries_by_page[p]))
    return pages, qs


def label_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    pos, neg = labels > 0.5, labels < 0.5
    w = torch.where(pos, 0.5 / pos.sum().clamp_min(1), 0.5 / neg.sum().clamp_min(1))
    bce = (F.binary_cross_entropy_with_logits(scores, labels, reduction="none") * w).sum()
    listwise = -(F.log_softmax(scores, dim=-1) * labels).sum(-1).mean()
    return bce + listwise


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1), log_target=True,
                  reduction="batchmean")
    return kl + 0.1 * F.mse_loss(student, teacher)


@torch.no_grad()
def evaluate(model, processor, cfg: RerankConfig, ds: DataSet, split: str, importance: Importance | None,
             n_candidates: int = 10, max_queries: int | None = None) -> dict:
    """Rerank each query's [positive + BM25 hard negatives] with MiniReranker (the inference facade)."""
    from ..pages import Page
    from ..rerankers import MiniReranker

    was_training = model.training
    rr = MiniReranker(model, processor, cfg)
    pages = {}
    rankings, rel = [], []
    for q in ds.split_queries(split)[:max_queries]:
        cand = sorted([q["positive"]] + q["hard_negatives"][: n_candidates - 1])  # sorted: no position hint
        for p in cand:
            if p not in pages:
                pages[p] = Page(ds.image(p), id=p)
        imp = None
        if rr.config.keep_ratio < 1.0:
            imp = dict(zip(cand, importance.maps(ds, cand, [q["query"]])[0]))
        res = rr.rerank(q["query"], [pages[p] for p in cand], importance=imp)
        rankings.append([r.page_id for r in res])
        rel.append({q["positive"]})
    model.train(was_training)
    return summarize(rankings, rel)


def train(args) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device, amp = setup_runtime(args)
    ds = DataSet(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "log.jsonl", quiet=args.quiet)
    if args.init_pretrain is not None:
        tok = ds.tokenizer()
        model, spec = load_pretrained_reader(args.init_pretrain, tok, seed=args.seed)
        processor = reranker_processor(tok, spec)
    else:
        model = AutoModelForImageTextToText.from_pretrained(str(args.init), dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(str(args.init))
    model.to(device).train()
    tok = processor.tokenizer
    n_layers = adapter_for(model).num_layers
    mvt = max_visual_tokens_of(processor)

    if args.stage == "teacher":
        cfg = RerankConfig(batch_size=args.eval_batch)
    else:
        band = tuple(args.band) if args.band else None
        cfg = RerankConfig(exit_layer=args.exit_layer, band=band, keep_ratio=args.keep_ratio, query_positions=args.query_positions,
                           shared_offset=shared_offset_for(tok, DEFAULT_TEMPLATE, mvt) if args.query_positions == "shared" else None,
                           batch_size=args.eval_batch)
    cfg = cfg.resolve(n_layers)
    scorer = PairScorer(model, processor, cfg)

    teacher = None
    if args.stage == "student":
        tmodel = AutoModelForImageTextToText.from_pretrained(str(args.teacher), dtype=torch.float32).to(device).eval()
        for p in tmodel.parameters():
            p.requires_grad_(False)
        teacher = PairScorer(tmodel, AutoProcessor.from_pretrained(str(args.teacher)), RerankConfig())
    cache = None
    if not args.train_vision:
        cache = FrozenVisionCache(visual_module(model))  # frozen tower: its page features are computed once per page
    if teacher is not None:
        try:
            if cache is None:
                raise ValueError
            cache.share_with(visual_module(teacher.model))
        except ValueError:
            FrozenVisionCache(visual_module(teacher.model))
    importance = Importance(args.embedder, device, mvt, cache) if args.embedder else None
    mined = None
    if args.negatives == "first-stage":
        if importance is None:
            raise SystemExit("--negatives first-stage needs --embedder")
        mined_file = out / "mined_negatives.json"
        if mined_file.exists():
            mined = json.loads(mined_file.read_text())
        else:
            t0 = time.time()
            mined = importance.mine(ds, "train", 10)
            mined_file.write_text(json.dumps(mined))
            log(event="mined", queries=len(mined), seconds=round(time.time() - t0, 1))
    if cfg.keep_ratio < 1.0 and importance is None:
        raise SystemExit("--keep-ratio < 1 trains pruning-aware and needs --embedder (the first stage's importance maps)")

    params = trainable_parameters(model, cfg.exit_layer, args.train_vision, args.train_embeddings)
    guide = None
    if args.guide_layers and args.stage == "teacher" and args.guide_weight > 0:
        guide = AttentionGuide(model, PageTokenCells(ds, tok), args.guide_layers)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    meta = load_checkpoint(out / "ckpt", model, opt)
    step = meta["step"] if meta else 0
    log(event="start", stage=args.stage, step=step, params=n_params(model), trainable=sum(p.numel() for p in params),
        config=cfg.to_dict())

    train_q = ds.split_queries("train")
    all_train_pages = ds.page_ids("train")
    by_page: dict[str, list[dict]] = {}
    for q in train_q:
        by_page.setdefault(q["positive"], []).append(q)
    bar = progress(args.steps, step, args.stage, args.quiet)
    t_last = time.time()
    while step < args.steps:
        rng = random.Random(f"{args.seed}:{step}")
        frac = args.random_frac[0] + (args.random_frac[1] - args.random_frac[0]) * min(1.0, step / max(1, args.steps - 1))
        page_ids, qs = sample_batch(ds, by_page, train_q, rng, args.groups, args.hard, args.extra_queries, mined,
                                    frac, all_train_pages)
        images = [ds.image(p) for p in page_ids]
        texts = [q["query"] for q in qs]
        labels = torch.tensor([[float(q["positive"] == p) for p in page_ids] for q in qs], device=device)
        imp = importance.maps(ds, page_ids, texts) if (importance is not None and cfg.keep_ratio < 1.0) else None
        set_lr(opt, lr_at(step, args.steps, args.lr, args.warmup))
        with autocast(device, amp):
            if guide is not None:
                scores, aux = scorer(images, texts, imp, guide=(guide, page_ids))
                scores = scores.float()
            else:
                scores, aux = scorer(images, texts, imp).float(), {}
            loss = label_loss(scores, labels)
            parts = {"label_loss": float(loss.detach())}
            for k, v in aux.items():
                parts[f"{k}_loss"] = float(v.detach())
                loss = loss + args.guide_weight * v
            if teacher is not None:
                with torch.no_grad():
                    t_scores = teacher(images, texts).float()
                d = distill_loss(scores, t_scores)
                loss = args.label_weight * loss + d
                parts["distill"] = float(d.detach())
        optimizer_step(opt, loss, params)
        step += 1
        bar.update(1)
        if step % args.log_every == 0:
            acc = float((scores.detach().argmax(-1) == labels.argmax(-1)).float().mean())
            log(step=step, loss=float(loss.detach()), batch_top1=acc, pages=len(page_ids), queries=len(qs),
                sec_per_step=(time.time() - t_last) / args.log_every, **parts)
            t_last = time.time()
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(out / "ckpt", model, opt, step)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            if guide is not None:
                guide.capture.config._attn_implementation = guide.capture.previous
            log(step=step, **{f"val_{k}": v for k, v in evaluate(model, processor, cfg, ds, "val", importance, max_queries=args.eval_queries).items()})
            if guide is not None:
                guide.capture.config._attn_implementation = guide.capture.NAME
    bar.close()
    if guide is not None:
        guide.close()
    result = {f"val_{k}": v for k, v in evaluate(model, processor, cfg, ds, "val", importance, max_queries=args.eval_queries).items()}
    log(event="done", step=step, **result)
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(final)
    processor.save_pretrained(final)
    write_settings(final, cfg, DEFAULT_TEMPLATE, max_visual_tokens=mvt, training={"stage": args.stage, "steps": step, **result})
    write_json(out / "result.json", {"step": step, **result})
    return result


def trainable_parameters(model, exit_layer: int, train_vision: bool = False, train_embeddings: bool = False,
                         first_layer: int = 0) -> list:
    """Set requires_grad on `model` the way the recipe trains it and return the trainable parameters. LM layers
    below `first_layer` stay as they are too (the listwise stage's --freeze-below)."""
    frozen = set()
    if not train_vision:
        frozen = {id(p) for p in visual_module(model).parameters()}
    if not train_embeddings:
        # The token-embedding table (tied with the LM head) is what `pretrain` aligned the visual tokens with; Adam
        # steps on it from a noisy yes/no loss scramble that alignment within a few dozen steps, so it stays fixed.
        frozen.add(id(text_embeddings(model).weight))
    params = []
    for n, p in model.named_parameters():
        # Layers at or after the exit never run in the student: leave them untouched.
        layer = lm_layer(n)
        train = id(p) not in frozen and (layer is None or first_layer <= layer < exit_layer)
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minirerank_core.train.reranker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["teacher", "student"])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="run directory (resumes from OUT/ckpt; final model in OUT/final)")
    init = ap.add_mutually_exclusive_group(required=True)
    init.add_argument("--init-pretrain", type=Path, help="run directory of the pretrain stage (teacher from scratch)")
    init.add_argument("--init", help="a Qwen3-VL / Qwen2-VL checkpoint (path or hub id): the teacher, or a real model")
    ap.add_argument("--teacher", help="student: the teacher checkpoint to distil from")
    ap.add_argument("--embedder", help="ColQwen checkpoint whose importance maps prune the student (needed for --keep-ratio < 1)")
    ap.add_argument("--exit-layer", type=int, default=None)
    ap.add_argument("--band", type=int, nargs=2, default=None, metavar=("B0", "B1"))
    ap.add_argument("--keep-ratio", type=float, default=1.0)
    ap.add_argument("--negatives", choices=["bm25", "first-stage"], default="bm25",
                    help="hard negatives: the data stage's BM25 list, or the embedder's top-10 (mined once, needs --embedder)")
    ap.add_argument("--query-positions", choices=["exact", "shared"], default="shared")
    ap.add_argument("--random-frac", type=float, nargs=2, default=(0.0, 0.0), metavar=("START", "END"),
                    help="share of negatives drawn at random instead of from the hard pool, linear from START to END "
                         "over the run (a curriculum: a model trained from scratch first learns on easy negatives)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--groups", type=int, default=2, help="queries with distinct positives per step")
    ap.add_argument("--hard", type=int, default=3, help="BM25 hard negatives per query")
    ap.add_argument("--extra-queries", type=int, default=2, help="further queries of pages already in the batch")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--guide-layers", type=int, nargs="*", default=[], metavar="L",
                    help="teacher: supervise these LM layers' attention from query tokens to the page cells that show "
                         "them (the renderer's boxes); see guided_attention_loss()")
    ap.add_argument("--guide-weight", type=float, default=1.0)
    ap.add_argument("--label-weight", type=float, default=0.5, help="student: weight of the label loss next to distillation")
    ap.add_argument("--train-vision", action="store_true")
    ap.add_argument("--train-embeddings", action="store_true",
                    help="also train the (tied) token embeddings (default: frozen, they anchor the visual-text alignment)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-queries", type=int, default=None)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--ckpt-every", type=int, default=20)
    add_runtime_args(ap)
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.stage == "student" and not args.teacher:
        raise SystemExit("student needs --teacher")
    train(args)


if __name__ == "__main__":
    main()
