"""FAISS indexes over patch vectors: which kind to build, how to build it, how to search it.

The ANN structures here only *generate candidates* (the nearest stored vectors of each query token); the
page ranking itself is always exact MaxSim over the candidates' stored float32 vectors. So an approximate
structure (HNSW graph, IVF lists, PQ codes) costs recall of candidates, never score accuracy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import faiss
import numpy as np

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq")

# Training an IVF coarse quantizer wants ~39+ points per list, 4-bit PQ's 16-centroid codebooks 39 * 16.
_MIN_POINTS_PER_LIST = 39
_PQ_MIN_TRAIN = 39 * 16


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

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        if self.auto_ann not in ("hnsw", "ivf", "ivfpq"):
            raise ValueError(f"auto_ann must be 'hnsw', 'ivf' or 'ivfpq', got {self.auto_ann!r}")
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
    """

    k_prime: int | None = None
    ef_search: int = 128
    nprobe: int = 64

    def __post_init__(self) -> None:
        if self.k_prime is not None and int(self.k_prime) < 1:
            raise ValueError(f"k_prime must be positive, got {self.k_prime!r}")
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


def build(kind: str, vectors: np.ndarray, config: AnnConfig) -> faiss.Index | None:
    """A FAISS inner-product index of ``kind`` holding ``vectors`` (row i gets id i); None for "flat"."""
    if kind == "flat":
        return None
    n, dim = vectors.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
    elif kind in ("ivf", "ivfpq"):
        nlist = _nlist(config, n)
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, _pq_m(config, dim), 4, faiss.METRIC_INNER_PRODUCT)
        need = (_MIN_POINTS_PER_LIST + 1) * nlist
        index.cp.seed = config.seed
        index.cp.niter = 10  # candidates are re-scored exactly: coarse k-means need not converge fully
        if kind == "ivfpq":
            index.pq.cp.niter = 10
        index.train(_training_sample(vectors, config, need))
        # The IVF object must own its quantizer, or the quantizer dies with this Python frame.
        index.own_fields = True
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
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=min(int(params.nprobe), index.nlist))
    return None


def nearest(index: faiss.Index, query: np.ndarray, k_prime: int, params: SearchParams) -> np.ndarray:
    """Ids (row numbers) of the ``k_prime`` nearest stored vectors of each query row, flattened, -1 dropped."""
    k_prime = min(k_prime, index.ntotal)
    _, ids = index.search(query, k_prime, params=search_params(index, params, k_prime))
    ids = ids.reshape(-1)
    return ids[ids >= 0]
