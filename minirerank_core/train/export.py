"""Stage `export`: write the shipped defaults into minirerank_core/assets/ from a finished recipe run.

    python -m minirerank_core.train.export --run /work/train_runs/r1 --data /work/train_runs/data

  assets/reranker/       the student: HF save_pretrained (safetensors, config, tokenizer, processor config) +
                         minirerank_config.json (RerankConfig fields it was trained with, template strings, ...)
  assets/teacher/        the dense point-wise teacher the student was distilled from (benchmarks/quality.py)
  assets/embedder/       the ColQwen3 embedder: HF save_pretrained + processor config
  assets/listwise/       the listwise (ZipRerank) student, when the run has one (RUN/listwise/final): its weights
                         stored as float16 (half the bytes; loaded as float32 on a CPU) + minirerank_config.json
                         with its ListwiseConfig per layout; checked to score as the float32 model does
  assets/listwise_single_pass/  the single-pass listwise model (RUN/single-head/final), exported the same way
  assets/sample_corpus/  --sample-pages test-split pages (PNG, named by page id) + queries.json; every query is
                         run through the default pipeline (embedder top-k over the sample corpus, then the student
                         with pruning) and marked with whether its relevant page came out on top ("demo": true)

After writing, the reranker is reloaded offline with AutoProcessor / AutoModelForImageTextToText (and the
embedder with ColQwen3) to check they are self-contained.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..engine.settings import read_settings, write_settings
from ..fileio import format_tag, write_json
from .data import DataSet

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "preprocessor_config.json", "minirerank_config.json")


def copy_model(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def verify_offline(reranker_dir: Path, embedder_dir: Path) -> dict:
    """Reload both directories from local files only (no hub lookup); returns their parameter counts."""
    from colpali_engine.models import ColQwen3, ColQwen3Processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoProcessor.from_pretrained(str(reranker_dir), local_files_only=True)
    rr = AutoModelForImageTextToText.from_pretrained(str(reranker_dir), local_files_only=True)
    ColQwen3Processor.from_pretrained(str(embedder_dir), local_files_only=True)
    emb = ColQwen3.from_pretrained(str(embedder_dir), local_files_only=True)
    out = {"reranker_params": sum(p.numel() for p in rr.parameters()),
           "embedder_params": sum(p.numel() for p in emb.parameters())}
    return out


def export_listwise(src: Path, dst: Path, dtype: str = "float16", check_images: list | None = None,
                    query: str = "module") -> dict:
    """Write the listwise student of `src` to `dst` with its weights stored as `dtype` ("float16": half the bytes of
    float32, a relative rounding error of 2^-11), its processor and listwise settings. Reloads `dst` offline with
    ListwiseReranker.from_pretrained (each saved layout) and, given `check_images`, returns how far its single
    pass logits on them are from `src`'s: {"max_abs_diff", "max_logit", "params"}."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ..rerankers.listwise import ListwiseReranker
    from ..rerankers.listwise.settings import read_listwise_settings

    if read_listwise_settings(src) is None:
        raise SystemExit(f"{src} has no listwise settings (minirerank_config.json 'listwise'): not a listwise stage output")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    model = AutoModelForImageTextToText.from_pretrained(str(src), dtype=getattr(torch, dtype))
    model.save_pretrained(dst)
    for name in MODEL_FILES:
        if name not in ("config.json", "generation_config.json", "model.safetensors") and (src / name).exists():
            shutil.copy2(src / name, dst / name)
    saved = read_listwise_settings(dst)
    out: dict = {"params": sum(p.numel() for p in model.parameters())}
    for mode in saved.configs:
        ListwiseReranker.from_pretrained(dst, mode=mode, local_files_only=True)
    if check_images:
        from ..pages import Page

        pages = [Page(im, id=f"p{i}") for i, im in enumerate(check_images)]
        cfg = saved.config().replace(device="cpu", dtype="float32")
        if cfg.mode == "cached":  # pruned by the first stage's maps, which plain images lack: compare unpruned
            cfg = cfg.replace(keep_ratio=1.0)
        a = ListwiseReranker.from_pretrained(src, cfg).score(query, pages)
        b = ListwiseReranker.from_pretrained(dst, cfg).score(query, pages)
        out.update(max_abs_diff=max(abs(x - y) for x, y in zip(a, b)), max_logit=max(abs(x) for x in a))
    return out


def choose_sample(ds: DataSet, n_pages: int, n_docs: int) -> list[str]:
    """`n_pages` test pages from the `n_docs` test documents with the most queried pages (similar pages side by
    side make the demo non-trivial)."""
    queried = {q["positive"] for q in ds.split_queries("test")}
    by_doc: dict[str, list[str]] = {}
    for pid in ds.page_ids("test"):
        if pid in queried:
            by_doc.setdefault(ds.pages[pid]["doc_id"], []).append(pid)
    docs = sorted(by_doc, key=lambda d: (-len(by_doc[d]), d))[:n_docs]
    per = max(1, n_pages // len(docs))
    pages = [p for d in docs for p in sorted(by_doc[d])[:per]]
    return pages[:n_pages]


def build_sample_corpus(ds: DataSet, out_dir: Path, reranker_dir: Path, embedder_dir: Path, n_pages: int, n_docs: int,
                        top_k: int = 10) -> dict:
    from ..pages import Page
    from ..rerankers import MiniReranker
    from ..retrieval import FirstStage

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    page_ids = choose_sample(ds, n_pages, n_docs)
    for p in page_ids:
        shutil.copy2(ds.image_path(p), out_dir / f"{p}.png")
    pages = [Page(out_dir / f"{p}.png", id=p) for p in page_ids]
    mini = MiniReranker.from_pretrained(reranker_dir)  # with the settings and prompt it was trained with
    first_stage = FirstStage.from_pretrained(embedder_dir, reranker=mini)
    first_stage.add(pages)
    entries = []
    for q in ds.split_queries("test"):
        if q["positive"] not in page_ids:
            continue
        cands = first_stage.candidates(q["query"], min(top_k, len(pages)), mini)
        res = mini.rerank(q["query"], cands)
        entries.append(dict(query=q["query"], relevant=[q["positive"]], type=q["type"],
                            first_stage_top1=cands[0].page_id == q["positive"], mini_top1=res[0].page_id == q["positive"],
                            demo=res[0].page_id == q["positive"]))
    n = max(1, len(entries))
    summary = dict(n_queries=len(entries), n_pages=len(pages), top_k=min(top_k, len(pages)),
                   first_stage_top1_accuracy=sum(e["first_stage_top1"] for e in entries) / n,
                   mini_top1_accuracy=sum(e["mini_top1"] for e in entries) / n)
    doc = {
        "source": "held-out test split of the minirerank training data (Python standard-library docstrings, "
                  "rendered); page ids are the PNG file stems",
        "pipeline": "ColQwen3 embedder (assets/embedder) top-k over these pages, then the mini student "
                    "(assets/reranker, its minirerank_config.json) with the embedder's query importance",
        "accuracy": summary,
        "queries": entries,
    }
    write_json(out_dir / "queries.json", doc, format=format_tag("sample-queries", 1))
    return summary


def main(argv=None) -> None:
    from ..defaults import ASSETS_DIR

    ap = argparse.ArgumentParser(prog="python -m minirerank_core.train.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="recipe run directory (student/final, embedder/final)")
    ap.add_argument("--data", type=Path, required=True, help="dataset directory (for the sample corpus)")
    ap.add_argument("--assets", type=Path, default=ASSETS_DIR)
    ap.add_argument("--sample-pages", type=int, default=20)
    ap.add_argument("--sample-docs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rdir, edir, tdir = args.assets / "reranker", args.assets / "embedder", args.assets / "teacher"
    copy_model(args.run / "student" / "final", rdir)
    copy_model(args.run / "embedder" / "final", edir)
    copy_model(args.run / "teacher" / "final", tdir)
    saved = read_settings(rdir)
    write_settings(rdir, saved.config, saved.template, listwise=saved.listwise,
                   **{**saved.extra, "embedder": "../embedder", "trained_by": "minirerank_core.train (see MODEL_CARD.md)"})
    sizes = verify_offline(rdir, edir)
    dirs = [rdir, tdir, edir]
    ds = DataSet(args.data)
    check = None  # the same 8 test pages check every listwise export
    for stage, asset in (("listwise", "listwise"), ("single-head", "listwise_single_pass")):
        if (args.run / stage / "final").exists():
            check = check or [ds.image(p) for p in ds.page_ids("test")[:8]]
            sizes[asset] = export_listwise(args.run / stage / "final", args.assets / asset, check_images=check)
            dirs.append(args.assets / asset)
    summary = build_sample_corpus(ds, args.assets / "sample_corpus", rdir, edir, args.sample_pages, args.sample_docs)
    mb = {d.name: sum(f.stat().st_size for f in d.iterdir()) / 1e6 for d in (*dirs, args.assets / "sample_corpus")}
    print(json.dumps({"sizes_mb": mb, **sizes, "sample": summary}))


if __name__ == "__main__":
    main()
