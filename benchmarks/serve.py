"""Service benchmark: N concurrent clients against `minirerank serve` on localhost for T seconds per route.

The server is the real one (FastAPI + uvicorn in a thread of this process, models loaded once, one worker thread
per model); the clients are asyncio httpx clients in another thread, each sending its next request as soon as the
previous one is answered (closed loop). Two phases, one per route:

    rerank   POST /v1/rerank: a query and --docs page images (data URLs) drawn from the corpus, pruning maps from
             the server's embedder; pages repeat across requests, as retrieved pages do, so the page cache is warm
    search   POST /v1/search: first stage over the index (-k candidates) + rerank, top 5

Then a sample of the answers is recomputed in this process (the reranker called directly, maps from an in-memory
FirstStage; pipeline.search for /v1/search) and compared: same pages, scores within 1e-4.

    python benchmarks/serve.py            # the shipped default models over the sample corpus (~1 minute)
    python benchmarks/serve.py --quick    # tiny random models, a few seconds per phase

Prints a table, then one JSON line. Exits 1 if any request failed or any sampled score differs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# Before torch loads: one BLAS / OpenMP thread unless told otherwise (a small shared machine; see retrieval.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 1e-4


def build(args, tmp: Path):
    """(pipeline, page bytes, queries): tiny random models over random pages, or the shipped ones over the sample
    corpus, in a workspace under ``tmp``."""
    from minirerank_core import RerankConfig
    from minirerank_core import testing as T
    from minirerank_core.pipeline import RerankPipeline

    if args.quick:
        import io

        images = []
        for i in range(args.pages or 12):
            buf = io.BytesIO()
            T.random_page_image(160 + 8 * (i % 4), 220, seed=i).save(buf, format="PNG")
            images.append(buf.getvalue())
        pipeline = T.tiny_pipeline(images, RerankConfig(keep_ratio=0.5))
        queries = ["revenue growth", "annual report table", "quarter results chart", "method data model"]
        return pipeline, images, queries
    from minirerank_core.defaults import sample_pages, sample_queries

    pipeline = RerankPipeline.open(tmp / "ws", create=True, show_progress=False)  # the shipped default models
    paths = sample_pages()[: args.pages] if args.pages else sample_pages()
    report = pipeline.add([str(p) for p in paths])
    assert not report.errors, report.errors
    return pipeline, [p.read_bytes() for p in paths], [q["query"] for q in sample_queries()]


def data_url(b: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(b).decode("ascii")


def make_request(route: str, rng: random.Random, queries: list[str], docs: list[str], args) -> tuple[str, dict, tuple]:
    query = rng.choice(queries)
    if route == "search":
        return "/v1/search", {"query": query, "k": args.k, "top_n": 5}, (query,)
    picked = rng.sample(range(len(docs)), min(args.docs, len(docs)))
    return "/v1/rerank", {"query": query, "documents": [docs[i] for i in picked]}, (query, picked)


async def load(url: str, route: str, queries: list[str], docs: list[str], args) -> tuple[list, list, float]:
    """Closed-loop clients for ``args.seconds``: ([(latency s, status)], [(key, answer) sample], wall seconds)."""
    import httpx

    records: list[tuple[float, int]] = []
    sample: list[tuple[tuple, dict]] = []

    async def client(cid: int, c: httpx.AsyncClient, end: float) -> None:
        rng = random.Random(1000 * cid + args.seed)
        while time.perf_counter() < end:
            path, body, key = make_request(route, rng, queries, docs, args)
            t0 = time.perf_counter()
            try:
                r = await c.post(path, json=body)
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            records.append((time.perf_counter() - t0, status))
            if status == 200 and len(sample) < args.sample and rng.random() < 0.5:
                sample.append((key, r.json()))

    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        # warm-up (not timed): the prefix KV, each page's cache entry and embedding, the first-stage code paths
        rng = random.Random(args.seed)
        for _ in range(args.warmup):
            path, body, _ = make_request(route, rng, queries, docs, args)
            (await c.post(path, json=body)).raise_for_status()
        t0 = time.perf_counter()
        end = t0 + args.seconds
        await asyncio.gather(*(client(i, c, end) for i in range(args.clients)))
        wall = time.perf_counter() - t0
    return records, sample, wall


def check(route: str, pipeline, images: list[bytes], sample: list) -> float:
    """Largest score difference between the sampled answers and the same work done in this process; raises on a
    different set or order of pages."""
    from minirerank_core.pages import Page
    from minirerank_core.retrieval import FirstStage, PageIndex

    worst = 0.0
    for key, answer in sample:
        if route == "search":
            (query,) = key
            want = [(r.page_id, r.score) for r in pipeline.search(query, k=args_k(answer), top_n=5)]
            got = [(r["page_id"], r["score"]) for r in answer["results"]]
            if [g[0] for g in got] != [w[0] for w in want]:
                raise AssertionError(f"{route}: pages differ for {query!r}: {got} vs {want}")
        else:
            query, picked = key
            pages = [Page.from_bytes(images[i]) for i in picked]
            first_stage = FirstStage(pipeline.embedder, PageIndex())
            first_stage.add(pages, show_progress=False)
            cands = first_stage.candidates(query, len(pages), pipeline.reranker, exact=True)
            pos = {p.id: j for j, p in enumerate(pages)}
            want_by = {pos[r.page_id]: r.score for r in pipeline.reranker.rerank(query, cands)}
            got_by = {r["index"]: r["score"] for r in answer["results"]}
            if sorted(got_by) != sorted(want_by):
                raise AssertionError(f"{route}: documents differ for {query!r}")
            got, want = list(got_by.items()), [(j, want_by[j]) for j in got_by]
        worst = max([worst] + [abs(g[1] - w[1]) for g, w in zip(got, want)])
    return worst


def args_k(answer: dict) -> int:
    return int(answer["candidates"])


def in_thread(coro):
    """Run ``coro`` on an event loop of its own thread: the clients never share a thread with the server's loop."""
    box: dict = {}
    runner = threading.Thread(target=lambda: box.update(out=asyncio.run(coro)))
    runner.start()
    runner.join()
    return box["out"]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]  # nearest rank


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random models, a few seconds per phase")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per route (default 20; quick 3)")
    p.add_argument("--docs", type=int, default=None, help="documents per /v1/rerank request (default 8; quick 4)")
    p.add_argument("-k", type=int, default=10, help="first-stage candidates per /v1/search (default 10)")
    p.add_argument("--pages", type=int, default=None, help="corpus pages (default: all 24 sample pages; quick 12)")
    p.add_argument("--routes", default="rerank,search", help="phases to run, comma-separated (rerank, search)")
    p.add_argument("--warmup", type=int, default=None, help="untimed requests before each phase (default: one per "
                                                           "page set needed to touch every page)")
    p.add_argument("--sample", type=int, default=12, help="answers per route recomputed in-process (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    args = p.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else (3.0 if args.quick else 20.0)
    args.docs = args.docs if args.docs is not None else (4 if args.quick else 8)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not set(routes) <= {"rerank", "search"}:
        p.error("--routes takes rerank and/or search")
    torch.set_num_threads(args.threads)

    from minirerank_core.serve import BackgroundServer, create_app

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pipeline, images, queries = build(args, Path(tmp))
        setup_s = time.perf_counter() - t0
        docs = [data_url(b) for b in images]
        if args.warmup is None:
            args.warmup = -(-len(images) // max(1, args.docs)) * 2
        print(f"{'quick: tiny random models' if args.quick else 'shipped default models, sample corpus'}; "
              f"{len(images)} pages, {len(queries)} queries; {args.clients} clients x {args.seconds:g} s per route; "
              f"{args.docs} documents per rerank, k={args.k} per search; threads={args.threads}; "
              f"set-up {setup_s:.1f} s")
        phases = {}
        with BackgroundServer(create_app(pipeline)) as server:
            for route in routes:
                records, sample, wall = in_thread(load(server.url, route, queries, docs, args))
                lat = [t for t, s in records if s == 200]
                errors = sum(1 for _, s in records if s != 200)
                worst = check(route, pipeline, images, sample)
                phases[route] = {
                    "requests": len(records), "errors": errors, "requests_per_s": round(len(records) / wall, 2),
                    "pages_per_s": round(len(records) * (args.docs if route == "rerank" else args.k) / wall, 1),
                    "p50_ms": round(1000 * pct(lat, 50), 1), "p95_ms": round(1000 * pct(lat, 95), 1),
                    "p99_ms": round(1000 * pct(lat, 99), 1), "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None,
                    "checked": len(sample), "max_score_diff": worst,
                }
            metrics = __import__("httpx").get(server.url + "/metrics").text
    hits = next((float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("minirerank_page_cache_hits_total ")), None)
    cols = ["route", "requests", "errors", "requests_per_s", "pages_per_s", "p50_ms", "p95_ms", "p99_ms", "checked",
            "max_score_diff"]
    print(" | ".join(f"{c:>14}" for c in cols))
    for route, r in phases.items():
        print(" | ".join(f"{v!s:>14}" for v in [route] + [r[c] for c in cols[1:]]))
    ok = all(r["errors"] == 0 and r["max_score_diff"] <= TOLERANCE for r in phases.values())
    summary = {
        "quick": args.quick, "clients": args.clients, "seconds_per_route": args.seconds, "docs_per_rerank": args.docs,
        "k": args.k, "pages": len(images), "threads": args.threads, "page_cache_hits": hits,
        "routes": phases, "scores_match": ok, "errors": sum(r["errors"] for r in phases.values()),
    }
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
