"""`minirerank demo`: index a small page corpus, then answer a few queries with first stage + miniReranker.

Uses the trained default models and sample corpus shipped in the package when they are installed; otherwise
runs the same pipeline on tiny random models and says so (their rankings are meaningless).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from .engine.config import RerankConfig
from .pages import Page
from .reranker import MiniReranker

DEMO_QUERIES = 4
RANDOM_BANNER = (
    "NOTE: no trained default model is installed, so this demo runs the full pipeline on TINY RANDOM models.\n"
    "      The timings and the mechanics are real; the rankings are noise."
)


def _trained():
    """(reranker, embedder, pages, queries, sample accuracy) from the shipped defaults, or None if they are not
    installed."""
    try:
        from . import defaults
    except ImportError:
        return None
    if not (Path(defaults.DEFAULT_RERANKER_DIR).exists() and Path(defaults.SAMPLE_CORPUS_DIR).exists()):
        return None
    from .retrieval.embedder import PageEmbedder

    reranker = MiniReranker.from_pretrained()
    embedder = PageEmbedder.from_pretrained(defaults.DEFAULT_EMBEDDER_DIR, pixel_budget=reranker.pixel_budget)
    spec = json.loads((Path(defaults.SAMPLE_CORPUS_DIR) / "queries.json").read_text())  # queries + their accuracy
    pages = [Page(p, id=p.stem) for p in defaults.sample_pages()]
    # The demo shows the sample queries marked "demo" (those the shipped pipeline ranks right; queries.json records
    # the pipeline's accuracy over all of them, which the demo prints too).
    shown = sorted((q for q in spec["queries"] if q.get("demo")), key=lambda q: bool(q.get("first_stage_top1")))
    queries = [(q["query"], set(q["relevant"])) for q in shown[:DEMO_QUERIES]]  # reranking fixes first
    return reranker, embedder, pages, queries, spec.get("accuracy")


def _random():
    from . import testing as T
    from .retrieval.embedder import PageEmbedder

    tok = T.build_tokenizer()
    model, proc = T.tiny_model_and_processor("qwen3_vl", max_pixels=448 * 448)
    reranker = MiniReranker(model, proc, RerankConfig(exit_layer=5, band=(2, 4), keep_ratio=0.5))
    col, col_proc = T.tiny_embedder("qwen3_vl", tok, max_pixels=448 * 448)
    embedder = PageEmbedder(col, col_proc, pixel_budget=reranker.pixel_budget)
    topics = ["annual revenue table", "network protocol", "garden plants", "tax return form", "train timetable", "recipe for bread"]
    pages = [Page(_text_page(t, seed=i), id=f"page-{i}") for i, t in enumerate(topics)]
    queries = [("revenue growth last year", {"page-0"}), ("when does the train leave", {"page-4"})]
    return reranker, embedder, pages, queries, None


def _text_page(title: str, seed: int):
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (320, 448), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=18)
    d.text((20, 20), title.title(), fill="black", font=font)
    for i in range(14):
        d.text((20, 60 + 26 * i), f"{title} line {i + 1} " + "lorem ipsum"[: (seed + i) % 11], fill="black", font=ImageFont.load_default(size=12))
    return img


def run_demo(json_output: bool = False, k: int | None = None, top_n: int = 3) -> int:
    from .pipeline import RerankPipeline
    from .retrieval import PageIndex

    loaded = _trained()
    trained = loaded is not None
    if not trained:
        print(RANDOM_BANNER, file=sys.stderr)
        loaded = _random()
    reranker, embedder, pages, queries, accuracy = loaded
    if accuracy and k is None:
        k = accuracy["top_k"]  # the candidate count the sample queries were checked with at export
    k = k or 8
    report = {"trained_models": trained, "n_pages": len(pages), "config": reranker.config.to_dict(), "queries": [],
              "sample_accuracy": accuracy}
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
        correct = 0
        for query, relevant in queries:
            t = time.perf_counter()
            results = pipe.search(query, k=k, top_n=top_n)
            mini_s = time.perf_counter() - t
            candidates = [r.page for r in pipe.search(query, k=k, top_n=k, rerank=False)]
            t = time.perf_counter()
            reranker.dense_scores(query, candidates)
            dense_s = time.perf_counter() - t
            hit = bool(results) and results[0].page_id in relevant
            correct += hit
            report["queries"].append({
                "query": query, "relevant": sorted(relevant), "top1_correct": hit, "search_rerank_seconds": round(mini_s, 4),
                "dense_rerank_seconds": round(dense_s, 4),
                "results": [{"rank": r.rank, "page_id": r.page_id, "score": round(r.score, 4),
                             "first_stage_rank": r.first_stage_rank} for r in results],
            })
            if not json_output:
                print(f"\nquery: {query!r}   (relevant: {', '.join(sorted(relevant))}; first stage + miniReranker {mini_s * 1000:.0f} ms, "
                      f"dense forward (same weights, no cache) of the same {len(candidates)} candidates {dense_s * 1000:.0f} ms)")
                print(f"  {'rank':>4}  {'page':<28} {'score':>8}  {'1st-stage rank':>14}")
                for r in results:
                    mark = "  <- relevant" if r.page_id in relevant else ""
                    print(f"  {r.rank:>4}  {r.page_id:<28} {r.score:>8.3f}  {r.first_stage_rank:>14}{mark}")
        report["top1_correct"] = f"{correct}/{len(queries)}"
    if json_output:
        print(json.dumps(report))
    else:
        print(f"\ntop-1 correct: {correct}/{len(queries)}" + ("" if trained else "  (random models: expect noise)"))
        if accuracy:
            print(f"(on all {accuracy['n_queries']} sample queries, recorded at export: first stage top-1 "
                  f"{accuracy['first_stage_top1_accuracy']:.0%}, first stage + miniReranker top-1 "
                  f"{accuracy['mini_top1_accuracy']:.0%}; the demo shows queries it ranks right)")
    return 0
