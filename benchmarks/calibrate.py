"""Calibration benchmark: how mini can a checkpoint be made without training (minirerank_core.calibrate)?

    python benchmarks/calibrate.py                      # the shipped dense teacher on the toy's held-out split
    python benchmarks/calibrate.py --random-2b          # a random Qwen3-VL-2B-shape model: only the time ratio means something
    python benchmarks/calibrate.py --quick              # a tiny random model, seconds

Default: the shipped dense teacher (minirerank_core.defaults.DEFAULT_TEACHER_DIR), used as it is, swept over exit
layer, band and keep ratio (exact positions) against its own dense ranking, on --max-queries queries of the toy's
held-out test split with the first stage's top --top-k (the shipped ColQwen3 embedder, which also gives the maps).
The dataset is rebuilt from its seed into --data when missing. Prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minirerank_core import MiniReranker, Page, RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402
from minirerank_core.calibrate import Setting, calibrate  # noqa: E402


def toy(args):
    from minirerank_core.defaults import DEFAULT_EMBEDDER_DIR, DEFAULT_TEACHER_DIR
    from minirerank_core.retrieval import FirstStage
    from minirerank_core.train.data import DataSet

    if not (args.data / "recipe.json").exists():
        from minirerank_core.train.data import build
        from minirerank_core.train.recipe import DATA

        print(f"building the toy dataset (seed 0) into {args.data} ...", file=sys.stderr, flush=True)
        build(args.data, **DATA)
    ds = DataSet(args.data)
    queries = ds.split_queries("test")
    queries = sorted(random.Random(0).sample(queries, min(args.max_queries, len(queries))), key=lambda q: q["qid"])
    pages = [Page(ds.image_path(p), id=p) for p in ds.page_ids("test")]
    model = args.model or DEFAULT_TEACHER_DIR
    reranker = MiniReranker.from_pretrained(model, RerankConfig(device=args.device))
    first_stage = FirstStage.from_pretrained(DEFAULT_EMBEDDER_DIR, reranker=reranker)
    cal = calibrate(reranker, pages, [q["query"] for q in queries], first_stage=first_stage, k=args.top_k,
                    target=args.target)
    return cal, f"{model} on the toy's test split ({len(queries)} queries, {len(pages)} pages, top {args.top_k})"


def random_model(args):
    """A random model: agreement values are noise; the time ratio of each setting is what this measures."""
    tok = T.build_tokenizer()
    if args.quick:
        model = T.tiny_model("qwen3_vl", tok, num_layers=8)
        proc = T.build_processor("qwen3_vl", tok, max_pixels=64 * 64 * 4)
        side, desc = 128, "a tiny random Qwen3-VL (8 layers)"
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from engine import build_model  # the benchmark's Qwen3-VL-2B shape

        model = build_model(argparse.Namespace(quick=False, layers=28, dtype="float32"), tok)
        side = int(round(args.visual_tokens ** 0.5)) * 32
        proc = T.build_processor("qwen3_vl", tok, max_pixels=side * side, min_pixels=32 * 32)
        desc = f"a random Qwen3-VL-2B-shape model (28 layers, {args.visual_tokens} visual tokens per page)"
    reranker = MiniReranker(model, proc, RerankConfig(batch_size=args.pages))
    pages = [Page(T.random_page_image(side, side, seed=i), id=f"p{i}") for i in range(args.pages)]
    L = reranker.adapter.num_layers
    grid = [Setting(L, (0, L)), Setting(round(0.57 * L), (round(0.36 * L), round(0.5 * L))),
            Setting(round(0.75 * L), (0, round(0.75 * L))), Setting(round(0.5 * L), (round(0.25 * L), round(0.4 * L)))]
    cal = calibrate(reranker, pages, ["revenue growth table", "network protocol"][: args.queries], grid=grid,
                    target=args.target, dense_sample=1)
    return cal, f"{desc}; {args.pages} pages, {args.queries} queries"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint to calibrate on the toy split (default: the shipped teacher)")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data")
    ap.add_argument("--max-queries", type=int, default=60)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--random-2b", action="store_true", help="a random Qwen3-VL-2B-shape model (slow on a CPU)")
    ap.add_argument("--quick", action="store_true", help="a tiny random model")
    ap.add_argument("--pages", type=int, default=3, help="random models: pages")
    ap.add_argument("--queries", type=int, default=1, help="random models: queries")
    ap.add_argument("--visual-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cal, desc = random_model(args) if (args.random_2b or args.quick) else toy(args)
    print(f"calibrating {desc}")
    print(cal.table())
    print(json.dumps({"model": desc, **cal.to_json()}))


if __name__ == "__main__":
    main()
