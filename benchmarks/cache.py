"""Page-cache benchmark: bytes per page and the score error of compressed (int8 / fp8) caches.

Three parts, each printed as a table; the last line of stdout is one JSON object with every number.

(1) bytes per page. The formula ``layers x 2 (K, V) x kv_heads x head_dim x rows x bytes`` (+ int64 visual index,
    + float32 scales when compressed) at Qwen3-VL-2B shape (28 layers, 8 KV heads, head dim 128, --visual-tokens
    1,024), checked against the sizes of real entries written by DiskStore for a random model with that KV shape
    and a 4-layer band (the files hold a ~1-2 KB JSON header on top; --size-tokens sets their visual tokens).
(2) score error on a random Qwen3-VL-2B-shape language model (28 layers, hidden 2048, 16 heads, 8 KV heads, head
    dim 128; a toy vision tower: only the LM's keys and values are cached), mini configuration (exit 16, band
    (10, 14)), with and without query-time pruning: for every grouping of the scales (keys and values each per token
    or per channel) and both dtypes, the max |score - unquantized score|, that over the spread (std) of the
    unquantized scores, Kendall's tau between the rankings, top-1 agreement, and the nDCG@5 of the compressed
    ranking with the unquantized scores as graded relevance (1.0 = the same top 5 in the same order).
(3) with --quality-data DIR (the toy dataset of benchmarks/quality.py): the shipped student over the held-out
    split with the shipped embedder's candidates and maps, at its trained settings: the same error measures, and
    nDCG@5 against the true positives, per grouping and dtype.

    python benchmarks/cache.py --quick                               # toy shapes, about a minute
    python benchmarks/cache.py                                       # the shapes above (several minutes, 2 cores)
    python benchmarks/cache.py --quality-data /path/to/runs/data     # + the shipped student on held-out data

Random weights give Gaussian-like keys without the outlier channels of trained models, so (2) measures the
arithmetic and (3) the choice of grouping.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minirerank_core import MiniReranker, Page, RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402
from minirerank_core.engine.kv import KV_SCALE_AXES, PageKV, fp8_supported  # noqa: E402
from minirerank_core.engine.prefill import query_ids  # noqa: E402
from minirerank_core.engine.scorer import score_cached  # noqa: E402

QUERIES = [
    "what was the total revenue growth reported for the last fiscal year",
    "table of quarterly operating expenses by region",
    "who signed the audit report",
    "figure showing customer churn over time",
    "definition of adjusted earnings per share",
    "list of subsidiaries and their countries",
    "interest rate risk sensitivity analysis",
    "headcount at the end of the year",
]
AXES = [("token", "token"), ("channel", "token"), ("channel", "channel"), ("token", "channel")]


# --------------------------------------------------------------------------- (1) bytes per page
def formula_bytes(layers: int, kv_heads: int, head_dim: int, visual: int, *, elem: int, kv_dtype: str | None = None,
                  axes: tuple[str, str] | None = None) -> int:
    """Bytes of one page's tensors: K and V over `visual` kept tokens + <vision_start>/<vision_end>, the int64 index
    of the kept tokens, and (compressed) float32 scales per channel (kv_heads x head_dim) or per row."""
    rows = visual + 2
    n = layers * 2 * kv_heads * head_dim * rows * (1 if kv_dtype else elem) + visual * 8
    if kv_dtype:
        axes = axes or KV_SCALE_AXES[kv_dtype]
        n += sum(layers * kv_heads * (head_dim if a == "channel" else rows) * 4 for a in axes)
    return n


def size_check(args) -> list[dict]:
    """Real DiskStore entries for a random model with Qwen3-VL-2B's KV shape (4 LM layers = the band)."""
    tok = T.build_tokenizer()
    side = int(round(args.size_tokens**0.5))
    processor = T.build_processor("qwen3_vl", tok, max_pixels=(side * 32) ** 2, min_pixels=32 * 32)
    model = T.tiny_model("qwen3_vl", tok, num_layers=4, hidden_size=args.hidden, num_heads=args.hidden // args.head_dim,
                         num_kv_heads=args.kv_heads, intermediate_size=args.hidden * 3, dtype=torch.bfloat16)
    image = T.random_page_image(side * 32, side * 32, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, index_keep, kv_dtype in [("band bf16", 1.0, None), ("band bf16 + 50% index pruning", 0.5, None),
                                           ("... + int8", 0.5, "int8"), ("... + fp8", 0.5, "fp8")]:
            if kv_dtype == "fp8" and not fp8_supported():
                continue
            cfg = RerankConfig(dtype="bfloat16", index_keep_ratio=index_keep, kv_dtype=kv_dtype)
            r = MiniReranker(model, processor, cfg, cache_dir=Path(tmp) / name.replace(" ", "_").replace("%", ""))
            grid = r.visual_grid(Page(image))
            imp = np.random.default_rng(0).random(grid[0] * grid[1]).astype(np.float32)
            kv = r.index([Page(image)], importance=[imp] if index_keep < 1 else None)[0]
            (path,) = r.store.disk.root.rglob("*.safetensors")
            visual = kv.n_visual
            want = formula_bytes(4, args.kv_heads, args.head_dim, visual, elem=2, kv_dtype=kv_dtype)
            rows.append(dict(variant=name, visual_tokens=visual, formula_bytes=want, tensor_bytes=kv.nbytes,
                             file_bytes=path.stat().st_size, header_bytes=path.stat().st_size - kv.nbytes))
    return rows


# --------------------------------------------------------------------------- (2), (3) score error
def kendall_tau(a: list[float], b: list[float]) -> float:
    from scipy.stats import kendalltau

    tau = kendalltau(a, b).statistic
    return 1.0 if math.isnan(tau) else float(tau)


def ndcg5_vs(reference: list[float], scores: list[float]) -> float:
    """nDCG@5 of the ranking by `scores`, with gains = reference scores shifted to >= 0."""
    lo = min(reference)
    gains = [x - lo for x in reference]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:5]
    ideal = sorted(range(len(reference)), key=lambda i: -reference[i])[:5]
    dcg = sum(gains[i] / math.log2(r + 2) for r, i in enumerate(order))
    idcg = sum(gains[i] / math.log2(r + 2) for r, i in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 1.0


def error_stats(ref: list[list[float]], got: list[list[float]]) -> dict:
    ref_a, got_a = np.asarray([x for q in ref for x in q]), np.asarray([x for q in got for x in q])
    err = np.abs(ref_a - got_a)
    spread = float(np.mean([np.std(q) for q in ref]))
    return dict(
        max_abs_err=float(err.max()), mean_abs_err=float(err.mean()),
        max_err_over_spread=float(err.max() / spread) if spread > 0 else 0.0,
        kendall_tau=float(np.mean([kendall_tau(a, b) for a, b in zip(ref, got)])),
        top1_agree=float(np.mean([int(np.argmax(a) == np.argmax(b)) for a, b in zip(ref, got)])),
        ndcg5_vs_unquantized=float(np.mean([ndcg5_vs(a, b) for a, b in zip(ref, got)])),
    )


def schemes() -> list[tuple[str, tuple[str, str]]]:
    dtypes = ["int8"] + (["fp8"] if fp8_supported() else [])
    return [(d, a) for d in dtypes for a in AXES]


def scheme_name(kv_dtype: str, axes: tuple[str, str]) -> str:
    default = " (default)" if KV_SCALE_AXES[kv_dtype] == axes else ""
    return f"{kv_dtype} K/{axes[0]} V/{axes[1]}{default}"


def score_all(r: MiniReranker, kvs_per_query: list[list[PageKV]], queries: list[str], cfg: RerankConfig,
              imps_per_query: list[list[torch.Tensor | None]]) -> list[list[float]]:
    """The scores MiniReranker._rank computes, from given (possibly re-quantized) page KVs."""
    out = []
    for q, kvs, imps in zip(queries, kvs_per_query, imps_per_query):
        with torch.inference_mode():
            s = score_cached(r.adapter, r.prefix_cache, query_ids(r.tokenizer, r.template, q), kvs, cfg, r.head, imps)
        out.append(s.float().tolist())
    return out


def random_model_errors(args) -> dict:
    tok = T.build_tokenizer()
    side = int(round(args.score_tokens**0.5))
    processor = T.build_processor("qwen3_vl", tok, max_pixels=(side * 32) ** 2, min_pixels=32 * 32)
    model = T.tiny_model("qwen3_vl", tok, num_layers=args.layers, hidden_size=args.hidden,
                         num_heads=args.hidden // args.head_dim, num_kv_heads=args.kv_heads,
                         intermediate_size=args.intermediate, seed=0)
    cfg = RerankConfig(exit_layer=args.exit, band=tuple(args.band), query_positions="exact", batch_size=64)
    r = MiniReranker(model, processor, cfg, memory_cache_bytes=64 * 1024**3)
    pages = [Page(T.random_page_image(side * 32, side * 32, seed=100 + i), id=f"p{i}") for i in range(args.pages)]
    t = time.perf_counter()
    base = r.index(pages)
    prefill_s = (time.perf_counter() - t) / len(pages)
    grid = base[0].grid
    rng = np.random.default_rng(0)
    queries = QUERIES[: args.queries]
    out = {"prefill_seconds_per_page": prefill_s, "visual_tokens": grid[0] * grid[1], "variants": {}}
    for keep in (1.0, args.keep):
        c = r.config.replace(keep_ratio=keep)
        imps = [[torch.from_numpy(rng.random(grid[0] * grid[1]).astype(np.float32)) if keep < 1 else None
                 for _ in pages] for _ in queries]
        ref = score_all(r, [base] * len(queries), queries, c, imps)
        rows = {}
        for kv_dtype, axes in schemes():
            q = [kv.quantized(kv_dtype, axes) for kv in base]
            rows[scheme_name(kv_dtype, axes)] = error_stats(ref, score_all(r, [q] * len(queries), queries, c, imps))
        out["variants"][f"keep_ratio={keep}"] = rows
    return out


def quality_errors(args) -> dict:
    """The shipped student on the held-out split: error vs unquantized, and nDCG@5 against the positives."""
    from minirerank_core.defaults import DEFAULT_EMBEDDER_DIR, DEFAULT_RERANKER_DIR
    from minirerank_core.engine.settings import read_settings
    from minirerank_core.retrieval import FirstStage
    from minirerank_core.train.data import DataSet
    from minirerank_core.train.metrics import summarize

    ds = DataSet(args.quality_data)
    page_ids = ds.page_ids(args.split)
    queries = ds.split_queries(args.split)
    if args.max_queries:
        queries = queries[: args.max_queries]
    cfg = read_settings(DEFAULT_RERANKER_DIR).config.replace(batch_size=args.top_k)
    mini = MiniReranker.from_pretrained(DEFAULT_RERANKER_DIR, config=cfg)
    first = FirstStage.from_pretrained(DEFAULT_EMBEDDER_DIR, reranker=mini)
    pages = [Page(ds.image_path(p), id=p) for p in page_ids]
    first.add(pages, batch_size=8, show_progress=False)
    mini.index(pages)
    cands = [first.candidates(q["query"], args.top_k, mini) for q in queries]
    kvs = [mini.pages.kv([c.page for c in cs], [c.index_importance for c in cs]) for cs in cands]
    imps = [[None if c.importance is None else c.importance.flat() for c in cs] for cs in cands]
    texts = [q["query"] for q in queries]
    rel = [{q["positive"]} for q in queries]

    def ranking(scores: list[list[float]]) -> list[list[str]]:
        return [[cs[i].page_id for i in sorted(range(len(s)), key=lambda i: -s[i])] for cs, s in zip(cands, scores)]

    ref = score_all(mini, kvs, texts, mini.config, imps)
    out = {"n_queries": len(queries), "n_pages": len(page_ids), "top_k": args.top_k,
           "config": {k: v for k, v in mini.config.to_dict().items() if k not in ("device", "batch_size")},
           "ndcg5_unquantized": summarize(ranking(ref), rel)["ndcg5"], "variants": {}}
    for kv_dtype, axes in schemes():
        got = score_all(mini, [[kv.quantized(kv_dtype, axes) for kv in ks] for ks in kvs], texts, mini.config, imps)
        stats = error_stats(ref, got)
        stats["ndcg5"] = summarize(ranking(got), rel)["ndcg5"]
        stats["ndcg5_change"] = stats["ndcg5"] - out["ndcg5_unquantized"]
        out["variants"][scheme_name(kv_dtype, axes)] = stats
    return out


# --------------------------------------------------------------------------- main
def print_errors(title: str, rows: dict, extra: tuple[str, ...] = ()) -> None:
    print(f"\n{title}")
    cols = ("max_abs_err", "max_err_over_spread", "kendall_tau", "top1_agree", "ndcg5_vs_unquantized") + extra
    print(f"{'scheme':34s} " + " ".join(f"{c:>20s}" for c in cols))
    for name, s in rows.items():
        print(f"{name:34s} " + " ".join(f"{s[c]:20.5f}" for c in cols))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy shapes (a minute)")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=6144)
    p.add_argument("--exit", type=int, default=16)
    p.add_argument("--band", type=int, nargs=2, default=(10, 14))
    p.add_argument("--keep", type=float, default=0.25, help="query-time keep ratio of the pruned variant")
    p.add_argument("--visual-tokens", type=int, default=1024, help="visual tokens per page of the size formula")
    p.add_argument("--size-tokens", type=int, default=1024, help="visual tokens of the real entries checked")
    p.add_argument("--score-tokens", type=int, default=256, help="visual tokens per page of the error measurement")
    p.add_argument("--pages", type=int, default=16, help="candidates per query of the error measurement")
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--quality-data", type=Path, default=None, help="toy dataset dir (train.data) for part (3)")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--max-queries", type=int, default=None)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.head_dim, args.kv_heads, args.intermediate = 8, 128, 32, 2, 256
        args.exit, args.band, args.size_tokens, args.score_tokens, args.pages, args.queries = 6, (2, 4), 64, 64, 8, 4
    torch.set_num_threads(args.threads)

    L, H, D, V = 28, 8, 128, args.visual_tokens  # Qwen3-VL-2B's KV shape, whatever the measured shapes are
    table = {
        "all 28 layers, bf16": formula_bytes(L, H, D, V, elem=2),
        "band (4 layers), bf16": formula_bytes(4, H, D, V, elem=2),
        "band, bf16, 50% index-time pruning": formula_bytes(4, H, D, V // 2, elem=2),
        "band, 50% pruning, int8": formula_bytes(4, H, D, V // 2, elem=2, kv_dtype="int8"),
        "band, 50% pruning, fp8": formula_bytes(4, H, D, V // 2, elem=2, kv_dtype="fp8"),
        "band, int8 (no pruning)": formula_bytes(4, H, D, V, elem=2, kv_dtype="int8"),
    }
    print(f"(1) bytes per page at Qwen3-VL-2B shape (28 layers, {H} KV heads, head dim {D}, {V} visual tokens)")
    for name, n in table.items():
        print(f"  {name:40s} {n / 1e6:8.2f} MB")
    t = time.perf_counter()
    sizes = size_check(args)
    print(f"\n    real entries ({args.kv_heads} KV heads, head dim {args.head_dim}, 4-layer band), "
          f"{time.perf_counter() - t:.0f} s:")
    print(f"  {'variant':34s} {'visual':>7s} {'formula B':>11s} {'tensors B':>11s} {'file B':>11s} {'header B':>9s}")
    for row in sizes:
        print(f"  {row['variant']:34s} {row['visual_tokens']:7d} {row['formula_bytes']:11d} {row['tensor_bytes']:11d} "
              f"{row['file_bytes']:11d} {row['header_bytes']:9d}")

    t = time.perf_counter()
    rnd = random_model_errors(args)
    print(f"\n(2) random model ({args.layers} layers, hidden {args.hidden}, {args.kv_heads} KV heads, head dim "
          f"{args.head_dim}), exit {args.exit}, band {tuple(args.band)}, {args.pages} pages x {args.queries} queries, "
          f"{rnd['visual_tokens']} visual tokens/page, float32; {time.perf_counter() - t:.0f} s")
    for variant, rows in rnd["variants"].items():
        print_errors(f"  {variant}", rows)

    quality = None
    if args.quality_data is not None:
        t = time.perf_counter()
        quality = quality_errors(args)
        print(f"\n(3) shipped student, {quality['n_queries']} {args.split} queries over {quality['n_pages']} pages, "
              f"top-{quality['top_k']}; nDCG@5 unquantized {quality['ndcg5_unquantized']:.4f}; "
              f"{time.perf_counter() - t:.0f} s")
        print_errors("  vs unquantized and vs the positives", quality["variants"], ("ndcg5", "ndcg5_change"))

    print(json.dumps({"bytes_per_page_qwen3_vl_2b": table, "size_check": sizes, "random_model": rnd,
                      "quality": quality, "quick": args.quick, "threads": args.threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
