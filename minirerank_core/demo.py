"""`minirerank demo`: index the sample corpus, then answer its queries with the first stage + miniReranker.

Runs the small trained default models shipped in the package. It shows a few queries in detail and then the true
top-1 accuracy over *all* sample queries (first stage alone and first stage + reranker), measured in this run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from . import defaults
from .pages import Page

DEMO_QUERIES = 4


def run_demo(json_output: bool = False, k: int | None = None, top_n: int = 3) -> int:
    from .pipeline import RerankPipeline
    from .rerankers import MiniReranker
    from .retrieval import PageIndex
    from .retrieval.embedder import PageEmbedder

    from .rerankers import loading

    print(f"NOTE: {loading.TOY_NOTE}", file=sys.stderr)  # said here, so not again as a warning
    loading._TOY_SAID = True
    reranker = MiniReranker.from_pretrained()
    embedder = PageEmbedder.for_reranker(defaults.DEFAULT_EMBEDDER_DIR, reranker)
    spec = json.loads((defaults.SAMPLE_CORPUS_DIR / "queries.json").read_text())
    pages = [Page(p, id=p.stem) for p in defaults.sample_pages()]
    k = k or spec["accuracy"]["top_k"]  # the candidate count the sample queries were recorded with at export
    # Shown in detail: queries marked "demo" at export, those the first stage got wrong first; the accuracy
    # below covers every query.
    shown = sorted((q for q in spec["queries"] if q.get("demo")), key=lambda q: bool(q.get("first_stage_top1")))
    shown_queries = {q["query"] for q in shown[:DEMO_QUERIES]}
    report = {"n_pages": len(pages), "config": reranker.config.to_dict(), "queries": []}
    with tempfile.TemporaryDirectory() as tmp:
        pipe = RerankPipeline(embedder, reranker, PageIndex.create(Path(tmp) / "index"), page_dir=Path(tmp) / "pages",
                              show_progress=not json_output)
        t = time.perf_counter()
        pipe.add(pages)
        report["index_seconds"] = round(time.perf_counter() - t, 3)
        if not json_output:
            print(f"\nindexed {len(pages)} pages (embeddings + page KV cache) in {report['index_seconds']:.2f}s")
            print(f"reranker config: exit_layer={reranker.config.exit_layer} band={reranker.config.band} "
                  f"keep_ratio={reranker.config.keep_ratio} positions={reranker.config.query_positions}")
        first_ok = mini_ok = 0
        for q in spec["queries"]:
            query, relevant = q["query"], set(q["relevant"])
            t = time.perf_counter()
            results = pipe.search(query, k=k, top_n=k)
            mini_s = time.perf_counter() - t
            first = min(results, key=lambda r: r.first_stage_rank)
            first_ok += first.page_id in relevant
            mini_ok += results[0].page_id in relevant
            entry = {"query": query, "relevant": sorted(relevant), "first_stage_top1": first.page_id in relevant,
                     "top1_correct": results[0].page_id in relevant, "search_rerank_seconds": round(mini_s, 4),
                     "results": [{"rank": r.rank, "page_id": r.page_id, "score": round(r.score, 4),
                                  "first_stage_rank": r.first_stage_rank} for r in results[:top_n]]}
            report["queries"].append(entry)
            if query in shown_queries and not json_output:
                t = time.perf_counter()
                reranker.dense_scores(query, [r.page for r in results])
                dense_s = time.perf_counter() - t
                print(f"\nquery: {query!r}   (relevant: {', '.join(sorted(relevant))}; first stage + miniReranker "
                      f"{mini_s * 1000:.0f} ms, dense forward (same weights, no cache) of the same {len(results)} "
                      f"candidates {dense_s * 1000:.0f} ms)")
                print(f"  {'rank':>4}  {'page':<28} {'score':>8}  {'1st-stage rank':>14}")
                for r in results[:top_n]:
                    mark = "  <- relevant" if r.page_id in relevant else ""
                    print(f"  {r.rank:>4}  {r.page_id:<28} {r.score:>8.3f}  {r.first_stage_rank:>14}{mark}")
    n = len(spec["queries"])
    report["accuracy"] = {"n_queries": n, "top_k": k, "first_stage_top1": first_ok / n, "mini_top1": mini_ok / n}
    if json_output:
        print(json.dumps(report))
    else:
        print(f"\ntop-1 over all {n} sample queries (this run, {k} candidates each): first stage {first_ok}/{n} "
              f"({first_ok / n:.0%}), first stage + miniReranker {mini_ok}/{n} ({mini_ok / n:.0%})")
    return 0
