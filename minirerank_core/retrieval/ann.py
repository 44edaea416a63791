"""FAISS indexes over patch vectors: which kind to build, how to build it, how to search it.

The ANN structures here only *generate candidates* (the nearest stored vectors of each query token); the
page ranking itself is always exact MaxSim over the candidates' stored vectors (float32, or float16 with
``AnnConfig.vector_dtype``). So an approximate structure (HNSW graph, IVF lists, PQ codes, OPQ rotation) costs
recall of candidates, never score accuracy; ``SearchParams.rescore`` trades a little recall for reading fewer
candidates' vectors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import faiss
import numpy as np

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")
QUANTIZERS = ("auto", "flat", "hnsw")
VECTOR_DTYPES = ("float32", "float16")

# Training an IVF coarse quantizer wants ~39+ points per list, 4-bit PQ's 16-centroid codebooks 39 * 16.
_MIN_POINTS_PER_LIST = 39
_PQ_MIN_TRAIN = 39 * 16
# From this many IVF lists on, "auto" assigns vectors to lists through an HNSW graph over the centroids instead of
# comparing each with every centroid. Measured on the project's AVX2 CPU (one thread, IVF-PQ FastScan, D=128): the
# flat (BLAS) assignment costs 7 / 36 / 142 us per added vector at 1k / 8k / 32k lists, the HNSW graph 52 us at
# 8k and 110 us at 32k lists: the graph only pays off from ~32k lists (a billion vectors at nlist = sqrt(n)).
HNSW_QUANTIZER_MIN_LISTS = 32768


@dataclass(frozen=True)
class AnnConfig:
    """How segments of the index are built.

    index_type: "flat" = no ANN, exhaustive exact MaxSim; "hnsw" = HNSW graph over float vectors; "ivf" =
        inverted lists of float vectors; "ivfpq" = inverted lists of 4-bit product-quantised codes scanned
        with FAISS's SIMD "fast scan" (IndexIVFPQFastScan: ~5x faster per probed list than 8-bit PQ, which
        buys more probes -- coarse probing, not PQ precision, is what limits candidate recall);
        "auto" = flat below ``flat_max_vectors`` vectors in a segment, else ``auto_ann``.
    flat_max_vectors: below this many vectors an exhaustive MaxSim pass is cheap (~10 ms) and exact.
    auto_ann: the ANN kind "auto" picks for large segments (see benchmarks/retrieval.py for the trade-off).
    hnsw_m, ef_construction: HNSW graph degree and build-time beam.
    nlist: IVF lists (None: ~sqrt(n_vectors), clamped to what the data can train). Build cost grows with
        nlist (every vector is compared with every list centroid), search cost with nprobe / nlist.
    pq_m: PQ sub-quantizers of 4 bits (None: dim // 2, i.e. 32 bytes per vector at D=128).
    train_size: vectors sampled to train IVF / PQ (None: 40 per list, at least 65,536, at most 262,144).
    seed: sampling seed, so a rebuild of the same data gives the same index.
    opq: rotate vectors with a trained OPQ matrix before IVF-PQ ("ivfpq" only): PQ codes lose less, which helps
        when dimensions are correlated (real embeddings), not on isotropic random vectors.
    quantizer: how vectors are assigned to IVF lists: "flat" (exact), "hnsw" (a graph over the centroids, much
        faster to add to at very many lists), "auto" = hnsw from ``HNSW_QUANTIZER_MIN_LISTS`` lists on.
    vector_dtype: how the full-precision vectors used for exact MaxSim are stored: "float32" or "float16" (half
        the disk and page cache; scores move by ~1e-3 relative, see benchmarks/retrieval.py).
    """

    index_type: str = "auto"
    flat_max_vectors: int = 200_000
    auto_ann: str = "ivfpq"
    hnsw_m: int = 32
    ef_construction: int = 64
    nlist: int | None = None
    pq_m: int | None = None
    train_size: int | None = None
    seed: int = 0
    opq: bool = False
    quantizer: str = "auto"
    vector_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        if self.auto_ann not in ("hnsw", "ivf", "ivfpq"):
            raise ValueError(f"auto_ann must be 'hnsw', 'ivf' or 'ivfpq', got {self.auto_ann!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.vector_dtype not in VECTOR_DTYPES:
            raise ValueError(f"vector_dtype must be one of {VECTOR_DTYPES}, got {self.vector_dtype!r}")
        for name in ("flat_max_vectors", "hnsw_m", "ef_construction"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnnConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class SearchParams:
    """Query-time knobs.

    k_prime: nearest stored vectors fetched per query token; their pages are the candidates that get exact
        MaxSim. None: max(32, k).
    ef_search: HNSW search beam (raised to k_prime when lower).
    nprobe: IVF lists visited per query token.
    rescore: pages re-scored with exact MaxSim. None: every candidate. A number: the candidates are first ranked
        by an approximate MaxSim read off the ANN results (per query token, the best similarity FAISS returned
        for a vector of the page, else the token's k_prime-th similarity: no closer vector was found), and only
        the best ``max(rescore, k)`` are re-scored -- at ~1,000 vectors per page, reading and scoring the
        candidates' full vectors is most of a query's time.
    """

    k_prime: int | None = None
    ef_search: int = 128
    nprobe: int = 64
    rescore: int | None = None

    def __post_init__(self) -> None:
        if self.k_prime is not None and int(self.k_prime) < 1:
            raise ValueError(f"k_prime must be positive, got {self.k_prime!r}")
        if self.rescore is not None and int(self.rescore) < 1:
            raise ValueError(f"rescore must be positive or None, got {self.rescore!r}")
        if int(self.ef_search) < 1 or int(self.nprobe) < 1:
            raise ValueError("ef_search and nprobe must be positive")

    def override(self, **changes: Any) -> SearchParams:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def k_prime_for(self, k: int) -> int:
        return int(self.k_prime) if self.k_prime is not None else max(32, k)


def resolve_type(config: AnnConfig, n_vectors: int) -> str:
    """The concrete kind of index a segment of ``n_vectors`` vectors gets under ``config``."""
    kind = config.index_type
    if kind == "auto":
        kind = "flat" if n_vectors < config.flat_max_vectors else config.auto_ann
    # Too few vectors to train quantizers: exact search is both better and cheaper there.
    if kind == "ivf" and n_vectors < 4 * _MIN_POINTS_PER_LIST:
        return "flat"
    if kind == "ivfpq" and n_vectors < _PQ_MIN_TRAIN:
        return "flat"
    return kind


def _nlist(config: AnnConfig, n_vectors: int) -> int:
    want = config.nlist or int(round(math.sqrt(n_vectors)))
    return max(1, min(want, n_vectors // _MIN_POINTS_PER_LIST, 65536))


def _pq_m(config: AnnConfig, dim: int) -> int:
    m = config.pq_m or max(1, dim // 2)
    while dim % m:  # PQ needs dim divisible by the number of sub-quantizers
        m -= 1
    return m


def _training_sample(vectors: np.ndarray, config: AnnConfig, need: int) -> np.ndarray:
    size = min(len(vectors), config.train_size or min(max(need, 65536), 262_144))
    if size >= len(vectors):
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.choice(len(vectors), size=size, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def _uses_hnsw_quantizer(config: AnnConfig, nlist: int) -> bool:
    return config.quantizer == "hnsw" or (config.quantizer == "auto" and nlist >= HNSW_QUANTIZER_MIN_LISTS)


def build(kind: str, vectors: np.ndarray, config: AnnConfig) -> faiss.Index | None:
    """A FAISS inner-product index of ``kind`` holding ``vectors`` (row i gets id i); None for "flat".
    ``vectors`` may be a float16 or memory-mapped array: it is converted block by block."""
    if kind == "flat":
        return None
    n, dim = vectors.shape
    keep: list = []  # SWIG objects that must outlive training
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
    elif kind in ("ivf", "ivfpq"):
        nlist = _nlist(config, n)
        if _uses_hnsw_quantizer(config, nlist):
            quantizer = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efConstruction = 40
        else:
            quantizer = faiss.IndexFlatIP(dim)
        m = _pq_m(config, dim)
        if kind == "ivf":
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            ivf = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
        if isinstance(quantizer, faiss.IndexHNSW):
            # k-means assigns with an exact flat index; only the final centroids go into the graph
            keep.append(faiss.IndexFlatIP(dim))
            ivf.clustering_index = keep[-1]
        need = (_MIN_POINTS_PER_LIST + 1) * nlist
        ivf.cp.seed = config.seed
        ivf.cp.niter = 10  # candidates are re-scored exactly: coarse k-means need not converge fully
        if kind == "ivfpq":
            ivf.pq.cp.niter = 10
        index = ivf
        if kind == "ivfpq" and config.opq:
            opq = faiss.OPQMatrix(dim, m)
            keep.append(faiss.ProductQuantizer(dim, m, 4))  # train the rotation for the 4-bit codes it serves
            opq.pq = keep[-1]
            opq.niter = opq.niter_pq_0 = 10  # as k-means above: the ranking is exact, the rotation need not converge
            index = faiss.IndexPreTransform(opq, ivf)
        index.train(_training_sample(vectors, config, need))
        ivf.clustering_index = None
        if isinstance(index, faiss.IndexPreTransform):
            opq.pq = None
            # The outer objects must own what they wrap, or it dies with this Python frame.
            index.own_fields = True
            opq.this.disown()
            ivf.this.disown()
        ivf.own_fields = True
        quantizer.this.disown()
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    # Add in blocks so FAISS never needs a second full float32 copy of a memmapped array.
    block = 1 << 18
    for start in range(0, n, block):
        index.add(np.ascontiguousarray(vectors[start : start + block], dtype=np.float32))
    return index


def search_params(index: faiss.Index, params: SearchParams, k_prime: int) -> faiss.SearchParameters | None:
    """Per-call FAISS parameters (thread-safe: nothing is set on the shared index object)."""
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=max(int(params.ef_search), k_prime))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    nprobe = min(int(params.nprobe), ivf.nlist)
    out = faiss.SearchParametersIVF(nprobe=nprobe)
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        # the graph over the centroids must return nprobe lists: its beam is at least that wide
        out._quantizer_params = faiss.SearchParametersHNSW(efSearch=max(2 * nprobe, 64))
        out.quantizer_params = out._quantizer_params
    if isinstance(index, faiss.IndexPreTransform):  # OPQ rotation in front of the IVF
        outer = faiss.SearchParametersPreTransform(index_params=out)
        outer._index_params = out  # keep the inner parameters alive as long as the outer ones
        return outer
    return out


def nearest(index: faiss.Index, query: np.ndarray, k_prime: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids): the ``k_prime`` nearest stored vectors of each query row, each (Tq, k_prime), best
    first; ids are row numbers, -1 where FAISS found fewer."""
    k_prime = min(k_prime, index.ntotal)
    sims, ids = index.search(query, k_prime, params=search_params(index, params, k_prime))
    return sims, ids
