"""Stage `embedder`: the ColQwen3 first stage, contrastive MaxSim training with in-batch and hard negatives.

    python -m minirerank_core.train.embedder --data DATA --init-pretrain RUN/pretrain --out RUN/embedder
    python -m minirerank_core.train.embedder --data DATA --init vidore/colqwen3-... --out RUN/embedder  # real checkpoint

Each step draws B training queries with distinct positive pages, adds `--hard` BM25 hard negatives (from the
data stage), encodes pages (colpali's image prompt) and queries (colpali's query augmentation tokens) with the
model, and minimises the cross-entropy of each query's length-normalised MaxSim scores (retrieval.maxsim; the division by the
query length is the loss's per-query temperature, the index scores raw MaxSim) over all pages in the
batch (temperature --temperature). The vision tower is frozen by default (it comes from `pretrain` and is shared
with the reranker, whose importance maps rely on the identical grid). The final model is written with
save_pretrained (+ processor) to OUT/final.
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

from ..retrieval.maxsim import maxsim_padded, maxsim_scores
from ..fileio import write_json
from .common import (Logger, add_runtime_args, autocast, load_checkpoint, lr_at, optimizer_step, progress,
                     save_checkpoint, set_lr, setup_runtime)
from .data import DataSet
from .metrics import summarize
from .models import (FrozenVisionCache, build_embedder, copy_vision_and_embeddings, embedder_processor,
                     load_pretrained_reader, n_params, residual_identity_init, visual_module)


def encode(model, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, D) L2-normalised vectors and (B, S) bool mask of real rows."""
    batch = {k: v.to(device) for k, v in batch.items()}
    return model(**batch), batch["attention_mask"].bool()


def length_normalised_maxsim(q: torch.Tensor, qmask: torch.Tensor, d: torch.Tensor, dmask: torch.Tensor) -> torch.Tensor:
    """The loss's logits: MaxSim (retrieval.maxsim, the one definition) divided by the query's length. Each row's
    softmax is over pages for one query, so the division is a per-query temperature: it keeps the logits of long
    and short queries on one scale for --temperature, and changes no query's ranking."""
    return maxsim_padded(q, qmask, d, dmask) / qmask.sum(-1, keepdim=True).clamp_min(1)


@torch.no_grad()
def evaluate(model, proc, ds: DataSet, split: str, device, amp, max_queries: int | None = None, batch: int = 8) -> dict:
    model.eval()
    pids = ds.page_ids(split)
    qs = ds.split_queries(split)[:max_queries]
    pages = []
    for s in range(0, len(pids), batch):
        with autocast(device, amp):
            d, m = encode(model, proc.process_images([ds.image(p) for p in pids[s : s + batch]]), device)
        pages += [d[i, m[i]].float().cpu().numpy() for i in range(d.shape[0])]
    vectors, offsets = np.concatenate(pages), np.concatenate([[0], np.cumsum([len(p) for p in pages])])
    rankings = []
    for s in range(0, len(qs), 16):
        with autocast(device, amp):
            q, qm = encode(model, proc.process_queries(queries=[x["query"] for x in qs[s : s + 16]]), device)
        for i in range(q.shape[0]):
            scores = maxsim_scores(q[i, qm[i]].float().cpu().numpy(), vectors, offsets)  # the index's own scoring
            rankings.append([pids[j] for j in np.argsort(-scores, kind="stable").tolist()])
    model.train()
    return summarize(rankings, [{x["positive"]} for x in qs])


def save_final(model, proc, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)


def train(args) -> dict:
    device, amp = setup_runtime(args)
    ds = DataSet(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "log.jsonl", quiet=args.quiet)
    if args.init is not None:  # a real colpali-engine ColQwen3 checkpoint (local path or hub id)
        from colpali_engine.models import ColQwen3, ColQwen3Processor

        model = ColQwen3.from_pretrained(str(args.init))
        proc = ColQwen3Processor.from_pretrained(str(args.init))
        spec = None
    else:
        tok = ds.tokenizer()
        reader, spec = load_pretrained_reader(args.init_pretrain, tok, seed=args.seed)
        model = build_embedder(tok, spec, seed=args.seed)
        copy_vision_and_embeddings(reader, model)
        del reader
        if not args.no_identity_init:
            residual_identity_init(model, model.custom_text_proj)
        proc = embedder_processor(tok, spec)
        (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
    model.to(device).train()
    if not args.train_vision:
        for p in visual_module(model).parameters():
            p.requires_grad_(False)
        FrozenVisionCache(visual_module(model))  # frozen tower: its page features are computed once per page
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    meta = load_checkpoint(out / "ckpt", model, opt)
    step = meta["step"] if meta else 0
    log(event="start", step=step, params=n_params(model), trainable=sum(p.numel() for p in params))

    train_q = ds.split_queries("train")
    bar = progress(args.steps, step, "embedder", args.quiet)
    t_last = time.time()
    while step < args.steps:
        rng = random.Random(f"{args.seed}:{step}")
        qs, seen = [], set()
        for q in rng.sample(train_q, 4 * args.batch):
            if q["positive"] not in seen:
                qs.append(q)
                seen.add(q["positive"])
            if len(qs) == args.batch:
                break
        page_ids = [q["positive"] for q in qs]
        for q in qs[: args.hard]:
            cands = [p for p in q["hard_negatives"][:5] if p not in page_ids]
            if cands:
                page_ids.append(rng.choice(cands))
        set_lr(opt, lr_at(step, args.steps, args.lr, args.warmup))
        with autocast(device, amp):
            d, dm = encode(model, proc.process_images([ds.image(p) for p in page_ids]), device)
            q, qm = encode(model, proc.process_queries(queries=[x["query"] for x in qs]), device)
        scores = length_normalised_maxsim(q, qm, d, dm)
        loss = F.cross_entropy(scores / args.temperature, torch.arange(len(qs), device=device))
        optimizer_step(opt, loss, params)
        step += 1
        bar.update(1)
        if step % args.log_every == 0:
            log(step=step, loss=float(loss.detach()), sec_per_step=(time.time() - t_last) / args.log_every)
            t_last = time.time()
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(out / "ckpt", model, opt, step)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            log(step=step, **{f"val_{k}": v for k, v in evaluate(model, proc, ds, "val", device, amp).items()})
    bar.close()
    result = {f"val_{k}": v for k, v in evaluate(model, proc, ds, "val", device, amp).items()}
    log(event="done", step=step, **result)
    save_final(model, proc, out / "final")
    write_json(out / "result.json", {"step": step, **result})
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minirerank_core.train.embedder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="run directory (resumes from OUT/ckpt; final model in OUT/final)")
    init = ap.add_mutually_exclusive_group(required=True)
    init.add_argument("--init-pretrain", type=Path, help="run directory of the pretrain stage")
    init.add_argument("--init", help="a ColQwen3 checkpoint (path or hub id) to fine-tune instead")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8, help="queries per step (distinct positive pages)")
    ap.add_argument("--hard", type=int, default=4, help="BM25 hard-negative pages added per step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=0.02)
    ap.add_argument("--train-vision", action="store_true", help="also train the vision tower (default: frozen)")
    ap.add_argument("--no-identity-init", action="store_true",
                    help="random LM blocks instead of identity-initialised ones (see models.residual_identity_init)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=25)
    add_runtime_args(ap)
    return ap


def main(argv=None) -> None:
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
