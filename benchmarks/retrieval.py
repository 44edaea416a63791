"""First-stage retrieval benchmark: exact MaxSim vs FAISS candidate generation + exact re-scoring, at the size users
have (100k+ pages of ~700-1,000 vectors), on synthetic or real embeddings.

Synthetic collections (D=128 random unit vectors) with planted relevant pages: for each query (Tq random unit
vectors) `relevant` pages get 2..6 patches replaced by normalize(a * q_t + sqrt(1 - a^2) * noise), a ~ U[0.45, 0.9],
for distinct query tokens t. So the exact top-20 is (mostly) planted pages of graded strength. The collection is
generated block by block and never held whole: each block is scored against every query on the way (the exact
ground truth, streamed: a running top-k per query) and handed to PageIndex.add as a generator, which writes the
vectors of a large segment straight to disk (float16 by default: 100k x 700 x 128 float32 would be 36 GB).
recall@20 is the ANN path's top 20 against exact float32 MaxSim over the unpooled vectors.

Real embeddings (--real DATA): the shipped embedder (or --embedder) over the toy corpus's rendered pages (what
`python -m minirerank_core.train.data --out DATA` builds) and its test queries; --min-tokens raises the pixel budget
so pages get as many vectors as a real ColQwen page. Pooling (--pool-factors 1,2,3) is measured there: recall is
always against exact MaxSim over the *unpooled* vectors, and "positive@20" is how often the query's labelled page is
in the top 20.

    python benchmarks/retrieval.py --quick                      # seconds (CI smoke test)
    nice python benchmarks/retrieval.py                         # 10k and 100k pages x 700 vectors (~1.5 h, 1 thread)
    python benchmarks/retrieval.py --sizes 20000 --tokens 700 --sweep 32:64:0,32:256:200,64:256:0
    python benchmarks/retrieval.py --real /work/train_runs/data --min-tokens 600 --pool-factors 1,2,3

Prints a table, then one JSON line for the largest size (or the last configuration).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Before numpy / torch / faiss load: on a small shared machine, BLAS and OpenMP threads that spin against each
# other (and against other jobs) make every search several times slower. One thread unless told otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minirerank_core.retrieval import AnnConfig, PageEmbedding, PageIndex  # noqa: E402
from minirerank_core.retrieval.maxsim import top_k  # noqa: E402

DIM = 128
_GT_BLOCK_ROWS = 1 << 16  # page vectors per ground-truth matmul (bounds the (queries*Tq, rows) block)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


# --- synthetic collection, generated in blocks ------------------------------------------------------------------
class Synthetic:
    """A planted collection that is generated again, block by block, from its seed (never held whole)."""

    def __init__(self, n_pages: int, tokens: int, n_queries: int, q_tokens: int, relevant: int, seed: int,
                 dim: int = DIM) -> None:
        self.n_pages, self.tokens, self.dim, self.seed = n_pages, tokens, dim, seed
        rng = np.random.default_rng([seed, 1])
        self.queries = _unit(rng.standard_normal((n_queries, q_tokens, dim), dtype=np.float32))
        # plants[page] = [(slots, vectors)]: the patches of that page replaced by near-copies of query tokens
        self.plants: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for q in self.queries:
            for page in rng.choice(n_pages, size=min(relevant, n_pages), replace=False).tolist():
                m = int(rng.integers(2, 7))
                toks = rng.choice(q_tokens, size=m, replace=False)
                slots = rng.choice(tokens, size=m, replace=False)
                a = rng.uniform(0.45, 0.9, size=(m, 1)).astype(np.float32)
                noise = _unit(rng.standard_normal((m, dim), dtype=np.float32))
                self.plants.setdefault(page, []).append((slots, _unit(a * q[toks] + np.sqrt(1 - a * a) * noise)))

    def blocks(self, block_pages: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first page, (B, tokens, D) float32) blocks, in page order."""
        for b, start in enumerate(range(0, self.n_pages, block_pages)):
            rng = np.random.default_rng([self.seed, 2, b])
            block = _unit(rng.standard_normal((min(block_pages, self.n_pages - start), self.tokens, self.dim),
                                              dtype=np.float32))
            for i in range(start, start + len(block)):
                for slots, vecs in self.plants.get(i, ()):
                    block[i - start, slots] = vecs
            yield start, block


class StreamedTruth:
    """Exact MaxSim top-k of every query, updated one block of pages at a time (memory: one block)."""

    def __init__(self, queries: list[np.ndarray], k: int) -> None:
        self.queries = queries
        self.k = k
        self.flat = np.ascontiguousarray(np.concatenate(queries))  # (sum Tq, D): one matmul for all queries
        self.bounds = np.cumsum([0] + [len(q) for q in queries])
        self.scores = [np.empty(0, np.float32) for _ in queries]
        self.ids = [np.empty(0, np.int64) for _ in queries]
        self.cpu = 0.0

    def update(self, first_page: int, vectors: np.ndarray, offsets: np.ndarray) -> None:
        """Pages first_page.. owning vectors[offsets[i]:offsets[i+1]]."""
        c = time.process_time()
        n = len(offsets) - 1
        per_query = np.zeros((len(self.queries), n), np.float32)
        p = 0
        while p < n:  # whole pages, ~_GT_BLOCK_ROWS vectors at a time
            q = min(max(int(np.searchsorted(offsets, offsets[p] + _GT_BLOCK_ROWS, side="right")) - 1, p + 1), n)
            lo, hi = int(offsets[p]), int(offsets[q])
            sims = self.flat @ vectors[lo:hi].T
            best = np.maximum.reduceat(sims, offsets[p:q] - lo, axis=1)  # (sum Tq, pages)
            per_query[:, p:q] = np.add.reduceat(best, self.bounds[:-1], axis=0)
            p = q
        for j in range(len(self.queries)):
            s = np.concatenate([self.scores[j], per_query[j]])
            i = np.concatenate([self.ids[j], first_page + np.arange(n)])
            keep = top_k(s, self.k)
            self.scores[j], self.ids[j] = s[keep], i[keep]
        self.cpu += time.process_time() - c


def _grid(tokens: int) -> tuple[int, int]:
    """A near-square (h, w) with h * w == tokens (every vector a patch)."""
    h = int(math.isqrt(tokens))
    while tokens % h:
        h -= 1
    return h, tokens // h


def synthetic_pages(data: Synthetic, truth: StreamedTruth, timer: dict, pool_factor: int) -> Iterator[PageEmbedding]:
    """The collection as PageEmbeddings, block by block, feeding the ground truth on the way."""
    grid = _grid(data.tokens)
    rows = torch.arange(data.tokens)
    block_pages = max(1, (1 << 18) // data.tokens)
    gen = data.blocks(block_pages)
    while True:
        t, c = time.perf_counter(), time.process_time()
        try:
            start, block = next(gen)
        except StopIteration:
            return
        truth.update(start, block.reshape(-1, data.dim), np.arange(len(block) + 1) * data.tokens)
        timer["generate"] += time.perf_counter() - t
        timer["generate_cpu"] += time.process_time() - c
        for i, vecs in enumerate(block):
            page = PageEmbedding(f"p{start + i}", torch.from_numpy(vecs), rows, grid)
            if pool_factor > 1:
                t = time.perf_counter()
                page = _pool(page, pool_factor)
                timer["pool"] += time.perf_counter() - t
            yield page
        del block


def _pool(page: PageEmbedding, factor: int) -> PageEmbedding:
    from minirerank_core.retrieval.pooling import pool_embedding

    return pool_embedding(page, factor)


# --- measuring an index -----------------------------------------------------------------------------------------
def _dir_bytes(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in path.rglob("*"):
        if f.is_file():
            kind = f.name if f.name in ("vectors.npy", "ann.faiss") else "other"
            out[kind] = out.get(kind, 0) + f.stat().st_size
    return out


def _rss() -> dict[str, int]:
    """Anonymous (must be RAM) and file-backed (page cache, evictable) resident bytes of this process."""
    out = {"anon": 0, "file": 0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                out["anon"] = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                out["file"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _params(spec: str) -> dict:
    """'k_prime:nprobe:rescore' (rescore 0 = every candidate)."""
    kp, npb, rs = (int(x) for x in spec.split(":"))
    return {"k_prime": kp, "nprobe": npb, "rescore": rs or None}


def measure(index_dir: Path, n_pages: int, queries: list[np.ndarray], truth: StreamedTruth, args,
            build_s: tuple[float, float], extra: dict, positives: list[str] | None = None) -> list[dict]:
    """Open the built index fresh (memory-mapped), time exact and ANN searches, recall against the truth (and, given
    each query's labelled page, how often it is in the top k)."""
    gc.collect()
    before = _rss()
    index = PageIndex.open(index_dir)
    opened = _rss()
    sizes = _dir_bytes(index_dir)
    kinds = sorted({s["kind"] for s in index.stats()["segments"]})
    k = args.k
    n_exact = min(len(queries), args.exact_queries)
    index.search(queries[0], k, exact=True)  # warm-up
    t, c = time.perf_counter(), time.process_time()
    exact_hits = [index.search(q, k, exact=True) for q in queries[:n_exact]]
    exact_ms = (time.perf_counter() - t) * 1000 / n_exact
    exact_cpu = (time.process_time() - c) * 1000 / n_exact
    # the stored vectors (float16?) vs the float32 truth: same top k? how far do the same pages' scores move?
    stored_recall = np.mean([len({h.page_id for h in hs} & set(_truth_ids(truth, j))) / k
                             for j, hs in enumerate(exact_hits)])
    rel_err = 0.0
    for j, hs in enumerate(exact_hits):
        want = dict(zip(_truth_ids(truth, j), truth.scores[j].tolist()))
        rel_err = max([rel_err] + [abs(h.score - want[h.page_id]) / abs(want[h.page_id]) for h in hs
                                   if h.page_id in want])
    tokens = extra.pop("tokens_per_page", None) or round(index.stats()["vectors_stored"] / n_pages, 1)
    labelled = {}
    if positives is not None:
        labelled[f"exact_positive_at_{k}"] = round(float(np.mean(
            [p in {h.page_id for h in hs} for p, hs in zip(positives, exact_hits)])), 4)
    rows = []
    for spec in args.sweep:
        kw = _params(spec)
        index.search(queries[0], k, **kw)
        t, c = time.perf_counter(), time.process_time()
        approx = [index.search(q, k, **kw) for q in queries]
        ann_ms = (time.perf_counter() - t) * 1000 / len(queries)
        ann_cpu = (time.process_time() - c) * 1000 / len(queries)
        recall = float(np.mean([len({h.page_id for h in a} & set(_truth_ids(truth, j))) / k
                                for j, a in enumerate(approx)]))
        if positives is not None:
            labelled[f"positive_at_{k}"] = round(float(np.mean(
                [p in {h.page_id for h in a} for p, a in zip(positives, approx)])), 4)
        after = _rss()
        rows.append({
            "n_pages": n_pages,
            "tokens_per_page": tokens,
            "index_type": "+".join(kinds),
            "vector_dtype": index.ann_config.vector_dtype,
            "opq": index.ann_config.opq,
            "build_seconds": round(build_s[0], 1),
            "build_cpu_seconds": round(build_s[1], 1),  # = wall time on an idle core (one thread)
            "bytes_per_page": int(sum(sizes.values()) / n_pages),  # on disk
            "disk_bytes_per_page": {k2: int(v / n_pages) for k2, v in sorted(sizes.items())},
            # anonymous memory the open index holds (FAISS structures, ids, offsets, metadata); the vectors and
            # the FAISS lists are memory-mapped: page cache, read for the candidates only
            "ram_bytes_per_page": int(max(0, opened["anon"] - before["anon"]) / n_pages),
            "page_cache_bytes_per_page_touched": int(max(0, after["file"] - before["file"]) / n_pages),
            "exact_ms_per_query": round(exact_ms, 1),
            "ann_ms_per_query": round(ann_ms, 2),
            "speedup": round(exact_ms / ann_ms, 1) if ann_ms else None,
            "cpu_speedup": round(exact_cpu / ann_cpu, 1) if ann_cpu else None,
            "exact_cpu_ms_per_query": round(exact_cpu, 1),
            "ann_cpu_ms_per_query": round(ann_cpu, 2),
            f"ann_recall_at_{k}": round(recall, 4),
            "exact_stored_recall_at_20": round(float(stored_recall), 4),
            "exact_stored_max_rel_score_error": float(f"{rel_err:.2e}"),
            "exact_queries": n_exact,
            "search_params": {"k_prime": kw["k_prime"], "nprobe": kw["nprobe"], "rescore": kw["rescore"]},
            **labelled,
            **extra,
        })
    del index
    gc.collect()
    return rows


def _truth_ids(truth: StreamedTruth, j: int) -> list[str]:
    return [truth.names[i] for i in truth.ids[j]] if hasattr(truth, "names") else [f"p{i}" for i in truth.ids[j]]


def ann_config(args, tokens: int) -> AnnConfig:
    return AnnConfig(index_type=args.index_type, flat_max_vectors=args.flat_max_vectors, nlist=args.nlist,
                     hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, opq=args.opq,
                     quantizer=args.quantizer, vector_dtype=args.vector_dtype, pq_m=args.pq_m)


def run_synthetic(n_pages: int, tokens: int, args) -> list[dict]:
    data = Synthetic(n_pages, tokens, args.queries, args.query_tokens, args.relevant, args.seed)
    queries = list(data.queries)
    truth = StreamedTruth(queries, args.k)
    timer = {"generate": 0.0, "generate_cpu": 0.0, "pool": 0.0}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        index_dir = Path(tmp) / "index"
        t0, c0 = time.perf_counter(), time.process_time()
        index = PageIndex.create(index_dir, ann=ann_config(args, tokens), build_memory_bytes=args.build_memory)
        index.add(synthetic_pages(data, truth, timer, args.pool_factor))
        # index build only (pooling included; generating the collection and its ground truth excluded)
        build_s = (time.perf_counter() - t0 - timer["generate"], time.process_time() - c0 - timer["generate_cpu"])
        del index
        extra = {"tokens_per_page": tokens, "pool_factor": args.pool_factor,
                 "pool_seconds": round(timer["pool"], 1),
                 "exact_streamed_cpu_ms_per_query": round(truth.cpu * 1000 / len(queries), 1)}
        return measure(index_dir, n_pages, queries, truth, args, build_s, extra)


# --- real embeddings ---------------------------------------------------------------------------------------------
def real_embeddings(args) -> tuple[list[PageEmbedding], list[np.ndarray], list[str]]:
    """(page embeddings, query embeddings, each query's labelled page) of the toy corpus, cached in --cache."""
    from minirerank_core.defaults import DEFAULT_EMBEDDER_DIR
    from minirerank_core.pages import Page, PixelBudget
    from minirerank_core.retrieval import PageEmbedder

    data = Path(args.real)
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        z = dict(np.load(cache, allow_pickle=False))  # each NpzFile item access reads the array again: once
        offs, poffs, vecs, rows, grids = z["offsets"], z["patch_offsets"], z["vectors"], z["patch_rows"], z["grids"]
        pages = [PageEmbedding(str(pid), torch.from_numpy(vecs[offs[i]:offs[i + 1]].astype(np.float32)),
                               torch.from_numpy(rows[poffs[i]:poffs[i + 1]].astype(np.int64)),
                               tuple(int(x) for x in grids[i]))
                 for i, pid in enumerate(z["ids"])]
        qoffs = z["query_offsets"]
        queries = [z["queries"][qoffs[i]:qoffs[i + 1]] for i in range(len(qoffs) - 1)]
        return pages, queries, [str(x) for x in z["positives"]]
    embedder = PageEmbedder.from_pretrained(args.embedder or DEFAULT_EMBEDDER_DIR)
    if args.min_tokens:
        f = embedder.patch_factor
        embedder = PageEmbedder(embedder.model, embedder.processor, name=embedder.name,
                                pixel_budget=PixelBudget(max_pixels=int(args.min_tokens * 1.25) * f * f,
                                                         min_pixels=args.min_tokens * f * f))
    recs = [json.loads(line) for line in (data / "pages.jsonl").read_text().splitlines() if line.strip()]
    recs = recs[: args.real_pages] if args.real_pages else recs
    files = [data / "pages" / f"{r['page_id']}.png" for r in recs]
    t = time.perf_counter()
    pages = embedder.encode_pages([Page(f, id=r["page_id"]) for f, r in zip(files, recs)], batch_size=4,
                                  show_progress=True)
    print(f"embedded {len(pages)} pages in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    known = {p.page_id for p in pages}
    qs = [json.loads(line) for line in (data / "queries.jsonl").read_text().splitlines() if line.strip()]
    test = [q for q in qs if q.get("split") == "test" and q["positive"] in known]
    qs = test or [q for q in qs if q["positive"] in known]
    qs = qs[: args.queries]
    queries = [e.numpy() for e in embedder.encode_queries([q["query"] for q in qs])]
    positives = [q["positive"] for q in qs]
    if cache is not None:
        np.savez(cache, ids=np.array([p.page_id for p in pages]),
                 vectors=np.concatenate([p.vectors.numpy() for p in pages]),
                 offsets=np.cumsum([0] + [p.vectors.shape[0] for p in pages]),
                 patch_rows=np.concatenate([p.patch_rows.numpy() for p in pages]),
                 patch_offsets=np.cumsum([0] + [p.patch_rows.numel() for p in pages]),
                 grids=np.array([p.grid for p in pages]), queries=np.concatenate(queries),
                 query_offsets=np.cumsum([0] + [len(q) for q in queries]), positives=np.array(positives))
    return pages, queries, positives


def run_real(args) -> list[dict]:
    pages, queries, positives = real_embeddings(args)
    names = [p.page_id for p in pages]
    truth = StreamedTruth(queries, args.k)  # exact float32 MaxSim over the unpooled vectors
    truth.names = names
    for start in range(0, len(pages), 256):  # a few hundred pages at a time: no second copy of the collection
        chunk = pages[start : start + 256]
        truth.update(start, np.concatenate([p.vectors.numpy() for p in chunk]),
                     np.cumsum([0] + [p.vectors.shape[0] for p in chunk]))
    tokens = round(float(np.mean([p.vectors.shape[0] for p in pages])), 1)
    rows = []
    for factor in args.pool_factors:
        t = time.perf_counter()
        pooled = [_pool(p, factor) for p in pages] if factor > 1 else pages
        pool_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            index = PageIndex.create(Path(tmp) / "index", ann=ann_config(args, int(tokens)),
                                     build_memory_bytes=args.build_memory)
            index.add(pooled)
            build_s = (time.perf_counter() - t0, time.process_time() - c0)
            del index
            extra = {"source": "real", "pool_factor": factor, "pool_seconds": round(pool_s, 1),
                     "unpooled_tokens_per_page": tokens}
            rows += measure(Path(tmp) / "index", len(pages), queries, truth, args, build_s, extra, positives)
        del pooled
    return rows


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
    p.add_argument("--pq-m", type=int, default=None)
    p.add_argument("--opq", action="store_true", help="OPQ rotation before IVF-PQ")
    p.add_argument("--quantizer", default="auto", choices=["auto", "flat", "hnsw"])
    p.add_argument("--vector-dtype", default=None, choices=["float32", "float16"],
                   help="stored vectors for exact re-scoring (default: float16, float32 with --quick)")
    p.add_argument("--hnsw-m", type=int, default=AnnConfig.hnsw_m)
    p.add_argument("--ef-construction", type=int, default=AnnConfig.ef_construction)
    p.add_argument("--sweep", type=lambda s: s.split(","), default=None,
                   help="search settings k_prime:nprobe:rescore,... (rescore 0: every candidate); the last is the "
                        "final JSON's")
    p.add_argument("--exact-queries", type=int, default=None, help="queries timed with exact search (slow at size)")
    p.add_argument("--pool-factor", type=int, default=1, help="synthetic: hierarchical pooling of every page")
    p.add_argument("--pool-factors", type=lambda s: [int(x) for x in s.split(",")], default=[1], help="--real only")
    p.add_argument("--build-memory", type=int, default=1 << 30, help="PageIndex build_memory_bytes")
    p.add_argument("--real", default=None, help="toy corpus directory (pages.jsonl, pages/, queries.jsonl)")
    p.add_argument("--embedder", default=None)
    p.add_argument("--min-tokens", type=int, default=None, help="--real: at least this many visual tokens per page")
    p.add_argument("--real-pages", type=int, default=None)
    p.add_argument("--cache", default=None, help="--real: .npz file caching the embeddings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="directory for the temporary index (default: system temp)")
    args = p.parse_args(argv)
    if args.quick:
        sizes, tokens = args.sizes or [300, 3000], args.tokens or [16, 16]
        args.queries = args.queries or 5
        args.vector_dtype = args.vector_dtype or "float32"
        args.sweep = args.sweep or ["32:64:0"]
        if args.flat_max_vectors == AnnConfig.flat_max_vectors:
            args.flat_max_vectors = 20_000  # so the quick run exercises the ANN path too
        args.build_memory = min(args.build_memory, 1 << 18)  # and the on-disk segment build
    else:
        sizes, tokens = args.sizes or [10_000, 100_000], args.tokens or [700, 700]
        args.queries = args.queries or (200 if args.real else 50)
        args.vector_dtype = args.vector_dtype or "float16"
        args.sweep = args.sweep or ["32:64:100", "64:256:0", "64:256:100"]
    args.exact_queries = args.exact_queries or (args.queries if args.quick or args.real else 3)
    if len(tokens) != len(sizes):
        p.error("--tokens needs one value per size")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    cols = ["n_pages", "tokens_per_page", "index_type", "vector_dtype", "build_seconds", "bytes_per_page",
            "ram_bytes_per_page", "exact_ms_per_query", "ann_ms_per_query", "speedup", "ann_cpu_ms_per_query",
            f"ann_recall_at_{args.k}", "search_params"]
    if args.real:
        cols += ["pool_factor", f"positive_at_{args.k}"]
    print(f"D={DIM}, {args.queries} queries x {args.query_tokens} tokens, {args.relevant} planted pages per query, "
          f"k={args.k}, threads={os.environ['OMP_NUM_THREADS']}", flush=True)
    print(" | ".join(f"{c:>18}" for c in cols), flush=True)
    runs = [run_real(args)] if args.real else (run_synthetic(n, t, args) for n, t in zip(sizes, tokens))
    result: dict = {}
    for rows in runs:
        for result in rows:
            print(" | ".join(f"{str(result[c]):>18}" for c in cols), flush=True)
            print("#", json.dumps(result), flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
