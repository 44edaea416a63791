"""Stage `pretrain`: teach the shared Qwen3-VL vision tower to read, with dense targets from the renderer.

    python -m minirerank_core.train.pretrain --data /work/train_runs/data --out /work/train_runs/pretrain

A from-scratch vision tower learns slowly from one relevance bit per (query, page) pair. The renderer knows where
every word was drawn, so each merged visual token (a 32x32 px cell) gets a target: the distribution over the
text tokens drawn under it (each word tokenised as " word", its box split across its tokens by character count;
the lower-cased form shares the weight, so "Socket" on the page sits near the query token "socket"). The cell's
feature - the vision merger's output, i.e. exactly what the LM receives in place of `<|image_pad|>` - and each
deepstack feature are scored against the LM's token-embedding table by cosine x a learned scale, with a soft
cross-entropy. Cells with no text predict `<|vision_pad|>`. Only the vision tower and the token embeddings train;
the result initialises the reranker (vision + embeddings) and the ColQwen3 embedder (vision + embeddings).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..fileio import write_json
from .common import (Logger, add_runtime_args, autocast, load_checkpoint, lr_at, optimizer_step, progress,
                     save_checkpoint, set_lr, setup_runtime)
from .data import DataSet
from .models import MERGE, PATCH, ModelSpec, build_reranker, n_params, reranker_processor, text_embeddings, visual_module

CELL = PATCH * MERGE


class CellTargets:
    """Sparse per-cell token targets of rendered pages: {page_id: (cell index, token id, weight) tensors}."""

    def __init__(self, tokenizer, blank_token: str = "<|vision_pad|>", min_weight: float = 0.15):
        self.tok = tokenizer
        self.blank = tokenizer.convert_tokens_to_ids(blank_token)
        self.min_weight = min_weight
        self._cache: dict[str, list[tuple[int, int, int]]] = {}

    def _pieces(self, word: str) -> list[tuple[int, float, float]]:
        """(token id, start fraction, end fraction) of `word` across its box, for " word" tokenised."""
        if word not in self._cache:
            enc = self.tok(" " + word, add_special_tokens=False, return_offsets_mapping=True)
            n = max(1, len(word))
            self._cache[word] = [(t, max(0, a - 1) / n, max(0, b - 1) / n) for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
        return self._cache[word]

    def page(self, words: list, image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets for one page whose image (w, h) is resized onto `grid` (rows, cols) of merged tokens."""
        W, H = image_size
        gh, gw = grid
        sx, sy = gw * CELL / W, gh * CELL / H
        acc: dict[tuple[int, int], float] = {}
        for text, x0, y0, x1, y1, _kind in words:
            variants = [text]
            low = text.strip(".,;:()[]{}'\"`<>!?").lower()
            if low and low != text:
                variants.append(low)
            share = 1.0 / len(variants)
            for v in variants:
                for tid, fa, fb in self._pieces(v):
                    bx0, bx1 = (x0 + fa * (x1 - x0)) * sx, (x0 + fb * (x1 - x0)) * sx
                    by0, by1 = y0 * sy, y1 * sy
                    area = max(1e-6, (bx1 - bx0) * (by1 - by0))
                    for r in range(int(by0 // CELL), min(gh, int(by1 // CELL) + 1)):
                        for c in range(int(bx0 // CELL), min(gw, int(bx1 // CELL) + 1)):
                            ox = min(bx1, (c + 1) * CELL) - max(bx0, c * CELL)
                            oy = min(by1, (r + 1) * CELL) - max(by0, r * CELL)
                            if ox > 0 and oy > 0:
                                key = (r * gw + c, tid)
                                acc[key] = acc.get(key, 0.0) + share * ox * oy / area
        cells, toks, ws = [], [], []
        for (cell, tid), w in acc.items():
            if w >= self.min_weight:
                cells.append(cell)
                toks.append(tid)
                ws.append(w)
        covered = set(cells)
        for cell in range(gh * gw):
            if cell not in covered:
                cells.append(cell)
                toks.append(self.blank)
                ws.append(1.0)
        return torch.tensor(cells), torch.tensor(toks), torch.tensor(ws, dtype=torch.float32)


CHARS = [chr(c) for c in range(33, 127)]  # printable ASCII without space; class 0 = no glyph, last = other
CHAR_INDEX = {c: i + 1 for i, c in enumerate(CHARS)}
N_CHAR_CLASSES = len(CHARS) + 2


def patch_char_targets(words: list, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(gh*2*gw*2,) glyph class of each 16-px patch, in the image processor's patch order (merge windows of 2x2
    patches, row-major over merged cells). A glyph's box is its share of the word box by character count."""
    W, H = image_size
    gh, gw = grid
    ph, pw = 2 * gh, 2 * gw
    sx, sy = pw * PATCH / W, ph * PATCH / H
    grid_t = torch.zeros(ph, pw, dtype=torch.long)
    for text, x0, y0, x1, y1, _kind in words:
        n = max(1, len(text))
        cw = (x1 - x0) / n
        for k, ch in enumerate(text):
            cx = (x0 + (k + 0.5) * cw) * sx
            col = int(cx // PATCH)
            if not 0 <= col < pw:
                continue
            for row in range(int(y0 * sy // PATCH), min(ph, int((y1 * sy - 1) // PATCH) + 1)):
                overlap = min(y1 * sy, (row + 1) * PATCH) - max(y0 * sy, row * PATCH)
                if overlap >= 4:
                    grid_t[row, col] = CHAR_INDEX.get(ch, N_CHAR_CLASSES - 1)
    # (ph, pw) -> merge windows: (gh, 2, gw, 2) -> (gh, gw, 2, 2)
    return grid_t.view(gh, 2, gw, 2).permute(0, 2, 1, 3).reshape(-1)


def dense_targets(parts, n_cells: list[int], vocab: int) -> torch.Tensor:
    """(sum cells, vocab) row-normalised soft targets from per-page sparse targets."""
    out = torch.zeros(sum(n_cells), vocab)
    off = 0
    for (cells, toks, ws), n in zip(parts, n_cells):
        out.index_put_((cells + off, toks), ws, accumulate=True)
        off += n
    return out / out.sum(1, keepdim=True).clamp_min(1e-6)


class Reader(torch.nn.Module):
    """Vision tower + token embeddings of a Qwen3-VL model, scored per cell against every token."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logit_scale = torch.nn.Parameter(torch.tensor(3.0))  # exp(3) ~ 20
        self.char_head = torch.nn.Linear(model.config.vision_config.hidden_size, N_CHAR_CLASSES)

    def forward(self, pixel_values, grid_thw, with_chars: bool = False):
        out = self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        feats = [torch.cat(list(out.pooler_output))] + [d if torch.is_tensor(d) else torch.cat(list(d)) for d in (out.deepstack_features or [])]
        emb = F.normalize(text_embeddings(self.model).weight, dim=-1)
        scale = self.logit_scale.exp().clamp(max=100)
        logits = [scale * F.normalize(f.float(), dim=-1) @ emb.T for f in feats]
        if with_chars:
            return logits, self.char_head(out.last_hidden_state.float())
        return logits


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


@torch.no_grad()
def evaluate(reader: Reader, proc, ds: DataSet, targets: CellTargets, page_ids: list[str], device, amp, batch: int = 8) -> dict:
    reader.eval()
    hit1 = hit5 = n = 0
    loss = 0.0
    vocab = text_embeddings(reader.model).weight.shape[0]
    for s in range(0, len(page_ids), batch):
        ids = page_ids[s : s + batch]
        imgs = [ds.image(p) for p in ids]
        inp = proc.image_processor(images=imgs, return_tensors="pt")
        grids = [(int(g[1]) // MERGE, int(g[2]) // MERGE) for g in inp["image_grid_thw"]]
        parts = [targets.page(ds.pages[p]["words"], im.size, g) for p, im, g in zip(ids, imgs, grids)]
        tgt = dense_targets(parts, [a * b for a, b in grids], vocab)
        with autocast(device, amp):
            logits = reader(inp["pixel_values"].to(device), inp["image_grid_thw"].to(device))[0].float().cpu()
        loss += float(soft_ce(logits, tgt)) * len(ids)
        text = tgt[:, targets.blank] < 0.5
        top = logits[text].topk(5, dim=-1).indices
        t = tgt[text]
        hit1 += int((t.gather(1, top[:, :1]) > 0).any(1).sum())
        hit5 += int((t.gather(1, top) > 0).any(1).sum())
        n += int(text.sum())
    reader.train()
    return dict(val_loss=loss / max(1, len(page_ids)), cell_acc1=hit1 / max(1, n), cell_acc5=hit5 / max(1, n))


def train(args) -> dict:
    device, amp = setup_runtime(args)
    ds = DataSet(args.data)
    tok = ds.tokenizer()
    spec = ModelSpec.from_dict(json.loads(args.spec.read_text())) if args.spec else ModelSpec()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
    log = Logger(out / "log.jsonl", quiet=args.quiet)
    model = build_reranker(tok, spec, seed=args.seed)
    proc = reranker_processor(tok, spec)
    reader = Reader(model).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(visual_module(model).parameters()) + [text_embeddings(model).weight, reader.logit_scale] + list(reader.char_head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    meta = load_checkpoint(out / "ckpt", reader, opt)
    step = meta["step"] if meta else 0
    log(event="start", step=step, params_vision=n_params(visual_module(model)), pages=len(ds.page_ids("train")))

    targets = CellTargets(tok)
    train_ids = ds.page_ids("train")
    val_ids = ds.page_ids("val")[: args.eval_pages]
    vocab = text_embeddings(model).weight.shape[0]
    bar = progress(args.steps, step, "pretrain", args.quiet)
    t_last = time.time()
    while step < args.steps:
        rng = random.Random(f"{args.seed}:{step}")
        ids = rng.sample(train_ids, args.batch)
        imgs = [ds.image(p) for p in ids]
        inp = proc.image_processor(images=imgs, return_tensors="pt")
        grids = [(int(g[1]) // MERGE, int(g[2]) // MERGE) for g in inp["image_grid_thw"]]
        tgt = dense_targets([targets.page(ds.pages[p]["words"], im.size, g) for p, im, g in zip(ids, imgs, grids)],
                            [a * b for a, b in grids], vocab).to(device)
        chars = torch.cat([patch_char_targets(ds.pages[p]["words"], im.size, g) for p, im, g in zip(ids, imgs, grids)]).to(device)
        set_lr(opt, lr_at(step, args.steps, args.lr, args.warmup))
        with autocast(device, amp):
            outs, char_logits = reader(inp["pixel_values"].to(device), inp["image_grid_thw"].to(device), with_chars=True)
        loss = soft_ce(outs[0].float(), tgt) + sum(0.5 * soft_ce(o.float(), tgt) for o in outs[1:])
        char_loss = F.cross_entropy(char_logits.float(), chars)
        loss = loss + args.char_weight * char_loss
        optimizer_step(opt, loss, params)
        step += 1
        bar.update(1)
        if step % args.log_every == 0:
            log(step=step, loss=float(loss.detach()), char_loss=float(char_loss.detach()),
                scale=float(reader.logit_scale.detach().exp()), sec_per_step=(time.time() - t_last) / args.log_every)
            t_last = time.time()
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(out / "ckpt", reader, opt, step)
        if step % args.eval_every == 0 or step == args.steps:
            log(step=step, **evaluate(reader, proc, ds, targets, val_ids, device, amp))
    bar.close()
    result = evaluate(reader, proc, ds, targets, val_ids, device, amp)
    write_json(out / "result.json", {"step": step, **result})
    log(event="done", **result)
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m minirerank_core.train.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="dataset directory from the data stage")
    ap.add_argument("--out", type=Path, required=True, help="run directory (checkpoint in OUT/ckpt; resumes from it)")
    ap.add_argument("--spec", type=Path, default=None, help="ModelSpec JSON (default: the shipped sizes)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--char-weight", type=float, default=1.0,
                    help="weight of the auxiliary per-patch glyph classification (16-px patches -> character)")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-pages", type=int, default=48)
    ap.add_argument("--ckpt-every", type=int, default=50)
    add_runtime_args(ap)
    return ap


def main(argv=None) -> None:
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
