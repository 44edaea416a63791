"""Calibrate a checkpoint used as it is: how far it can be made mini before it departs from its own dense ranking.

    cal = calibrate(reranker, pages, queries, first_stage=first_stage)   # or queries_from_pdfs(...)
    print(cal.table()); cal.save("calibrated.json")                       # MiniReranker.from_pretrained(..., settings=...)

Every setting keeps exact query positions (the checkpoint was not trained for shared ones) and sweeps the exit
layer, the interaction band and the query-time keep ratio. The reference is the checkpoint's own dense ranking: the
exact configuration, which equals a plain transformers forward (the engine's first invariant, tested in
tests/engine/test_equivalence.py), so it is computed through the cache instead of one forward per pair. Agreement
with it is nDCG@5 (graded gains 5..1 for the reference's top 5) and top-1; time is the online rerank per query with
the page caches filled beforehand, against a plain dense forward per (query, page) pair measured on a sample.
The chosen setting is the fastest one whose mean nDCG@5 agreement reaches the target (default 0.97).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cache import MemoryStore
from .candidates import Candidate
from .engine.config import RerankConfig
from .engine.settings import write_settings
from .errors import ConfigError, InvalidQueryError
from .pages import Page
from .validation import check_positive_int, check_query, check_ratio

DEFAULT_KEEPS = (1.0, 0.5, 0.25)


@dataclass(frozen=True)
class CalibrationQuery:
    """A query, and the page it was drawn from when it came from a document's text layer."""

    query: str
    page_id: str | None = None


@dataclass(frozen=True)
class Setting:
    exit_layer: int
    band: tuple[int, int]
    keep_ratio: float = 1.0

    def label(self) -> str:
        return f"exit {self.exit_layer}, band [{self.band[0]}, {self.band[1]}), keep {self.keep_ratio:g}"


@dataclass
class SettingResult:
    setting: Setting
    seconds_per_query: float
    time_vs_dense: float
    ndcg5: float
    top1: float
    exact: bool = False


@dataclass
class Calibration:
    """The sweep's rows, the chosen setting (the fastest within ``target`` agreement) and what they were run on."""

    rows: list[SettingResult]
    chosen: SettingResult
    target: float
    dense_seconds_per_query: float
    n_queries: int
    n_candidates: float
    base_config: RerankConfig
    template: Any = field(repr=False, default=None)

    def config(self) -> RerankConfig:
        s = self.chosen.setting
        return self.base_config.replace(exit_layer=s.exit_layer, band=tuple(s.band), keep_ratio=s.keep_ratio,
                                        query_positions="exact")

    def save(self, path: str | Path) -> Path:
        """A settings file (``minirerank-config/1``) that ``MiniReranker.from_pretrained(..., settings=path)`` and the
        CLI's ``--settings`` accept. ``path`` is a file, or a directory to write ``minirerank_config.json`` in."""
        path = Path(path)
        directory, name = (path, None) if path.is_dir() else (path.parent, path.name)
        directory.mkdir(parents=True, exist_ok=True)
        return write_settings(directory, self.config(), self.template, name=name,
                              calibration={"target_ndcg5": self.target, **self.summary()})

    def summary(self) -> dict[str, Any]:
        c = self.chosen
        return {"chosen": asdict(c.setting), "ndcg5": round(c.ndcg5, 4), "top1": round(c.top1, 4),
                "seconds_per_query": round(c.seconds_per_query, 5), "time_vs_dense": round(c.time_vs_dense, 5),
                "dense_seconds_per_query": round(self.dense_seconds_per_query, 4), "n_queries": self.n_queries,
                "candidates_per_query": round(self.n_candidates, 2)}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "target_ndcg5": self.target,
                "rows": [{**asdict(r.setting), "seconds_per_query": round(r.seconds_per_query, 5),
                          "time_vs_dense": round(r.time_vs_dense, 5), "ndcg5": round(r.ndcg5, 4),
                          "top1": round(r.top1, 4)} for r in self.rows]}

    def table(self) -> str:
        head = f"{'setting':38s} {'s/query':>9s} {'x dense':>9s} {'nDCG@5':>7s} {'top-1':>6s}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            mark = "  <- chosen" if r is self.chosen else ("  (exact)" if r.exact else "")
            lines.append(f"{r.setting.label():38s} {r.seconds_per_query:9.4f} {r.time_vs_dense:9.4f} "
                         f"{r.ndcg5:7.4f} {r.top1:6.3f}{mark}")
        lines.append(f"dense (plain forward per pair): {self.dense_seconds_per_query:.4f} s/query; agreement target "
                     f"nDCG@5 >= {self.target:g}; {self.n_queries} queries, {self.n_candidates:g} candidates each")
        return "\n".join(lines)


# --- the grid -----------------------------------------------------------------------------------------------------
def default_grid(num_layers: int, keeps: Sequence[float] = DEFAULT_KEEPS) -> list[Setting]:
    """Exit at the last layer, 3/4 and 1/2 of the way; for each, the band of every layer before the exit and
    narrower bands of about a quarter of the model, placed early, middle and late."""
    L = num_layers
    exits = sorted({L, max(2, round(0.75 * L)), max(2, round(0.5 * L))}, reverse=True)
    width = max(1, round(L / 4))
    out: list[Setting] = []
    for e in exits:
        bands = {(0, e)}
        for start in (max(0, round(0.25 * e) - width // 2), max(0, round(0.5 * e) - width // 2), max(0, e - width)):
            bands.add((start, min(e, start + width)))
        for band in sorted(bands, key=lambda b: (b[1] - b[0], b)):
            out += [Setting(e, band, float(k)) for k in keeps]
    return list(dict.fromkeys(out))


# --- queries from the text layer ------------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'\-]{2,}")
_STOP = set("the and for with that this from are was were have has had not but can all any its into their there "
            "which will would should could been being than then them they these those such our your you his her "
            "who whom what when where why how also may more most other some very each per via use used using".split())


def text_layer(path: str | Path) -> list[str]:
    """The text of each page of a PDF (pypdfium2's text layer; empty strings for scanned pages)."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(str(path))
    try:
        out = []
        for i in range(len(pdf)):
            page = pdf[i]
            try:
                tp = page.get_textpage()
                out.append(tp.get_text_range())
                tp.close()
            finally:
                page.close()
        return out
    finally:
        pdf.close()


def queries_from_text(pages: Sequence[tuple[str, str]], *, per_page: int = 2, max_queries: int | None = None
                      ) -> list[CalibrationQuery]:
    """Queries drawn from (page id, text) pairs, each tied to its page: a heading-like line (a short line of
    words, no sentence end) and distinctive phrases (the run of words rarest across the pages)."""
    per_page = check_positive_int("per_page", per_page)
    words = {pid: [w.lower() for w in _WORD.findall(text)] for pid, text in pages}
    df = Counter(w for ws in words.values() for w in set(ws))
    n = max(1, len(pages))
    idf = {w: math.log((n + 1) / (c + 0.5)) for w, c in df.items()}
    out: list[CalibrationQuery] = []
    for pid, text in pages:
        found: list[str] = []
        for line in (ln.strip() for ln in text.splitlines()):
            toks = _WORD.findall(line)
            if 2 <= len(toks) <= 10 and len(toks) >= 0.6 * len(line.split()) and not line.endswith((".", ",", ";")):
                found.append(" ".join(toks))
                break
        ws = [w for w in words[pid] if w not in _STOP]
        best: list[tuple[float, str]] = []
        for i in range(max(0, len(ws) - 3)):
            window = ws[i : i + 4]
            best.append((sum(idf.get(w, 0.0) for w in window) / len(window), " ".join(window)))
        for _, phrase in sorted(best, reverse=True):
            if len(found) >= per_page:
                break
            if phrase not in found and all(len(set(phrase.split()) & set(f.lower().split())) < 3 for f in found):
                found.append(phrase)
        out += [CalibrationQuery(q, pid) for q in found[:per_page]]
    return out[:max_queries] if max_queries else out


def queries_from_pdfs(paths: Iterable[str | Path], pages: Sequence[Page], **kwargs: Any) -> list[CalibrationQuery]:
    """Queries from the text layer of the PDFs that ``pages`` were ingested from (``pages/ingest.py`` records each
    page's source file and number); pages without text (scans, images) give none."""
    texts: dict[str, list[str]] = {}
    pairs = []
    for page in pages:
        source, number = page.metadata.get("source"), page.metadata.get("page")
        if not source or not number or not str(source).lower().endswith(".pdf"):
            continue
        if source not in texts:
            texts[source] = text_layer(source)
        text = texts[source][number - 1] if number - 1 < len(texts[source]) else ""
        if text.strip():
            pairs.append((page.id, text))
    del paths  # the pages name their files; kept for a call that reads like the CLI
    return queries_from_text(pairs, **kwargs)


def read_queries(path: str | Path) -> list[CalibrationQuery]:
    """Queries from a file: JSON (a list of strings or of {"query", "page"} objects, or {"queries": [...]}),
    JSON lines, or plain text with one query per line."""
    text = Path(path).read_text(encoding="utf-8")
    items: list[Any]
    try:
        doc = json.loads(text)
        items = doc["queries"] if isinstance(doc, dict) else doc
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            items = [line.strip() for line in text.splitlines() if line.strip()]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(CalibrationQuery(check_query(item)))
        elif isinstance(item, dict) and "query" in item:
            out.append(CalibrationQuery(check_query(item["query"]), item.get("page") or item.get("page_id")))
        else:
            raise InvalidQueryError(f"{path}: a query must be a string or {{'query': ...}}, got {item!r}")
    if not out:
        raise InvalidQueryError(f"{path}: no queries")
    return out


# --- the sweep ------------------------------------------------------------------------------------------------------
def _ndcg5(ranking: Sequence[str], reference: Sequence[str]) -> float:
    gains = {pid: 5 - i for i, pid in enumerate(reference[:5])}
    dcg = sum(gains.get(pid, 0) / math.log2(i + 2) for i, pid in enumerate(ranking[:5]))
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(gains.values(), reverse=True)))
    return dcg / ideal if ideal else 1.0


def calibrate(
    reranker: Any,
    pages: Sequence[Page],
    queries: Sequence[CalibrationQuery | str],
    *,
    first_stage: Any = None,
    k: int = 20,
    grid: Sequence[Setting] | None = None,
    target: float = 0.97,
    dense_sample: int = 3,
    show_progress: bool = False,
    memory_cache_bytes: int = 4 * 1024**3,
) -> Calibration:
    """Sweep ``grid`` (default: :func:`default_grid`, keep ratios below 1 only with a ``first_stage`` to give the
    maps) for ``reranker``'s checkpoint on ``pages`` and ``queries``; see the module docstring. ``first_stage``
    (a FirstStage) picks each query's top ``k`` candidates and their maps; without it every page (at most ``k``) is
    a candidate. ``dense_sample``: queries whose plain dense forwards are timed. ``memory_cache_bytes`` bounds the
    page cache the sweep shares (least recently used pages are recomputed past it)."""
    from .rerankers import MiniReranker

    target = check_ratio("target", target)
    k = check_positive_int("k", k)
    queries = [q if isinstance(q, CalibrationQuery) else CalibrationQuery(check_query(q)) for q in queries]
    if not queries:
        raise InvalidQueryError("calibrate needs at least one query")
    if not pages:
        raise ConfigError("calibrate needs at least one page")
    model, processor, template = reranker.model, reranker.processor, reranker.template
    head = getattr(reranker, "head", None)  # a published score head (jina-reranker-m0) stays the scorer
    base_config = reranker.config.replace(exit_layer=None, band=None, keep_ratio=1.0, index_keep_ratio=1.0,
                                          query_positions="exact", shared_offset=None)
    num_layers = reranker.adapter.num_layers
    keeps = DEFAULT_KEEPS if first_stage is not None else (1.0,)
    grid = list(grid) if grid is not None else default_grid(num_layers, keeps)
    if first_stage is not None:
        first_stage.add([p for p in pages if p.id not in first_stage.index])
    # One page cache for the whole sweep: its keys carry the band, so settings that share a band (they differ in
    # exit layer or keep ratio) prefill each page once instead of once per setting.
    store = MemoryStore(memory_cache_bytes)
    exact = MiniReranker(model, processor, base_config, template=template, head=head, cache_dir=store)

    def candidates(q: CalibrationQuery) -> list[Candidate]:
        if first_stage is not None:
            return first_stage.candidates(q.query, k, exact)
        return [Candidate(p) for p in pages[:k]]

    cands = {q.query: candidates(q) for q in queries}
    all_pages = list({c.page_id: c.page for cs in cands.values() for c in cs}.values())
    exact.index(all_pages, show_progress=show_progress)
    reference = {q: [r.page_id for r in exact.rerank(q, cs)] for q, cs in cands.items()}

    # dense: one plain forward per (query, page) pair, on a sample of queries
    t = time.perf_counter()
    n_pairs = 0
    for q in queries[:dense_sample]:
        cs = cands[q.query]
        exact.dense_scores(q.query, [c.page for c in cs])
        n_pairs += len(cs)
    per_pair = (time.perf_counter() - t) / max(1, n_pairs)
    n_cand = sum(len(cs) for cs in cands.values()) / len(cands)
    dense_per_query = per_pair * n_cand

    rows: list[SettingResult] = []
    for setting in grid:
        cfg = base_config.replace(exit_layer=setting.exit_layer, band=tuple(setting.band), keep_ratio=setting.keep_ratio)
        r = MiniReranker(model, processor, cfg, template=template, head=head, cache_dir=store)
        r.index(all_pages, show_progress=show_progress)  # offline part: not timed
        t = time.perf_counter()
        rankings = {q: [x.page_id for x in r.rerank(q, cs)] for q, cs in cands.items()}
        secs = (time.perf_counter() - t) / len(cands)
        ndcg = sum(_ndcg5(rankings[q], reference[q]) for q in cands) / len(cands)
        top1 = sum(rankings[q][0] == reference[q][0] for q in cands) / len(cands)
        exact_row = setting.exit_layer == num_layers and tuple(setting.band) == (0, num_layers) and setting.keep_ratio >= 1
        rows.append(SettingResult(setting, secs, secs / dense_per_query if dense_per_query else math.nan, ndcg, top1,
                                  exact=exact_row))
    ok = [r for r in rows if r.ndcg5 >= target - 1e-9] or [r for r in rows if r.exact]
    if not ok:  # the grid had no exact row: measure it, it always agrees with itself
        rows.append(SettingResult(Setting(num_layers, (0, num_layers)), math.nan, math.nan, 1.0, 1.0, exact=True))
        ok = rows[-1:]
    chosen = min(ok, key=lambda r: (r.seconds_per_query if not math.isnan(r.seconds_per_query) else math.inf))
    return Calibration(rows, chosen, target, dense_per_query, len(queries), n_cand, base_config, template)


__all__ = ["Calibration", "CalibrationQuery", "Setting", "SettingResult", "calibrate", "default_grid", "queries_from_pdfs",
           "queries_from_text", "read_queries", "text_layer"]
