"""First-stage retrieval benchmark: exact MaxSim vs FAISS candidate generation + exact re-scoring.

Synthetic collections (D=128 random unit vectors) with planted relevant pages: for each query (Tq random
unit vectors) `relevant` pages get 2..6 patches replaced by normalize(a * q_t + sqrt(1 - a^2) * noise),
a ~ U[0.45, 0.9], for distinct query tokens t. So the exact top-20 is (mostly) planted pages of graded
strength, and recall@20 of the ANN path is measured against exact MaxSim over the whole collection.

    python benchmarks/retrieval.py            # 1k, 10k, 100k pages (several minutes on 2 cores)
    python benchmarks/retrieval.py --quick    # small sizes, a few seconds (CI smoke test)

Prints a table, then one JSON line for the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Before numpy / torch / faiss load: on a small shared machine, BLAS and OpenMP threads that spin against each
# other (and against other jobs) make every search several times slower. One thread unless told otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minirerank_core.retrieval import AnnConfig, PageEmbedding, PageIndex, SearchParams  # noqa: E402

DIM = 128


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def make_collection(n_pages: int, tokens: int, n_queries: int, q_tokens: int, relevant: int, seed: int):
    """(vectors (n_pages, tokens, D), queries (n_queries, q_tokens, D)) with planted relevant pages."""
    rng = np.random.default_rng(seed)
    vectors = np.empty((n_pages, tokens, DIM), dtype=np.float32)
    step = max(1, 2_000_000 // (tokens * DIM))
    for s in range(0, n_pages, step):  # in blocks: bounded temporary memory
        block = rng.standard_normal((min(step, n_pages - s), tokens, DIM), dtype=np.float32)
        vectors[s : s + len(block)] = _unit(block)
    queries = _unit(rng.standard_normal((n_queries, q_tokens, DIM), dtype=np.float32))
    for q in queries:
        for page in rng.choice(n_pages, size=min(relevant, n_pages), replace=False):
            m = int(rng.integers(2, 7))
            toks = rng.choice(q_tokens, size=m, replace=False)
            slots = rng.choice(tokens, size=m, replace=False)
            a = rng.uniform(0.45, 0.9, size=(m, 1)).astype(np.float32)
            noise = _unit(rng.standard_normal((m, DIM), dtype=np.float32))
            vectors[page, slots] = _unit(a * q[toks] + np.sqrt(1 - a * a) * noise)
    return vectors, queries


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_size(n_pages: int, tokens: int, args) -> dict:
    vectors, queries = make_collection(n_pages, tokens, args.queries, args.query_tokens, args.relevant, args.seed)
    grid = (tokens // 8, 8) if tokens % 8 == 0 else (1, tokens)
    rows = torch.arange(tokens)
    pages = [PageEmbedding(f"p{i}", torch.from_numpy(vectors[i]), rows, grid) for i in range(n_pages)]
    ann = AnnConfig(index_type=args.index_type, flat_max_vectors=args.flat_max_vectors, nlist=args.nlist,
                    hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    params = SearchParams(k_prime=args.k_prime, ef_search=args.ef_search, nprobe=args.nprobe)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        index = PageIndex.create(Path(tmp) / "index", ann=ann, search_params=params)
        index.add(pages)
        build_s = time.perf_counter() - t0
        del pages, vectors
        kinds = sorted({s["kind"] for s in index.stats()["segments"]})
        size = _dir_bytes(Path(tmp) / "index")

        def timed(**kw):
            index.search(queries[0], args.k, **kw)  # warm-up (page cache, FAISS tables)
            out, t, c = [], time.perf_counter(), time.process_time()
            for q in queries:
                out.append([h.page_id for h in index.search(q, args.k, **kw)])
            n = len(queries)
            return out, (time.perf_counter() - t) * 1000 / n, (time.process_time() - c) * 1000 / n

        exact, exact_ms, exact_cpu = timed(exact=True)
        approx, ann_ms, ann_cpu = timed()
    recall = float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))
    return {
        "n_pages": n_pages,
        "tokens_per_page": tokens,
        "n_vectors": n_pages * tokens,
        "index_type": "+".join(kinds),
        "build_seconds": round(build_s, 2),
        "bytes_per_page": int(size / n_pages),
        "exact_ms_per_query": round(exact_ms, 2),
        "ann_ms_per_query": round(ann_ms, 2),
        "speedup": round(exact_ms / ann_ms, 1) if ann_ms else None,
        # CPU time per query: what the wall time would be on an idle core (wall time includes waiting for
        # other processes on a shared machine).
        "exact_cpu_ms_per_query": round(exact_cpu, 2),
        "ann_cpu_ms_per_query": round(ann_cpu, 2),
        f"ann_recall_at_{args.k}": round(recall, 4),
        "search_params": {"k_prime": params.k_prime_for(args.k), "nprobe": args.nprobe, "ef_search": args.ef_search},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (seconds); for CI smoke tests")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="tokens per page, one per size")
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--query-tokens", type=int, default=16)
    p.add_argument("--relevant", type=int, default=24, help="planted relevant pages per query")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--index-type", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"])
    p.add_argument("--flat-max-vectors", type=int, default=AnnConfig.flat_max_vectors)
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--hnsw-m", type=int, default=AnnConfig.hnsw_m)
    p.add_argument("--ef-construction", type=int, default=AnnConfig.ef_construction)
    p.add_argument("--k-prime", type=int, default=None)
    p.add_argument("--nprobe", type=int, default=SearchParams.nprobe)
    p.add_argument("--ef-search", type=int, default=SearchParams.ef_search)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="directory for the temporary index (default: system temp)")
    args = p.parse_args(argv)
    if args.quick:
        sizes, tokens = args.sizes or [300, 3000], args.tokens or [16, 16]
        args.queries = args.queries or 5
        if args.flat_max_vectors == AnnConfig.flat_max_vectors:
            args.flat_max_vectors = 20_000  # so the quick run exercises the ANN path too
    else:
        sizes, tokens = args.sizes or [1_000, 10_000, 100_000], args.tokens or [64, 48, 32]
        args.queries = args.queries or 50
    if len(tokens) != len(sizes):
        p.error("--tokens needs one value per size")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    cols = ["n_pages", "tokens_per_page", "index_type", "build_seconds", "bytes_per_page", "exact_ms_per_query",
            "ann_ms_per_query", "speedup", "exact_cpu_ms_per_query", "ann_cpu_ms_per_query", f"ann_recall_at_{args.k}"]
    print(f"D={DIM}, {args.queries} queries x {args.query_tokens} tokens, {args.relevant} planted pages per query, "
          f"k={args.k}, threads={os.environ['OMP_NUM_THREADS']}")
    print(" | ".join(f"{c:>22}" for c in cols))
    result = {}
    for n, t in zip(sizes, tokens):
        result = run_size(n, t, args)
        print(" | ".join(f"{str(result[c]):>22}" for c in cols), flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
