"""Distributed indexing of a workspace on Ray: ``minirerank index DOCS --index DIR --ray`` and :func:`index_with_ray`.

A Ray Data pipeline per round of documents; Ray schedules everything (this module writes no scheduler):

    documents ─► render (tasks: PDF pages → PNG in DIR/pages, image files as they are, content hashes)
              ─► driver: duplicates dropped in input order (as ``ingest`` does), ids checked against the index
              ─► embed   (actor pool: the first-stage embedder, GPU actors with --gpus-per-worker)
              ─► prefill (actor pool: the reranker; writes each page's cache entry to the shared page cache)
              ─► write   (tasks: one index segment per batch of pages, into DIR/.ray-staging/<job>/)
              ─► driver: staged segments renamed into DIR/index and committed in one manifest switch
                 (every ``commit_pages`` pages), under the workspace's writer lock

Streaming: Ray Data moves bounded blocks between the stages (backpressure on its object store budget), so memory
does not grow with the corpus; the driver holds only the small page records of one round (``docs_per_round``).

A killed job loses only what was not committed: committed pages are duplicates of the index on the next run (not
rendered twice into PNGs, not embedded, not prefilled), their cache entries were written before their segment,
and the staging directory of the dead job is removed. Workers and the driver must see DIR (one machine, or a
shared filesystem); the page cache may be the workspace's ``cache`` directory or an fsspec URL (``s3://...``).

The result equals the single-process ``RerankPipeline.add`` (same ids, metadata, embeddings, cache entries and
search results; floats within batching noise), except that image paths are recorded absolute.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DuplicatePageIdError, InvalidImageError, PdfError
from ..fileio import writer_lock
from ..pages.ingest import Duplicate, IngestError, _expand
from ..validation import check_positive_int

logger = logging.getLogger("minirerank.distributed")

STAGING = ".ray-staging"
_WRITER_CPUS = 0.25  # a segment write is I/O and a FAISS build of one batch; it must fit beside the model actors


@dataclass
class RayIndexReport:
    """What a distributed ``index`` did (the fields of ``IngestReport`` the CLI prints, without the Page objects)."""

    pages_added: list[str] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    errors: list[IngestError] = field(default_factory=list)
    documents: dict[str, int] = field(default_factory=dict)  # source -> pages added
    pages_total: int = 0
    pages_embedded: int = 0  # pages that went through embed and prefill in this run
    commits: int = 0


# --------------------------------------------------------------------------- model loading (in the workers)
def load_mini_reranker(path: str | None, config: dict | None, cache_dir: str | None) -> Any:
    """The point-wise reranker a worker uses (pickled by reference: Ray ships only its arguments)."""
    from ..engine.config import RerankConfig
    from ..rerankers import MiniReranker

    return MiniReranker.from_pretrained(path, RerankConfig.from_dict(config) if config else None, cache_dir=cache_dir)


def _threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))  # one actor per CPU share: no oversubscription of the node


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))] if keys else []


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    keys = list(rows[0]) if rows else []
    return {k: np.array([r[k] for r in rows], dtype=object) for k in keys}


def _page(row: dict[str, Any]) -> Any:
    from ..pages.ingest import reload_page

    return reload_page(str(row["id"]), json.loads(row["meta"]))


def _embedding(row: dict[str, Any]) -> Any:
    import torch

    from ..retrieval.embedding import PageEmbedding

    vectors = np.frombuffer(row["vectors"], dtype=np.float32).reshape(int(row["n_vectors"]), int(row["dim"]))
    patch_rows = np.frombuffer(row["patch_rows"], dtype=np.int64)
    return PageEmbedding(str(row["id"]), torch.from_numpy(vectors.copy()), torch.from_numpy(patch_rows.copy()),
                         (int(row["grid_h"]), int(row["grid_w"])), str(row["hash"]), json.loads(row["meta"]))


class EmbedStage:
    """Actor: holds the first-stage embedder (built for the reranker's pixel budget, as the pipeline does)."""

    def __init__(self, load_reranker: Callable[[], Any], embedder: str, batch_size: int, cpus: float) -> None:
        from ..retrieval.embedder import PageEmbedder

        _threads(cpus)
        reranker = load_reranker()
        self.embedder = PageEmbedder.for_reranker(embedder, reranker)
        del reranker  # only its pixel budget was needed here
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = _rows(batch)
        embeddings = self.embedder.encode_pages([_page(r) for r in rows], batch_size=self.batch_size, show_progress=False)
        for r, e in zip(rows, embeddings):
            r.update(vectors=e.vectors.numpy().astype(np.float32).tobytes(), n_vectors=int(e.vectors.shape[0]),
                     dim=int(e.vectors.shape[1]), patch_rows=e.patch_rows.numpy().astype(np.int64).tobytes(),
                     grid_h=int(e.grid[0]), grid_w=int(e.grid[1]))
        return _columns(rows)


class PrefillStage:
    """Actor: holds the reranker; writes each page's KV to the shared page cache (what ``RerankPipeline.add`` does
    with ``reranker.index``), with the index-time map from the page's embedding when it prunes at index time."""

    def __init__(self, load_reranker: Callable[[], Any], cpus: float) -> None:
        _threads(cpus)
        self.reranker = load_reranker()
        memory = getattr(self.reranker.pages.store, "memory", None)
        if memory is not None:
            memory.max_bytes = 0  # a worker writes pages once and never reads them back: no RAM tier

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..retrieval.importance import page_importance

        rows = _rows(batch)
        pages = [_page(r) for r in rows]
        maps = None
        if self.reranker.pruning.prunes_at_index_time:
            maps = [page_importance(_embedding(r), self.reranker.visual_grid(p)) for r, p in zip(rows, pages)]
        self.reranker.pages.fill(pages, maps)
        return batch


def write_segment(batch: dict[str, np.ndarray], *, staging: str, ann: dict, job: str) -> dict[str, np.ndarray]:
    """Task: one index segment of the batch's pages in the staging directory; returns its name and ids."""
    from ..retrieval.ann import AnnConfig
    from ..retrieval.segment import Segment

    rows = _rows(batch)
    embeddings = [_embedding(r) for r in rows]
    # the metadata FirstStage.add records: the page's own, plus the file it can be loaded from
    metas = [{**e.metadata, **({"image_path": str(r["source"])} if r["source"] else {})} for r, e in zip(rows, embeddings)]
    name = f"seg-ray-{job}-{secrets.token_hex(4)}"  # "seg-": the index's garbage collector knows it once moved
    segment = Segment.from_embeddings(name, embeddings, metas, AnnConfig.from_dict(ann))
    segment.write(Path(staging))
    return {"segment": np.array([name], dtype=object), "ids": np.array([json.dumps([e.page_id for e in embeddings])],
                                                                        dtype=object)}


def render_document(row: dict[str, Any], *, pages_dir: str, dpi: float, known_ref: Any) -> list[dict[str, Any]]:
    """Task: ``ingest`` of one document (the single-process code), as records the driver merges in input order."""
    import ray

    from ..pages.ingest import ingest

    known = ray.get(known_ref)
    report = ingest([row["path"]], dpi=dpi, image_dir=pages_dir, known=known, show_progress=False)
    out: list[dict[str, Any]] = []
    for j, p in enumerate(report.pages):
        out.append(dict(kind="page", order=row["order"], seq=j, id=p.id, hash=p.content_hash,
                        meta=json.dumps(p.metadata), source=p.source or ""))
    for j, e in enumerate(report.errors):
        payload = {"source": e.source, "page": e.page, "error": str(e.error), "type": type(e.error).__name__}
        out.append(dict(kind="error", order=row["order"], seq=j, id="", hash="", meta=json.dumps(payload), source=""))
    for j, d in enumerate(report.duplicates):
        payload = {"source": d.source, "page": d.page, "content_hash": d.content_hash}
        out.append(dict(kind="dup", order=row["order"], seq=j, id="", hash=d.content_hash, meta=json.dumps(payload),
                        source=""))
    return out


# --------------------------------------------------------------------------- the driver
def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def _embedder_of(root: Path, saved: dict, embedder: str | os.PathLike[str] | None, has_index: bool) -> str:
    """The embedder a workspace is built with: the one given, else the recorded one, else the shipped default; one
    other than the index's is refused (RerankPipeline.open's rule)."""
    from ..defaults import DEFAULT_EMBEDDER_DIR
    from ..pipeline import _abs

    default = str(DEFAULT_EMBEDDER_DIR.resolve())
    recorded = (saved.get("embedder") or default) if saved else None
    given = _abs(None if embedder is None else os.fspath(embedder))
    if recorded and given and given != recorded and has_index:
        raise ConfigError(f"{root} was indexed with the embedder {recorded}; pages embedded by another model would mix "
                          "embedding spaces. Use a new workspace directory")
    return given or recorded or default


def _record_workspace(root: Path, embedder: str, reranker: str | None) -> None:
    from ..defaults import DEFAULT_EMBEDDER_DIR, DEFAULT_RERANKER_DIR
    from ..fileio import write_json
    from ..pipeline import WORKSPACE_FILE, WORKSPACE_FORMAT, _model_ref, read_workspace

    info = {"embedder": _model_ref(embedder, DEFAULT_EMBEDDER_DIR),
            "reranker": _model_ref(reranker or str(DEFAULT_RERANKER_DIR), DEFAULT_RERANKER_DIR)}
    if read_workspace(root) != {"format": WORKSPACE_FORMAT, **info}:
        write_json(root / WORKSPACE_FILE, info, format=WORKSPACE_FORMAT)


def _error(payload: dict[str, Any]) -> IngestError:
    kind = {"PdfError": PdfError}.get(payload["type"], InvalidImageError)
    return IngestError(payload["source"], kind(payload["error"]), payload["page"])


def index_with_ray(
    docs: Iterable[str | os.PathLike[str]],
    workspace: str | os.PathLike[str],
    *,
    reranker: str | os.PathLike[str] | None = None,
    embedder: str | os.PathLike[str] | None = None,
    config: Any = None,
    cache_dir: str | None = None,
    load_reranker: Callable[[], Any] | None = None,
    address: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    batch_size: int = 4,
    segment_pages: int = 256,
    commit_pages: int = 1024,
    docs_per_round: int = 256,
    dpi: float = 144.0,
    lock_timeout: float | None = 60.0,
    show_progress: bool = True,
) -> RayIndexReport:
    """Index ``docs`` (PDFs, images, folders) into the workspace directory ``workspace`` (what ``minirerank index
    --index DIR`` builds) on a Ray cluster (``address``; None: the one this process is connected to, else a local
    one started for the job and stopped after it).

    Models: ``reranker`` (a checkpoint path or hub id; None: the workspace's, else the shipped default) with
    ``config`` (a RerankConfig overriding its saved settings) and ``cache_dir`` (default ``workspace/cache``; an
    fsspec URL shares it across machines), or ``load_reranker``, a picklable zero-argument callable that builds it;
    ``embedder`` (default: the workspace's, else the shipped one). ``workers`` actors per model stage, each with
    ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs. Pages are embedded ``batch_size`` at a time, written
    ``segment_pages`` per index segment and committed every ``commit_pages``. One writer at a time per workspace:
    waits ``lock_timeout`` seconds for another, then raises LockTimeoutError before doing any work.
    """
    from ..pipeline import read_workspace
    from ..retrieval.index import PageIndex

    for name, value in (("workers", workers), ("batch_size", batch_size), ("segment_pages", segment_pages),
                        ("commit_pages", commit_pages), ("docs_per_round", docs_per_round)):
        check_positive_int(name, value)
    if not (isinstance(gpus_per_worker, (int, float)) and gpus_per_worker >= 0):
        raise ConfigError(f"gpus_per_worker must be a number >= 0, got {gpus_per_worker!r}")
    if not (isinstance(cpus_per_worker, (int, float)) and cpus_per_worker > 0):
        raise ConfigError(f"cpus_per_worker must be a number > 0, got {cpus_per_worker!r}")
    root = Path(workspace).resolve()
    root.mkdir(parents=True, exist_ok=True)
    saved = read_workspace(root)
    index_dir = root / "index"
    has_index = (index_dir / "manifest.json").exists()
    embedder_path = _embedder_of(root, saved, embedder, has_index)
    reranker = os.fspath(reranker) if reranker is not None else saved.get("reranker")
    if reranker is not None and Path(reranker).exists():
        reranker = str(Path(reranker).resolve())  # workers may run in another directory
    if load_reranker is None:
        cfg = None if config is None else config.to_dict()
        if cfg is not None and gpus_per_worker > 0 and cfg.get("device") == "cpu":
            cfg["device"] = "cuda"  # a GPU actor sees its own device as cuda:0
        load_reranker = partial(load_mini_reranker, reranker, cfg, cache_dir or str(root / "cache"))
    report = RayIndexReport()
    files = [p.resolve() for p in _expand(list(docs), True, report)]  # missing paths become report.errors

    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=show_progress)
    try:
        needed = 2 * workers * cpus_per_worker + _WRITER_CPUS
        have = _cluster_cpus()
        if have < needed:
            raise ConfigError(f"--workers {workers} with {cpus_per_worker:g} CPUs each needs {needed:g} CPUs of the Ray "
                              f"cluster (two model stages and a writer); it has {have:g}: use fewer workers or "
                              "--cpus-per-worker below 1")
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = show_progress
        ctx.execution_options.preserve_order = False
        with writer_lock(root, timeout=lock_timeout):
            index = PageIndex.open(index_dir) if has_index else PageIndex.create(index_dir)
            shutil.rmtree(root / STAGING, ignore_errors=True)  # a killed job's segments: we hold the lock
            job = secrets.token_hex(4)
            staging = root / STAGING / job
            staging.mkdir(parents=True)
            try:
                for start in range(0, len(files), docs_per_round):
                    _round(files[start : start + docs_per_round], start, index, root, staging, job, report,
                           load_reranker=load_reranker, embedder=embedder_path, workers=workers,
                           gpus=gpus_per_worker, cpus=cpus_per_worker, batch_size=batch_size,
                           segment_pages=segment_pages, commit_pages=commit_pages, dpi=dpi,
                           show_progress=show_progress, reranker_ref=reranker)
                if report.commits:
                    index.tidy()  # many small segments cost a FAISS search each: merge as add() does
            finally:
                shutil.rmtree(root / STAGING, ignore_errors=True)
            report.pages_total = len(index)
    finally:
        if started:
            ray.shutdown()
    return report


def _round(files: list[Path], offset: int, index: Any, root: Path, staging: Path, job: str, report: RayIndexReport,
           *, load_reranker: Callable[[], Any], embedder: str, workers: int, gpus: float, cpus: float, batch_size: int,
           segment_pages: int, commit_pages: int, dpi: float, show_progress: bool, reranker_ref: str | None) -> None:
    import ray
    from tqdm.auto import tqdm

    known = index.content_hashes()
    rendered = (ray.data.from_items([{"path": str(f), "order": offset + i} for i, f in enumerate(files)])
                .flat_map(render_document, fn_kwargs=dict(pages_dir=str(root / "pages"), dpi=dpi,
                                                          known_ref=ray.put(known)), num_cpus=0.5)
                .take_all())
    rendered.sort(key=lambda r: (r["order"], {"page": 0, "dup": 1, "error": 2}[r["kind"]], r["seq"]))
    seen = dict(known)
    new: list[dict[str, Any]] = []
    orphans: list[str] = []
    kept_paths: set[str] = set()
    for r in rendered:
        meta = json.loads(r["meta"])
        if r["kind"] == "error":
            report.errors.append(_error(meta))
        elif r["kind"] == "dup":  # within one document; the kept page may itself repeat an earlier document's
            report.duplicates.append(Duplicate(meta["source"], meta["page"], r["hash"], seen[r["hash"]]))
        elif r["hash"] in seen:  # the same content in an earlier document: skipped, as ingest() skips it
            report.duplicates.append(Duplicate(meta["source"], meta.get("page"), r["hash"], seen[r["hash"]]))
            if meta.get("image_path") and meta.get("page") is not None:
                orphans.append(meta["image_path"])  # its PNG was rendered before the duplicate was known
        else:
            seen[r["hash"]] = r["id"]
            new.append(r)
            kept_paths.add(r["source"])
    for path in orphans:
        if path not in kept_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
    clash = [r["id"] for r in new if r["id"] in index]
    if clash:  # same id, other content (same content was dropped above): refuse before any work
        raise DuplicatePageIdError(f"page ids already indexed with other content: {clash[:5]}")
    if not new:
        return
    order = {r["id"]: i for i, r in enumerate(new)}
    ds = (ray.data.from_items([{k: r[k] for k in ("id", "hash", "meta", "source")} for r in new])
          .map_batches(EmbedStage, fn_constructor_args=(load_reranker, embedder, batch_size, cpus),
                       batch_size=batch_size, concurrency=workers, num_cpus=cpus, num_gpus=gpus, batch_format="numpy")
          .map_batches(PrefillStage, fn_constructor_args=(load_reranker, cpus), batch_size=batch_size,
                       concurrency=workers, num_cpus=cpus, num_gpus=gpus, batch_format="numpy")
          .map_batches(write_segment, fn_kwargs=dict(staging=str(staging), ann=index.ann_config.to_dict(), job=job),
                       batch_size=segment_pages, num_cpus=_WRITER_CPUS, batch_format="numpy"))
    report.pages_embedded += len(new)
    bar = tqdm(total=len(new), desc="index pages (ray)", unit="page", disable=not show_progress)
    pending: list[str] = []
    pending_ids: list[str] = []

    def commit() -> None:
        if not pending:
            return
        index.adopt([staging / name for name in pending], tidy=False)  # merged once at the end
        if report.commits == 0:
            _record_workspace(root, embedder, reranker_ref)  # with the first commit, as the pipeline does
        report.commits += 1
        for page_id in sorted(pending_ids, key=order.__getitem__):
            report.pages_added.append(page_id)
            src = json.loads(new[order[page_id]]["meta"]).get("source") or new[order[page_id]]["source"] or page_id
            report.documents[src] = report.documents.get(src, 0) + 1
        bar.update(len(pending_ids))
        pending.clear()
        pending_ids.clear()

    for row in ds.iter_rows():
        pending.append(str(row["segment"]))
        pending_ids.extend(json.loads(row["ids"]))
        if len(pending_ids) >= commit_pages:
            commit()
    commit()
    bar.close()


def index_command(args: Any, load_reranker: Callable[[Any], Any]) -> tuple[dict[str, Any], str, bool]:
    """``minirerank index ... --ray``: the job for the CLI's arguments; returns (JSON payload, table, success) in the
    shape the single-process command prints."""
    import time

    from ..pipeline import read_workspace

    t0 = time.perf_counter()
    root = Path(args.index).resolve()
    saved = read_workspace(root)
    if args.model is None and saved.get("reranker"):
        args.model = saved["reranker"]
    if args.cache_dir is None:
        args.cache_dir = str(root / "cache")
    before = 0
    if (root / "index" / "manifest.json").exists():
        from ..retrieval.index import PageIndex

        before = len(PageIndex.open(root / "index"))
    report = index_with_ray(
        list(args.docs), root, reranker=args.model, embedder=args.embedder, load_reranker=partial(load_reranker, args),
        address=args.ray_address, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, lock_timeout=args.lock_timeout, show_progress=not args.quiet,
    )
    elapsed = time.perf_counter() - t0
    payload = {
        "index": str(root), "pages_added": len(report.pages_added), "pages_total": report.pages_total,
        "pages_before": before, "duplicates_skipped": len(report.duplicates),
        "errors": [{"source": e.source, "page": e.page, "error": str(e)} for e in report.errors],
        "documents": [{"source": k, "pages": v} for k, v in report.documents.items()], "seconds": round(elapsed, 3),
        "ray": {"address": args.ray_address, "workers": args.workers, "gpus_per_worker": args.gpus_per_worker,
                "commits": report.commits, "pages_embedded": report.pages_embedded},
    }
    lines = [f"{k}  {v}" for k, v in report.documents.items()] or ["no new pages"]
    human = "\n".join(lines) + (
        f"\n\nindexed {len(report.pages_added)} new pages on Ray ({len(report.duplicates)} duplicates skipped, "
        f"{len(report.errors)} errors, {report.commits} commits) in {elapsed:.1f}s; {report.pages_total} pages in {root}"
    )
    for e in report.errors:
        human += f"\n  error: {e}"
    return payload, human, bool(report.pages_added) or not report.errors


__all__ = ["RayIndexReport", "index_command", "index_with_ray", "load_mini_reranker"]
