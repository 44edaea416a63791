"""Listwise benchmark: nDCG@5 and seconds per query of point-wise and listwise rerankers, same pages, same run.

Default: the trained models on the toy's held-out test split (documents never seen in training). Each test query's
candidates are the first stage's top --top-k (20): the shipped ColQwen3 embedder with exact MaxSim over every test
page (FirstStage). Then, on those candidates:

    first stage           the embedder's own order
    point-wise dense      the dense point-wise teacher (--teacher; default: the shipped DEFAULT_TEACHER_DIR):
                          MiniReranker.dense_scores, a plain HF forward per (query, page) pair
    point-wise mini       the shipped miniReranker student in its trained settings (cache prefilled offline)
    zip single pass k=1   the shipped single-pass model (--listwise-single; default DEFAULT_LISTWISE_SINGLE_PASS_DIR,
                          or the --listwise model when --listwise is given alone), ZipRerank's single pass (one
                          forward over the query and the 20 labelled pages), keeping every token
    zip single pass k=.5  the same at the keep ratio it was trained with (QI-EI), its shipped default
    cached listwise       the shipped listwise model (--listwise; default DEFAULT_LISTWISE_DIR) in the cached
                          vision-first layout it was trained for: page band KV prefilled offline (timed separately),
                          one query pass per window

Seconds per query cover the reranking only (the first stage is common to all rows and reported apart); every
reranker gets the same Candidates (pages + the first stage's maps) as `minirerank search` hands them over, and
each runs with the settings saved in its folder. The dataset is rebuilt from its seed into --toy-data when it is
not there (as benchmarks/quality.py does).

    python benchmarks/listwise.py --toy-data /work/train_runs/data [--teacher RUN/teacher/final] [--max-queries 100]

Other models (the pre-existing modes; no listwise-trained checkpoint needed):

    python benchmarks/listwise.py --quick                # toy random model, a few seconds
    python benchmarks/listwise.py --random               # realistic-ish random shape (minutes on 2 CPU cores)
    python benchmarks/listwise.py --model CKPT --data pages.json

--model PATH (a Qwen3-VL / Qwen2-VL checkpoint) or --random (--quick: a toy one); with random weights the nDCG
column is noise, only the seconds mean something. There the same weights run all five rows (mini and cached at
--exit / --band / --mini-keep). Pages: --data FILE, a JSON labelled page set (paths relative to the file):
    {"pages": {"page-id": "images/p1.png", ...},
     "queries": [{"query": "...", "candidates": ["page-id", ...], "relevant": ["page-id", ...]}, ...]}
without --data synthetic rendered report pages (each states figures of one company and year; each query asks for
one figure and the page stating it is relevant). Pruning maps: QI-EI maps from the reranker's own embeddings,
computed outside the timed region. Offline prefill is timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minirerank_core import MiniReranker, Page, RerankConfig
from minirerank_core import testing as T
from minirerank_core.engine.prefill import tokenize
from minirerank_core.rerankers.listwise import ListwiseConfig, ListwiseReranker
from minirerank_core.rerankers.listwise.single_pass import encode_pages, qiei_importance
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


def default_model_dir() -> Path:
    from minirerank_core.defaults import DEFAULT_RERANKER_DIR

    return DEFAULT_RERANKER_DIR


# --- model ---------------------------------------------------------------------------------------------------------
def load_model(args, corpus: list[str]):
    """(model, processor, description)."""
    path = args.model or (None if args.random else default_model_dir())
    if path is not None:
        from minirerank_core.rerankers import load_checkpoint

        core = load_checkpoint(path, dtype=args.dtype)
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


def embedder_maps(mini: MiniReranker, queries: list[dict], pages: dict[str, Page]) -> dict[str, dict[str, object]]:
    """The first stage's query importance maps (default ColQwen3 embedder) on the reranker's grid, per query and page."""
    from minirerank_core.defaults import DEFAULT_EMBEDDER_DIR
    from minirerank_core.retrieval import FirstStage

    first_stage = FirstStage.from_pretrained(DEFAULT_EMBEDDER_DIR, reranker=mini)
    first_stage.add(list(pages.values()))
    out = {}
    for q in queries:
        maps = {c.page_id: c.importance for c in first_stage.candidates(q["query"], len(pages), mini)}
        out[q["query"]] = {i: maps[i] for i in q["candidates"]}
    return out


@torch.inference_mode()
def qiei_maps(r: ListwiseReranker, query: str, pages: list[Page]) -> list[torch.Tensor]:
    """Per-page pruning maps on the reranker's grid: QI-EI with the model's own embeddings (stand-in for the
    first-stage embedder's map)."""
    q = r.adapter.embed(tokenize(r.tokenizer, " " + query).to(r.adapter.device))
    feats, _ = encode_pages(r.adapter, r.processor.image_processor, [p.image() for p in pages])
    return [qiei_importance(q, f.embeds).cpu() for f in feats]


# --- run: any model -----------------------------------------------------------------------------------------------
def generic(args):
    """The pre-existing modes: one checkpoint (--model) or a random model runs all five rows."""
    if args.quick:
        args.queries, args.candidates, args.visual_tokens, args.layers = 2, 6, 16, 6
        args.random = args.random or args.model is None
    use_default = args.model is None and not args.random
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


# --- run: the trained models on the toy's test split ------------------------------------------------------------------
def toy_split(args):
    from minirerank_core.train.data import DataSet

    if not (args.toy_data / "recipe.json").exists():
        print(f"building the toy dataset (seed 0) into {args.toy_data} ...", file=sys.stderr, flush=True)
        from minirerank_core.train.data import build
        from minirerank_core.train.recipe import DATA

        build(args.toy_data, **DATA)
    ds = DataSet(args.toy_data)
    queries = ds.split_queries(args.split)
    if args.max_queries and len(queries) > args.max_queries:
        queries = sorted(random.Random(args.seed).sample(queries, args.max_queries), key=lambda q: q["qid"])
    return ds, queries


def trained(args):
    from minirerank_core.defaults import (DEFAULT_EMBEDDER_DIR, DEFAULT_LISTWISE_DIR, DEFAULT_LISTWISE_SINGLE_PASS_DIR,
                                         DEFAULT_RERANKER_DIR, DEFAULT_TEACHER_DIR)
    from minirerank_core.engine.settings import read_settings
    from minirerank_core.retrieval import FirstStage
    from minirerank_core.rerankers.listwise.settings import read_listwise_settings
    from minirerank_core.train.metrics import summarize

    ldir, tdir = Path(args.listwise or DEFAULT_LISTWISE_DIR), Path(args.teacher or DEFAULT_TEACHER_DIR)
    rdir, edir = Path(args.reranker or DEFAULT_RERANKER_DIR), Path(args.embedder or DEFAULT_EMBEDDER_DIR)
    saved = read_listwise_settings(ldir)
    if saved is None:
        raise SystemExit(f"{ldir} holds no listwise-trained model (minirerank_config.json 'listwise'); pass --listwise "
                         "DIR, or --model / --random for the untrained modes")
    if not (tdir / "config.json").exists():
        raise SystemExit(f"no dense teacher at {tdir}; pass --teacher RUN/teacher/final")
    ds, queries = toy_split(args)
    page_ids = ds.page_ids(args.split)
    pages = {p: Page(ds.image_path(p), id=p) for p in page_ids}
    dev = dict(device=args.device)

    sdir = Path(args.listwise_single) if args.listwise_single else (
        DEFAULT_LISTWISE_SINGLE_PASS_DIR if not args.listwise and (DEFAULT_LISTWISE_SINGLE_PASS_DIR / "config.json").exists()
        else ldir)
    single_saved = read_listwise_settings(sdir) or saved
    # a model trained for the cached layout only still runs ZipRerank's single pass (at its usual keep 0.5), untrained
    single_cfg = (single_saved.configs.get("single_pass")
                  or ListwiseConfig(mode="single_pass", keep_ratio=0.5)).replace(**dev)
    zip_half = ListwiseReranker.from_pretrained(sdir, single_cfg)
    zip_full = ListwiseReranker(zip_half.model, zip_half.processor, single_cfg.replace(keep_ratio=1.0),
                                template=zip_half.template, name=str(sdir))
    cached = ListwiseReranker.from_pretrained(ldir, saved.config("cached").replace(**dev))
    mini = MiniReranker.from_pretrained(rdir, read_settings(rdir).config.replace(**dev))
    dense = MiniReranker.from_pretrained(tdir, RerankConfig(**dev))
    first_stage = FirstStage.from_pretrained(edir, reranker=mini, **dev)

    t = time.perf_counter()
    first_stage.add(list(pages.values()), batch_size=8, show_progress=False)
    embed_s = (time.perf_counter() - t) / len(pages)
    prefill = {}
    for name, r in (("mini", mini), ("cached listwise", cached)):
        t = time.perf_counter()
        r.index(list(pages.values()))
        prefill[name] = (time.perf_counter() - t) / len(pages)

    methods = {
        "point-wise dense teacher": lambda q, c: [c[j].page_id for j in sorted(
            range(len(c)), key=lambda j, s=dense.dense_scores(q, [x.page for x in c], batch_size=4): -s[j])],
        "point-wise mini": lambda q, c: [x.page_id for x in mini.rerank(q, c)],
        f"zip single pass keep={zip_full.config.keep_ratio:g}": lambda q, c: [x.page_id for x in zip_full.rerank(q, c)],
        f"zip single pass keep={zip_half.config.keep_ratio:g}": lambda q, c: [x.page_id for x in zip_half.rerank(q, c)],
        "cached listwise": lambda q, c: [x.page_id for x in cached.rerank(q, c)],
    }
    warm = first_stage.candidates(queries[0]["query"], args.top_k, mini)
    for fn in methods.values():  # warm-up (first calls allocate)
        fn(queries[0]["query"], warm)
    rankings = {"first stage": [], **{m: [] for m in methods}}
    secs = {m: 0.0 for m in rankings}
    rel, details = [], []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        cands = first_stage.candidates(q["query"], args.top_k, mini)  # pages + maps, as `minirerank search` hands them
        secs["first stage"] += time.perf_counter() - t
        rankings["first stage"].append([c.page_id for c in cands])
        for name, fn in methods.items():  # interleaved per query: load changes on the machine hit every row alike
            t = time.perf_counter()
            rankings[name].append(fn(q["query"], cands))
            secs[name] += time.perf_counter() - t
        rel.append({q["positive"]})
        details.append({"qid": q["qid"], **{m: r[-1][:5] for m, r in rankings.items()}})
        if not args.quiet and (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(queries)} queries", file=sys.stderr, flush=True)
    n = len(queries)
    rows = {m: {**summarize(r, rel), "seconds_per_query": secs[m] / n} for m, r in rankings.items()}
    recall_k = sum(bool(set(r) & g) for r, g in zip(rankings["first stage"], rel)) / n
    dense_s = rows["point-wise dense teacher"]["seconds_per_query"]
    print(f"\n{args.split}: {n} queries over {len(pages)} pages; first stage top-{args.top_k} reranked "
          f"(first-stage recall@{args.top_k} = {recall_k:.3f}); threads {torch.get_num_threads()}, device {args.device}")
    trained_for = ", ".join(sorted(saved.configs))
    print(f"listwise: {ldir}, trained for: {trained_for} (cached exit {cached.config.exit_layer}, band "
          f"{cached.config.band}, keep {cached.config.keep_ratio:g}); single pass: {sdir}, trained for: "
          f"{', '.join(sorted(single_saved.configs))} (prune_by={single_cfg.prune_by}, readout={single_cfg.readout}); "
          f"teacher: {tdir}")
    print(f"offline per page: embed {embed_s:.3f}s, mini prefill {prefill['mini']:.3f}s, "
          f"cached listwise prefill {prefill['cached listwise']:.3f}s")
    print(f"{'system':28s} {'nDCG@5':>7s} {'R@1':>6s} {'R@5':>6s} {'MRR':>6s} {'s/query':>8s} {'x dense':>8s}")
    for name, r in rows.items():
        print(f"{name:28s} {r['ndcg5']:7.4f} {r['recall1']:6.3f} {r['recall5']:6.3f} {r['mrr']:6.3f} "
              f"{r['seconds_per_query']:8.4f} {r['seconds_per_query'] / dense_s:8.3f}")
    full, half = rows[f"zip single pass keep={zip_full.config.keep_ratio:g}"], rows[f"zip single pass keep={zip_half.config.keep_ratio:g}"]
    dense_r, cach = rows["point-wise dense teacher"], rows["cached listwise"]
    checks = {
        "single_pass_ndcg5_minus_dense": half["ndcg5"] - dense_r["ndcg5"],
        "single_pass_time_over_dense": half["seconds_per_query"] / dense_s,
        "keep_half_minus_full_ndcg5": half["ndcg5"] - full["ndcg5"],
        "keep_half_time_over_full": half["seconds_per_query"] / full["seconds_per_query"],
        "cached_over_single_pass_ndcg5": cach["ndcg5"] / half["ndcg5"] if half["ndcg5"] else None,
        "cached_time_over_single_pass": cach["seconds_per_query"] / half["seconds_per_query"],
    }
    for k, v in checks.items():
        print(f"  {k} = {'n/a' if v is None else f'{v:.4f}'}")
    if args.details:
        args.details.write_text(json.dumps(details, indent=1))
    print(json.dumps({"split": args.split, "n_queries": n, "n_pages": len(pages), "top_k": args.top_k,
                      "recall_at_k_first_stage": recall_k, "listwise": str(ldir), "listwise_single": str(sdir),
                      "teacher": str(tdir), "listwise_configs": {m: c.to_dict() for m, c in saved.configs.items()},
                      "single_pass_config": single_cfg.to_dict(),
                      "offline_seconds_per_page": {"embed": embed_s, **prefill}, "methods": rows, "checks": checks,
                      "threads": torch.get_num_threads()}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("trained models on the toy's test split (the default)")
    t.add_argument("--toy-data", type=Path, default=ROOT / "runs" / "data",
                   help="the toy dataset (train.data; built from seed 0 when missing)")
    t.add_argument("--listwise", help="listwise-trained checkpoint (default: the shipped DEFAULT_LISTWISE_DIR)")
    t.add_argument("--listwise-single", help="the model the single-pass rows run (default: the shipped "
                   "DEFAULT_LISTWISE_SINGLE_PASS_DIR, or --listwise's model when --listwise is given alone)")
    t.add_argument("--teacher", help="dense point-wise teacher (default: the shipped DEFAULT_TEACHER_DIR)")
    t.add_argument("--reranker", help="point-wise mini student (default: the shipped DEFAULT_RERANKER_DIR)")
    t.add_argument("--embedder", help="first-stage embedder (default: the shipped DEFAULT_EMBEDDER_DIR)")
    t.add_argument("--split", default="test", choices=["test", "val"])
    t.add_argument("--top-k", type=int, default=20, help="first-stage candidates reranked per query")
    t.add_argument("--max-queries", type=int, default=None, help="a seeded subset of the split's queries")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--details", type=Path, default=None, help="write per-query top-5 lists to this JSON file")
    t.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("any checkpoint or a random model (--model / --random / --quick / --data)")
    g.add_argument("--model", help="checkpoint path: all five rows on its weights")
    g.add_argument("--random", action="store_true", help="a random model (nDCG is noise)")
    g.add_argument("--data", type=Path, help="labelled page set (JSON, see above); default: synthetic pages")
    g.add_argument("--quick", action="store_true", help="toy random model and few pages: a few seconds")
    g.add_argument("--queries", type=int, default=3)
    g.add_argument("--candidates", type=int, default=30, help="per query (synthetic set); > 20 uses sliding windows")
    g.add_argument("--visual-tokens", type=int, default=144, help="visual tokens per page (random model)")
    g.add_argument("--layers", type=int, default=8, help="LM layers (random model)")
    g.add_argument("--exit", type=int, help="exit layer of mini / cached listwise (default: 3/4 of the layers)")
    g.add_argument("--band", type=int, nargs=2, help="interaction band (default: layers [L/4, L/2))")
    g.add_argument("--mini-keep", type=float, default=0.5, help="keep ratio of mini and cached listwise")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model or args.random or args.quick or args.data:
        return generic(args)
    return trained(args)


if __name__ == "__main__":
    main()
