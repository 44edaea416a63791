"""Listwise benchmark: seconds per query and nDCG@5 of five rerankers on the same pages, in the same run.

    point-wise dense      MiniReranker.dense_scores: a plain HF forward per (query, page) pair
    point-wise mini       MiniReranker with early exit + interaction band + pruning (cache prefilled offline)
    zip single pass k=1   ListwiseReranker (ZipRerank): windows of 20 labelled pages, one forward each
    zip single pass k=.5  the same with QI-EI keeping half of every page's visual tokens
    cached listwise       ListwiseReranker(mode="cached"): page band KV prefilled offline, one query pass per window

Model: --model PATH (a Qwen3-VL / Qwen2-VL checkpoint); else the trained default model when it is installed
(minirerank_core/defaults.py and its assets); else a random Qwen3-VL of a realistic-ish shape (--quick: a toy
one). The output says which. With random weights the nDCG column is noise; only the seconds mean something.
The default model is a point-wise (yes/no) student: mini runs with the settings it was trained with, and the
listwise rows show how its label logits transfer untrained (a listwise-trained checkpoint is needed for more).

Pages: --data FILE, a JSON labelled page set (paths relative to the file):
    {"pages": {"page-id": "images/p1.png", ...},
     "queries": [{"query": "...", "candidates": ["page-id", ...], "relevant": ["page-id", ...]}, ...]}
Without --data: the default model's sample corpus (its held-out pages, every page a candidate) when that model
is used; otherwise synthetic rendered report pages (each states figures of one company and year; each query
asks for one figure and the page stating it is relevant).

Pruning maps (mini and cached listwise need one per page, as the first stage gives them): the default
embedder's maps with the default model, else QI-EI maps from the reranker's own embeddings; computed outside
the timed region. Offline prefill is timed separately.

    python benchmarks/listwise.py --quick                # toy model, a few seconds
    python benchmarks/listwise.py                        # realistic-ish random shape (minutes on 2 CPU cores)
    python benchmarks/listwise.py --model CKPT --data pages.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import zlib
from pathlib import Path

import torch

from minirerank_core import MiniReranker, Page, RerankConfig
from minirerank_core import testing as T
from minirerank_core.engine.prefill import tokenize
from minirerank_core.listwise import ListwiseConfig, ListwiseReranker
from minirerank_core.listwise.single_pass import encode_pages, qiei_importance
from minirerank_core.train.metrics import ndcg_at

COMPANIES = ["Acme", "Borealis", "Cobalt", "Dunmore", "Elgin", "Fairway", "Granite", "Harbor", "Ivory", "Juniper"]
METRICS = ["revenue", "net profit", "headcount", "energy use", "R&D spending", "customer count"]
YEARS = list(range(2016, 2024))


# --- data ----------------------------------------------------------------------------------------------------------
def synthetic_set(n_queries: int, n_candidates: int, size: int, seed: int = 0):
    """Rendered report pages; the query asks for one figure of one company and year (one relevant page)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    font = ImageFont.load_default(size=max(10, size // 18))
    combos = [(c, y) for c in COMPANIES for y in YEARS]
    pages, queries = {}, []

    def render(company, year):
        pid = f"{company}-{year}"
        if pid not in pages:
            img = Image.new("RGB", (size, size), "white")
            d = ImageDraw.Draw(img)
            d.text((size // 16, size // 16), f"{company} annual report {year}", fill="black", font=font)
            for i, m in enumerate(METRICS[:4]):
                value = zlib.crc32(f"{company}{year}{m}".encode()) % 900 + 100  # stable across runs
                d.text((size // 16, size // 5 + i * size // 7), f"{m}: {value}", fill="black", font=font)
            pages[pid] = img
        return pid

    for _ in range(n_queries):
        cands = rng.sample(combos, n_candidates)
        company, year = cands[0]
        metric = rng.choice(METRICS[:4])
        ids = [render(c, y) for c, y in cands]
        rng.shuffle(ids)
        queries.append(dict(query=f"What was the {metric} of {company} in {year}?", candidates=ids,
                            relevant=[f"{company}-{year}"]))
    return pages, queries


def load_set(path: Path):
    spec = json.loads(path.read_text())
    pages = {pid: str(path.parent / p) for pid, p in spec["pages"].items()}
    return pages, spec["queries"]


def sample_corpus_set(max_candidates: int):
    """The default model's sample corpus: up to max_candidates pages per query, its relevant ones included."""
    from minirerank_core.defaults import sample_pages, sample_queries

    pages = {p.stem: str(p) for p in sample_pages()}
    rng, queries = random.Random(0), []
    for q in sample_queries():
        cands = list(q["relevant"]) + [pid for pid in pages if pid not in q["relevant"]][: max_candidates - len(q["relevant"])]
        rng.shuffle(cands)  # a neutral initial order (listwise windows start from it)
        queries.append(dict(query=q["query"], relevant=list(q["relevant"]), candidates=cands))
    return pages, queries


def default_model_dir() -> Path | None:
    try:
        from minirerank_core.defaults import DEFAULT_RERANKER_DIR
    except ImportError:
        return None
    return DEFAULT_RERANKER_DIR if (Path(DEFAULT_RERANKER_DIR) / "config.json").exists() else None


# --- model ---------------------------------------------------------------------------------------------------------
def load_model(args, corpus: list[str]):
    """(model, processor, description)."""
    path = args.model or (None if args.random else default_model_dir())
    if path is not None:
        core = MiniReranker.from_pretrained(path, RerankConfig(dtype=args.dtype), head=torch.nn.Identity())
        which = "the installed default model" if args.model is None else "checkpoint"
        return core.model, core.processor, f"{which} {path} (trained weights)"
    tokenizer = T.build_tokenizer(corpus=corpus, vocab_size=1024)
    side = int(round(args.visual_tokens**0.5)) * 32
    processor = T.build_processor("qwen3_vl", tokenizer, max_pixels=side * side, min_pixels=32 * 32)
    if args.quick:
        model = T.tiny_model("qwen3_vl", tokenizer, num_layers=args.layers)
        return model, processor, "RANDOM toy Qwen3-VL (tiny, --quick): nDCG is noise"
    config = T.tiny_config("qwen3_vl", tokenizer, num_layers=args.layers, hidden_size=768, num_heads=12, num_kv_heads=4,
                           intermediate_size=2048, vision_depth=6, vision_hidden=384)
    config.vision_config.num_heads = 6
    config.vision_config.num_position_embeddings = 1024
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    return model, processor, f"RANDOM Qwen3-VL, realistic-ish shape ({args.layers} layers, hidden 768, {n:.0f}M params): nDCG is noise"


def embedder_maps(mini: MiniReranker, queries: list[dict], pages: dict[str, Page]) -> dict[str, dict[str, torch.Tensor]]:
    """The first stage's query importance maps (default ColQwen3 embedder) on the reranker's grid."""
    from minirerank_core.defaults import DEFAULT_EMBEDDER_DIR
    from minirerank_core.retrieval.embedder import PageEmbedder
    from minirerank_core.retrieval.importance import query_importances

    embedder = PageEmbedder.from_pretrained(str(DEFAULT_EMBEDDER_DIR), pixel_budget=mini.pixel_budget)
    ids = list(pages)
    emb = dict(zip(ids, embedder.encode_pages([pages[i] for i in ids], show_progress=False)))
    out = {}
    for q in queries:
        c = q["candidates"]
        maps = query_importances(embedder.encode_query(q["query"]), [emb[i] for i in c], [mini.visual_grid(pages[i]) for i in c])
        out[q["query"]] = dict(zip(c, maps))
    return out


@torch.inference_mode()
def qiei_maps(r: ListwiseReranker, query: str, pages: list[Page]) -> list[torch.Tensor]:
    """Per-page pruning maps on the reranker's grid: QI-EI with the model's own embeddings (stand-in for the
    first-stage embedder's map)."""
    q = r.adapter.embed(tokenize(r.tokenizer, " " + query).to(r.adapter.device))
    feats, _ = encode_pages(r.adapter, r.processor.image_processor, [p.image() for p in pages])
    return [qiei_importance(q, f.embeds).cpu() for f in feats]


# --- run -------------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint path (default: the trained default model, else a random one)")
    p.add_argument("--random", action="store_true", help="use a random model even when a default is installed")
    p.add_argument("--data", type=Path, help="labelled page set (JSON, see above); default: the default model's sample corpus, else synthetic")
    p.add_argument("--quick", action="store_true", help="toy model and few pages: a few seconds")
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--candidates", type=int, default=30, help="per query (synthetic set; cap for the sample corpus); > 20 uses sliding windows")
    p.add_argument("--visual-tokens", type=int, default=144, help="visual tokens per page (random model)")
    p.add_argument("--layers", type=int, default=8, help="LM layers (random model)")
    p.add_argument("--exit", type=int, help="exit layer of mini / cached listwise (default: 3/4 of the layers)")
    p.add_argument("--band", type=int, nargs=2, help="interaction band (default: layers [L/4, L/2))")
    p.add_argument("--mini-keep", type=float, default=0.5, help="keep ratio of mini and cached listwise")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.candidates, args.visual_tokens, args.layers = 2, 6, 16, 6
    torch.set_num_threads(args.threads)

    use_default = args.model is None and not args.random and default_model_dir() is not None
    if args.data is not None:
        page_src, queries = load_set(args.data)
        data_desc = f"{args.data} ({len(queries)} queries)"
    elif use_default:
        page_src, queries = sample_corpus_set(args.candidates)
        queries = queries[: max(args.queries, 1) if args.quick else None]
        data_desc = f"the default model's sample corpus ({len(queries)} queries, {len(page_src)} pages)"
    else:
        page_src, queries = synthetic_set(args.queries, args.candidates, size=int(round(args.visual_tokens**0.5)) * 32)
        data_desc = f"synthetic rendered report pages ({len(queries)} queries x {args.candidates} candidates, 1 relevant each)"
    corpus = [q["query"] for q in queries] + [f"{m}: {c} annual report" for m in METRICS for c in COMPANIES]
    t0 = time.perf_counter()
    model, processor, model_desc = load_model(args, corpus)
    model = model.to(getattr(torch, args.dtype))
    build_s = time.perf_counter() - t0
    pages = {pid: Page(src, id=pid) for pid, src in page_src.items()}
    L = len(model.model.language_model.layers)
    exit_layer = args.exit or max(2, (3 * L) // 4)
    band = tuple(args.band) if args.band else (L // 4, max(L // 4 + 1, L // 2))

    common = dict(dtype=args.dtype)
    dense = MiniReranker(model, processor, RerankConfig(**common))
    if use_default:  # the point-wise student as it was trained: its exit, band, positions, keep ratio and prompt
        from minirerank_core.defaults import DEFAULT_RERANKER_DIR
        from minirerank_core.engine.settings import read_settings

        saved = read_settings(DEFAULT_RERANKER_DIR)
        mini = MiniReranker(model, processor, saved.config.replace(**common), template=saved.template)
        dense = MiniReranker(model, processor, RerankConfig(**common), template=saved.template)
        exit_layer, band, args.mini_keep = mini.config.exit_layer, mini.config.band, mini.config.keep_ratio
    else:
        mini = MiniReranker(model, processor, RerankConfig(exit_layer=exit_layer, band=band, keep_ratio=args.mini_keep, **common))
    zip_full = ListwiseReranker(model, processor, ListwiseConfig(**common))
    zip_half = ListwiseReranker(model, processor, ListwiseConfig(keep_ratio=0.5, **common))
    cached = ListwiseReranker(model, processor, ListwiseConfig(mode="cached", exit_layer=exit_layer, band=band,
                                                               keep_ratio=args.mini_keep, **common))

    # Offline: pruning maps (first stage's job) and the page caches of mini and cached listwise.
    if use_default:
        maps, maps_desc = embedder_maps(mini, queries, pages), "the default embedder's importance maps"
    else:
        maps, maps_desc = {}, "QI-EI maps from the reranker's own embeddings"
        for q in queries:
            cands = [pages[i] for i in q["candidates"]]
            maps[q["query"]] = dict(zip(q["candidates"], qiei_maps(zip_full, q["query"], cands)))
    all_pages = list(pages.values())
    prefill = {}
    for name, r in (("mini", mini), ("cached listwise", cached)):
        t = time.perf_counter()
        r.index(all_pages)
        prefill[name] = (time.perf_counter() - t) / len(all_pages)

    methods = {
        "point-wise dense": lambda q, c, m: sorted(zip(dense.dense_scores(q, c, batch_size=4), [x.id for x in c]), key=lambda t: -t[0]),
        "point-wise mini": lambda q, c, m: [(x.score, x.page_id) for x in mini.rerank(q, c, importance=m)],
        "zip single pass keep=1.0": lambda q, c, m: [(x.score, x.page_id) for x in zip_full.rerank(q, c)],
        "zip single pass keep=0.5": lambda q, c, m: [(x.score, x.page_id) for x in zip_half.rerank(q, c)],
        "cached listwise": lambda q, c, m: [(x.score, x.page_id) for x in cached.rerank(q, c, importance=m)],
    }
    rows = {}
    for name, fn in methods.items():
        warm = queries[0]
        fn(warm["query"], [pages[i] for i in warm["candidates"]][:4], maps[warm["query"]])  # warm-up
        secs, ndcgs = [], []
        for q in queries:
            cands = [pages[i] for i in q["candidates"]]
            t = time.perf_counter()
            ranked = fn(q["query"], cands, maps[q["query"]])
            secs.append(time.perf_counter() - t)
            ndcgs.append(ndcg_at([pid for _, pid in ranked], set(q["relevant"]), 5))
        rows[name] = dict(seconds_per_query=sum(secs) / len(secs), ndcg_at_5=sum(ndcgs) / len(ndcgs))

    n_cand = sum(len(q["candidates"]) for q in queries) / len(queries)
    print(f"\nmodel: {model_desc} (built/loaded in {build_s:.1f}s)")
    print(f"data: {data_desc}; {n_cand:g} candidates/query on average, threads {args.threads}, dtype {args.dtype}")
    print(f"mini / cached listwise: exit {exit_layer}, band {band}, keep {args.mini_keep} ({maps_desc}); "
          f"offline prefill/page: mini {prefill['mini']:.3f}s, cached listwise {prefill['cached listwise']:.3f}s")
    dense_s = rows["point-wise dense"]["seconds_per_query"]
    print(f"{'method':28s} {'s/query':>10s} {'x dense':>9s} {'nDCG@5':>8s}")
    for name, row in rows.items():
        print(f"{name:28s} {row['seconds_per_query']:10.3f} {row['seconds_per_query'] / dense_s:9.3f} {row['ndcg_at_5']:8.3f}")
    summary = dict(
        model=model_desc, trained=not model_desc.startswith("RANDOM"), data=data_desc, candidates_per_query=n_cand,
        queries=len(queries), exit_layer=exit_layer, band=list(band), mini_keep=args.mini_keep, pruning_maps=maps_desc,
        prefill_seconds_per_page={k: round(v, 4) for k, v in prefill.items()},
        methods={k: {m: round(v, 4) for m, v in row.items()} for k, row in rows.items()},
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
