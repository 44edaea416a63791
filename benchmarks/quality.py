"""Quality of the shipped defaults on the held-out test split (documents never seen in training).

    python benchmarks/quality.py                 # shipped student, teacher and embedder; builds the data on first use

(a) first stage alone: ColQwen3 embedder (DEFAULT_EMBEDDER_DIR) + PageIndex (exact MaxSim), top --top-k pages
(b) first stage + dense teacher: MiniReranker.dense_scores (a plain HF forward of P + V + Q per pair, no cache)
(c) first stage + mini student (DEFAULT_RERANKER_DIR with its minirerank_config.json: early exit, interaction
    band, shared query positions, pruning by the embedder's query-dependent importance at the trained keep ratio):
    MiniReranker.rerank(query, candidates, importance=...)

Seconds per query cover the reranking of the top-k only (the first stage is the same for (b) and (c) and is
reported separately). For (c) the page cache is filled at index time (MiniReranker.index over the corpus, timed
and reported per page), as in a deployment; the timed loop then runs only the online path.
The dataset is rebuilt from its seed (the recipe's, ~5 min) into --data (default runs/data) when it is not there.
Prints a table, then one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minirerank_core import MiniReranker, Page, RerankConfig  # noqa: E402
from minirerank_core.defaults import DEFAULT_EMBEDDER_DIR, DEFAULT_RERANKER_DIR, DEFAULT_TEACHER_DIR  # noqa: E402
from minirerank_core.engine.settings import read_settings  # noqa: E402
from minirerank_core.retrieval import FirstStage  # noqa: E402
from minirerank_core.train.data import DataSet  # noqa: E402
from minirerank_core.train.metrics import summarize  # noqa: E402


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data / "recipe.json").exists():
        print(f"building the toy dataset (seed 0) into {args.data} ...", file=sys.stderr, flush=True)
        from minirerank_core.train.data import build
        from minirerank_core.train.recipe import DATA

        build(args.data, **DATA)
    ds = DataSet(args.data)
    page_ids = ds.page_ids(args.split)
    queries = ds.split_queries(args.split)
    if args.max_queries and len(queries) > args.max_queries:
        queries = sorted(random.Random(args.seed).sample(queries, args.max_queries), key=lambda q: q["qid"])
    pages = {p: Page(ds.image_path(p), id=p) for p in page_ids}

    mini_cfg = read_settings(args.reranker).config.replace(device=args.device, batch_size=args.top_k,
                                                           kv_dtype=args.kv_dtype)
    mini = MiniReranker.from_pretrained(args.reranker, config=mini_cfg)
    dense = MiniReranker.from_pretrained(args.teacher, config=RerankConfig(device=args.device))
    first_stage = FirstStage.from_pretrained(args.embedder, reranker=mini, device=args.device)

    t = time.perf_counter()
    first_stage.add([pages[p] for p in page_ids], batch_size=8, show_progress=not args.quiet)
    t_embed = time.perf_counter() - t

    t = time.perf_counter()
    mini.index([pages[p] for p in page_ids], show_progress=not args.quiet)
    t_index = time.perf_counter() - t

    first, dense_rank, mini_rank, rel = [], [], [], []
    t_first = t_dense = t_mini = 0.0
    per_query = []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        cands = first_stage.candidates(q["query"], args.top_k, mini)  # hits + pruning maps on the reranker's grid
        t_first += time.perf_counter() - t
        cand = [c.page_id for c in cands]
        cpages = [c.page for c in cands]

        t = time.perf_counter()
        ds_scores = dense.dense_scores(q["query"], cpages, batch_size=args.dense_batch)
        t_dense += time.perf_counter() - t

        t = time.perf_counter()
        res = mini.rerank(q["query"], cands)
        t_mini += time.perf_counter() - t

        first.append(cand)
        dense_rank.append([cand[j] for j in sorted(range(len(cand)), key=lambda j: -ds_scores[j])])
        mini_rank.append([r.page_id for r in res])
        rel.append({q["positive"]})
        per_query.append(dict(qid=q["qid"], query=q["query"], positive=q["positive"], first=cand[:5],
                              dense=dense_rank[-1][:5], mini=mini_rank[-1][:5]))
        if not args.quiet and (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(queries)} queries", file=sys.stderr, flush=True)

    a, b, c = summarize(first, rel), summarize(dense_rank, rel), summarize(mini_rank, rel)
    n = max(1, len(queries))
    result = {
        "split": args.split,
        "n_queries": len(queries),
        "n_pages": len(page_ids),
        "top_k": args.top_k,
        **{f"{k}_first_stage": v for k, v in a.items()},
        **{f"{k}_dense": v for k, v in b.items()},
        **{f"{k}_mini": v for k, v in c.items()},
        "mini_over_dense_ndcg5": c["ndcg5"] / b["ndcg5"] if b["ndcg5"] else None,
        "recall_at_k_first_stage": sum(bool(set(f) & r) for f, r in zip(first, rel)) / n,
        "seconds_per_query_first_stage": t_first / n,
        "seconds_per_query_dense": t_dense / n,
        "seconds_per_query_mini": t_mini / n,
        "dense_over_mini_time": t_dense / t_mini if t_mini else None,
        "seconds_per_page_embed": t_embed / max(1, len(page_ids)),
        "seconds_per_page_mini_index": t_index / max(1, len(page_ids)),
        "mini_config": {k: v for k, v in mini.config.to_dict().items() if k not in ("device", "batch_size")},
        "threads": torch.get_num_threads(),
    }
    if args.details:
        args.details.write_text(json.dumps(per_query, indent=1))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data",
                    help="dataset directory (train.data; built from seed 0 when missing)")
    ap.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER_DIR, help="dense teacher dir (default: shipped)")
    ap.add_argument("--reranker", type=Path, default=DEFAULT_RERANKER_DIR, help="mini student dir (default: shipped)")
    ap.add_argument("--embedder", type=Path, default=DEFAULT_EMBEDDER_DIR, help="first-stage embedder (default: shipped)")
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--top-k", type=int, default=10, help="first-stage candidates reranked per query")
    ap.add_argument("--max-queries", type=int, default=None, help="a seeded subset of the split's queries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-dtype", choices=["int8", "fp8"], default=None,
                    help="store the student's page cache compressed (RerankConfig.kv_dtype); default: unquantized")
    ap.add_argument("--details", type=Path, default=None, help="write per-query top-5 lists to this JSON file")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    r = run(args)
    rows = [("(a) first stage", "first_stage", r["seconds_per_query_first_stage"]),
            ("(b) + dense teacher", "dense", r["seconds_per_query_dense"]),
            ("(c) + mini student", "mini", r["seconds_per_query_mini"])]
    print(f"{r['split']}: {r['n_queries']} queries over {r['n_pages']} pages, top-{r['top_k']} reranked "
          f"(first-stage recall@{r['top_k']} = {r['recall_at_k_first_stage']:.3f})")
    print(f"{'system':22s} {'nDCG@5':>7s} {'R@1':>6s} {'R@5':>6s} {'MRR':>6s} {'s/query':>8s}")
    for name, key, sec in rows:
        print(f"{name:22s} {r['ndcg5_' + key]:7.4f} {r['recall1_' + key]:6.3f} {r['recall5_' + key]:6.3f} "
              f"{r['mrr_' + key]:6.3f} {sec:8.4f}")
    ratio = r["mini_over_dense_ndcg5"]
    print(f"mini / dense nDCG@5 = {'n/a' if ratio is None else f'{ratio:.4f}'}; "
          f"dense / mini time = {r['dense_over_mini_time']:.1f}x; mini index {r['seconds_per_page_mini_index']:.3f} s/page")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
