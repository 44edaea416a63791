"""Engine benchmark: dense point-wise reranking vs. cache reuse vs. miniReranker (exit + band + pruning).

Random weights, realistic *shape*: by default Qwen3-VL-2B's text stack (28 layers, hidden 2048, 16 heads, 8 KV
heads, head dim 128, MLP 6144) and vision tower (24 blocks, hidden 1024), 1,024 visual tokens per page, float32
(this CPU has AVX2 only: torch's bf16 matmul is emulated there and slower than fp32; pass --dtype bfloat16 on
hardware with native bf16).
Speed does not depend on the weights' values, only on shapes.

Timings are taken side by side in one run. Dense costs one full forward per (query, page) pair and does not
depend on the page's content, so it is measured on `--dense-pairs` pairs and scaled linearly to N candidates
(said in the output). The online cached paths are measured on all N candidates; their caches are precomputed
from `--distinct-pages` page images (online cost is content-independent; prefill of 100 realistic pages would
take as long as the dense run itself).

    python benchmarks/engine.py            # realistic shape (several minutes on 2 CPU cores)
    python benchmarks/engine.py --quick    # toy shape, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from minirerank_core import MiniReranker, Page, RerankConfig
from minirerank_core import testing as T


def build_model(args, tokenizer):
    if args.quick:
        return T.tiny_model("qwen3_vl", tokenizer, num_layers=args.layers, dtype=DTYPES[args.dtype])
    config = T.tiny_config(
        "qwen3_vl", tokenizer, num_layers=args.layers, hidden_size=2048, num_heads=16, num_kv_heads=8,
        intermediate_size=6144, vision_depth=24, vision_hidden=1024,
    )
    config.vision_config.intermediate_size = 4096
    config.vision_config.num_heads = 16
    config.vision_config.num_position_embeddings = 2304
    config.vision_config.deepstack_visual_indexes = [5, 11, 17]
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen3VLForConditionalGeneration(config)
    return model.to(DTYPES[args.dtype]).eval()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy shape, a few seconds")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--visual-tokens", type=int, default=1024, help="visual tokens per page (square page)")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--exit", type=int, default=16, help="exit layer of the mini configuration")
    p.add_argument("--band", type=int, nargs=2, default=(10, 14))
    p.add_argument("--keep", type=float, default=0.25, help="query-time keep ratio")
    p.add_argument("--index-keep", type=float, default=0.5, help="index-time keep ratio (second mini variant)")
    p.add_argument("--dense-pairs", type=int, default=2, help="pairs timed one by one for the dense baseline")
    p.add_argument("--distinct-pages", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    args = p.parse_args(argv)
    if args.quick:
        args.candidates, args.visual_tokens, args.layers = min(args.candidates, 12), 64, 8
        args.exit, args.band, args.dense_pairs, args.distinct_pages = 5, (2, 4), 2, 2
    torch.set_num_threads(args.threads)

    side = int(round(args.visual_tokens**0.5))
    tokenizer = T.build_tokenizer()
    processor = T.build_processor("qwen3_vl", tokenizer, max_pixels=(side * 32) ** 2, min_pixels=32 * 32)
    t0 = time.perf_counter()
    model = build_model(args, tokenizer)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    images = [T.random_page_image(side * 32, side * 32, seed=i) for i in range(args.distinct_pages)]
    # N candidates: distinct ids, contents cycling over the prefilled images (their cache entries are shared).
    pages = [Page(images[i % len(images)], id=f"cand-{i}") for i in range(args.candidates)]
    query = "what was the total revenue growth reported for the last fiscal year"
    rng = np.random.default_rng(0)

    common = dict(dtype=args.dtype, batch_size=args.batch_size)
    variants = {
        "cached": RerankConfig(**common),
        "mini": RerankConfig(exit_layer=args.exit, band=tuple(args.band), keep_ratio=args.keep,
                             query_positions="shared", **common),
        "mini+index_prune": RerankConfig(exit_layer=args.exit, band=tuple(args.band), keep_ratio=args.keep,
                                         index_keep_ratio=args.index_keep, query_positions="shared", **common),
    }
    rows, results = [], {}

    # Dense: one full forward per pair.
    dense_r = MiniReranker(model, processor, variants["cached"])
    grid = dense_r.visual_grid(pages[0])
    n_vis = grid[0] * grid[1]
    # The fastest of `dense_pairs` single-pair forwards (the first one also pays one-time warm-up costs).
    dense_pair_s, _ = timed(lambda: dense_r.dense_scores(query, pages[:1], batch_size=1), repeat=args.dense_pairs)
    dense_s = dense_pair_s * args.candidates
    rows.append(("dense (HF forward per pair)", dense_s, f"best of {args.dense_pairs} single pairs ({dense_pair_s:.2f} s) x {args.candidates}"))

    for name, cfg in variants.items():
        r = MiniReranker(model, processor, cfg, memory_cache_bytes=64 * 1024**3)
        imp = [rng.random(n_vis).astype(np.float32) for _ in pages]
        idx_imp = [rng.random(n_vis).astype(np.float32) for _ in images]
        t = time.perf_counter()
        r.index([Page(im) for im in images], importance=idx_imp if cfg.index_keep_ratio < 1 else None)
        prefill_s = time.perf_counter() - t
        if cfg.index_keep_ratio < 1:  # candidates reuse the index-time importance of their image
            r.index(pages, importance=[idx_imp[i % len(images)] for i in range(len(pages))])
        kv = r.index(pages[:1])[0]
        imp_arg = imp if cfg.keep_ratio < 1 else None
        r.rerank(query, pages[: min(8, len(pages))], importance=None if imp_arg is None else imp_arg[:8])  # warm-up
        secs, res = timed(lambda: r.rerank(query, pages, top_n=10, importance=imp_arg), repeat=1 if name == "cached" else 2)
        results[name] = dict(seconds=secs, cache_bytes_per_page=kv.nbytes, prefill_seconds_per_page=prefill_s / len(images),
                             config=r.config.to_dict())
        rows.append((name, secs, f"cache {kv.nbytes / 1e6:.1f} MB/page, rows {kv.k.shape[2]}, prefill {prefill_s / len(images):.2f} s/page"))

    q_tokens = len(tokenizer(dense_r.template.query.format(query=query), add_special_tokens=False)["input_ids"])
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    full_cache = args.layers * 2 * model.config.text_config.num_key_value_heads * model.config.text_config.head_dim * (n_vis + 2) * elem
    print(f"\nmodel: Qwen3-VL shape, {args.layers} LM layers, {n_params / 1e6:.0f}M params (random, {args.dtype}), built in {build_s:.1f}s")
    print(f"candidates: {args.candidates}, visual tokens/page: {n_vis} (grid {grid[0]}x{grid[1]}), query segment: {q_tokens} tokens, threads: {args.threads}")
    print(f"{'variant':30s} {'seconds':>10s} {'x dense':>10s}  notes")
    for name, secs, note in rows:
        print(f"{name:30s} {secs:10.3f} {secs / dense_s:10.5f}  {note}")
    summary = {
        "n_candidates": args.candidates,
        "visual_tokens_per_page": n_vis,
        "query_tokens": q_tokens,
        "layers": args.layers,
        "params_millions": round(n_params / 1e6, 1),
        "dense_seconds": round(dense_s, 3),
        "dense_measured_pairs": args.dense_pairs,
        "cached_seconds": round(results["cached"]["seconds"], 3),
        "mini_seconds": round(results["mini"]["seconds"], 3),
        "mini_index_prune_seconds": round(results["mini+index_prune"]["seconds"], 3),
        "cached_over_dense": round(results["cached"]["seconds"] / dense_s, 5),
        "mini_over_dense": round(results["mini"]["seconds"] / dense_s, 5),
        "mini_index_prune_over_dense": round(results["mini+index_prune"]["seconds"] / dense_s, 5),
        "cache_bytes_per_page": {
            "full": full_cache,
            "band": results["mini"]["cache_bytes_per_page"],
            "band_index_pruned": results["mini+index_prune"]["cache_bytes_per_page"],
        },
        "config": results["mini"]["config"],
        "dtype": args.dtype,
        "quick": args.quick,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
