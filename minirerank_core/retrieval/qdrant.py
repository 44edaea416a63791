"""QdrantPageIndex: the page index in a Qdrant collection (multivector, MaxSim comparator), PageIndex's interface.

For collections that outgrow one machine's FAISS index, or whose ColPali vectors already live in Qdrant: a
FirstStage, a RerankPipeline and the LlamaIndex / LangChain retrievers run over it unchanged, pruning maps included
(the hits come back with their patch vectors).

    from qdrant_client import QdrantClient
    index = QdrantPageIndex.create(QdrantClient(url="http://localhost:6333"), "pages", dim=128)  # new collection
    index = QdrantPageIndex.open("http://localhost:6333", "my_colpali_pages", vector_name="original")  # existing
    index = QdrantPageIndex.create(":memory:", "pages")   # or a local path: qdrant-client's local mode (tests)

Collection layout (what :meth:`create` makes; what :meth:`open` expects of an existing collection):

* one point per page;
* a named multivector (``vector_name``) holding every vector of the page (N, D) -- all the rows the model's MaxSim
  uses, prompt tokens included -- with comparator MAX_SIM and distance DOT (or COSINE: the same for the
  L2-normalised vectors ColPali models emit); an unnamed multivector also works (``vector_name=None``);
* payload fields (names configurable with :class:`QdrantFields`):

  ``page_id``       str: the page's id (``QdrantFields(page_id=None)``: the point id, as a string, is the page id)
  ``grid``          [h, w]: the page's patch grid (needed for the pruning maps, not for search)
  ``patch_start``   int: the grid's cells are rows ``patch_start .. patch_start + h*w - 1``, row-major (ColQwen,
                    ColPali: the image tokens are one run) -- or, for any other layout (pooled pages),
  ``patch_rows``    [int]: the row of each grid cell, row-major
  ``content_hash``  str, optional: duplicate detection at ingest
  anything else     the page's metadata: e.g. ``image_path`` (or ``source`` + ``page`` + ``render``), which is how
                    a FirstStage in another process loads the page behind a hit.

Points this class writes get the id uuid5(page id). Scores are Qdrant's MaxSim: the sum over query tokens of the
best dot product, as :func:`~minirerank_core.retrieval.maxsim.maxsim_scores` (float differences aside). Qdrant
chooses the candidates with its own HNSW over the multivectors (``ef_search`` = ``hnsw_ef``), or with
``prefetch``: pooled multivectors named there narrow the candidates first (the layout of Qdrant's ColPali guide;
``prefetch_vectors`` then tells :meth:`add` how to make them for a new page).
``k_prime``, ``nprobe`` and ``rescore`` are FAISS knobs and are refused here (ConfigError).

An ``add`` writes in requests of at most ``upsert_batch_vectors`` vectors: Qdrant has no multi-request
transaction, so a failed add may have stored its first pages; re-running the same add is a no-op for those.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, IndexStateError
from ..fileio import canonical_json
from ..validation import check_positive_int
from .embedding import PageEmbedding
from .index import QueryLike, SearchHit, as_query_array, require_same_content

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "minirerank/page")
_LOOKUP_CHUNK = 256  # page ids per filter request


@dataclass(frozen=True)
class QdrantFields:
    """Payload field names the index reads and writes (see the module docstring). ``page_id=None``: page ids are
    the point ids (unsigned integers or UUIDs, as strings)."""

    page_id: str | None = "page_id"
    grid: str = "grid"
    patch_start: str = "patch_start"
    patch_rows: str = "patch_rows"
    content_hash: str = "content_hash"

    def reserved(self) -> set[str]:
        return {f for f in (self.page_id, self.grid, self.patch_start, self.patch_rows, self.content_hash) if f}


def point_id(page_id: str) -> str:
    """The Qdrant point id this class gives a page: uuid5 of its id (Qdrant ids are integers or UUIDs)."""
    return str(uuid.uuid5(_NAMESPACE, page_id))


class QdrantPageIndex:
    """A page index in a Qdrant collection; the interface of :class:`~minirerank_core.retrieval.PageIndex`
    (:class:`~minirerank_core.retrieval.index.PageIndexBackend`). Use :meth:`create` or :meth:`open`."""

    def __init__(
        self,
        client: Any,
        collection: str,
        *,
        vector_name: str | None = "colpali",
        fields: QdrantFields | None = None,
        prefetch: Sequence[str] = (),
        prefetch_limit: int = 200,
        prefetch_vectors: Callable[[PageEmbedding], Mapping[str, Any]] | None = None,
        upsert_batch_vectors: int = 8192,
        owns_client: bool = False,
    ) -> None:
        if not isinstance(collection, str) or not collection:
            raise ConfigError(f"collection must be a non-empty str, got {collection!r}")
        self.client = client
        self.collection = collection
        self.vector_name = vector_name
        self.fields = fields or QdrantFields()
        self.prefetch = tuple(prefetch)
        self.prefetch_limit = check_positive_int("prefetch_limit", prefetch_limit)
        # how add() makes a new page's prefetch vectors (the collection's own recipe, e.g. mean pooling): a page
        # without them would never be a prefetch candidate
        self.prefetch_vectors = prefetch_vectors
        # one request carries at most this many vectors (Qdrant refuses requests over 32 MB by default)
        self.upsert_batch_vectors = check_positive_int("upsert_batch_vectors", upsert_batch_vectors)
        self._owns_client = owns_client
        self._dim: int | None = None
        self._create_options: dict[str, Any] | None = None  # set by create(dim=None): made at the first add
        if client.collection_exists(collection):
            self._dim = self._check_collection()

    # --- lifecycle ------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        client: Any,
        collection: str,
        dim: int | None = None,
        *,
        vector_name: str = "colpali",
        distance: str = "dot",
        datatype: str = "float32",
        on_disk: bool = False,
        hnsw_m: int | None = None,
        **kwargs: Any,
    ) -> QdrantPageIndex:
        """A new collection (IndexStateError if it exists). ``client``: a QdrantClient, a URL, ``":memory:"`` or a
        local directory. ``dim`` None: the collection is made at the first add, with the pages' dim.
        ``datatype`` "float16" halves Qdrant's vector storage; ``on_disk`` keeps vectors memory-mapped;
        ``hnsw_m`` 0 disables Qdrant's HNSW on the multivector (full scans, or candidates from ``prefetch``)."""
        from qdrant_client import models

        client, owns = _as_client(client)
        if client.collection_exists(collection):
            raise IndexStateError(f"Qdrant collection {collection!r} already exists; use QdrantPageIndex.open")
        if distance not in ("dot", "cosine"):
            raise ConfigError(f"distance must be 'dot' or 'cosine' (MaxSim over inner products), got {distance!r}")
        if datatype not in ("float32", "float16"):
            raise ConfigError(f"datatype must be 'float32' or 'float16', got {datatype!r}")
        if hnsw_m is not None and (not isinstance(hnsw_m, int) or hnsw_m < 0):
            raise ConfigError(f"hnsw_m must be an int >= 0 (0: no HNSW), got {hnsw_m!r}")
        index = cls(client, collection, vector_name=vector_name, owns_client=owns, **kwargs)
        index._create_options = {
            "distance": models.Distance.DOT if distance == "dot" else models.Distance.COSINE,
            "datatype": models.Datatype.FLOAT16 if datatype == "float16" else models.Datatype.FLOAT32,
            "on_disk": on_disk,
            "hnsw_config": models.HnswConfigDiff(m=hnsw_m) if hnsw_m is not None else None,
        }
        if dim is not None:
            index._create_collection(check_positive_int("dim", dim))
        return index

    @classmethod
    def open(cls, client: Any, collection: str, *, vector_name: str | None = "", **kwargs: Any) -> QdrantPageIndex:
        """An existing collection. ``vector_name`` "" (default): the collection's one multivector, named or not;
        None: its unnamed vector; a name: that named vector. IndexStateError if the collection does not exist,
        ConfigError if the vector is not a MaxSim multivector over dot or cosine."""
        client, owns = _as_client(client)
        if not client.collection_exists(collection):
            raise IndexStateError(f"no Qdrant collection {collection!r}; create it with QdrantPageIndex.create")
        if vector_name == "":
            vector_name = _the_multivector(client, collection)
        return cls(client, collection, vector_name=vector_name, owns_client=owns, **kwargs)

    def close(self) -> None:
        """Close the client if this index made it (from a URL or a path)."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> QdrantPageIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def refresh(self) -> bool:
        """Nothing to re-read: every call asks the collection (kept for PageIndex's interface)."""
        return False

    def _create_collection(self, dim: int) -> None:
        from qdrant_client import models

        o = self._create_options or {}
        params = models.VectorParams(
            size=dim, distance=o.get("distance", models.Distance.DOT), datatype=o.get("datatype"),
            on_disk=o.get("on_disk"), hnsw_config=o.get("hnsw_config"),
            multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
        )
        self.client.create_collection(self.collection,
                                      vectors_config={self.vector_name: params} if self.vector_name else params)
        if self.fields.page_id is not None and not _is_local(self.client):  # local mode has no payload indexes
            self.client.create_payload_index(self.collection, self.fields.page_id, models.PayloadSchemaType.KEYWORD)
        self._dim, self._create_options = dim, None

    def _check_collection(self) -> int:
        from qdrant_client import models

        vectors = self.client.get_collection(self.collection).config.params.vectors
        if self.vector_name:
            if not isinstance(vectors, Mapping) or self.vector_name not in vectors:
                names = sorted(vectors) if isinstance(vectors, Mapping) else ["(unnamed)"]
                raise ConfigError(f"Qdrant collection {self.collection!r} has no vector named {self.vector_name!r} "
                                  f"(it has {names})")
            params = vectors[self.vector_name]
        else:
            if isinstance(vectors, Mapping):
                raise ConfigError(f"Qdrant collection {self.collection!r} has named vectors {sorted(vectors)}; "
                                  "pass vector_name")
            params = vectors
        mv = params.multivector_config
        if mv is None or mv.comparator != models.MultiVectorComparator.MAX_SIM:
            raise ConfigError(f"vector {self.vector_name!r} of {self.collection!r} is not a multivector with the "
                              "MAX_SIM comparator (late interaction needs one)")
        if params.distance not in (models.Distance.DOT, models.Distance.COSINE):
            raise ConfigError(f"vector {self.vector_name!r} of {self.collection!r} uses distance {params.distance}; "
                              "MaxSim over ColPali vectors needs Dot (or Cosine)")
        return int(params.size)

    # --- contents -------------------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def path(self) -> None:
        return None

    def _exists(self) -> bool:
        return self._dim is not None

    def __len__(self) -> int:
        return int(self.client.count(self.collection, exact=True).count) if self._exists() else 0

    def __contains__(self, page_id: object) -> bool:
        return isinstance(page_id, str) and page_id in self._find([page_id])

    def page_ids(self) -> list[str]:
        return [self._page_id(r) for r in self._scroll_all([self.fields.page_id] if self.fields.page_id else False)]

    def content_hashes(self) -> dict[str, str]:
        """content hash -> page id of every page that has a hash (for duplicate detection at ingest)."""
        f = self.fields
        out: dict[str, str] = {}
        for r in self._scroll_all([x for x in (f.page_id, f.content_hash) if x]):
            h = (r.payload or {}).get(f.content_hash)
            if h is not None:
                out.setdefault(h, self._page_id(r))
        return out

    def metadata(self, page_id: str) -> dict[str, Any]:
        return self._metadata(self._get(page_id, vectors=False).payload)

    def embedding(self, page_id: str) -> PageEmbedding:
        """The stored embedding of a page (vectors, patch rows, grid): what importance maps are made from."""
        return self._embedding(self._get(page_id, vectors=True))

    def stats(self) -> dict[str, Any]:
        return {"backend": "qdrant", "collection": self.collection, "vector_name": self.vector_name,
                "pages": len(self), "dim": self._dim}

    # --- changes --------------------------------------------------------------------------------------
    def add(
        self, pages: Iterable[PageEmbedding], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> list[str]:
        """Index ``pages``; returns the ids added. Same rules as :meth:`PageIndex.add`: ``metadata[i]`` is merged
        over ``pages[i].metadata``; an id already indexed (or repeated) is skipped with the same ``content_hash``
        and raises DuplicatePageIdError otherwise, before anything is written."""
        from qdrant_client import models

        pages = list(pages)
        if metadata is not None:
            metadata = list(metadata)
            if len(metadata) != len(pages):
                raise ValueError(f"metadata has {len(metadata)} entries for {len(pages)} pages")
        if self.prefetch and self.prefetch_vectors is None:
            raise ConfigError(f"this index finds candidates through {list(self.prefetch)}, which add() cannot "
                              "compute: pass prefetch_vectors (page embedding -> {name: vectors}), or add with the "
                              "code that built the collection")
        dim = self._dim
        for i, page in enumerate(pages):
            if not isinstance(page, PageEmbedding):
                raise TypeError(f"pages[{i}] is a {type(page).__name__}, not a PageEmbedding")
            dim = dim or page.dim
            if page.dim != dim:
                raise ValueError(f"page {page.page_id!r} has dim {page.dim}, the index has dim {dim}")
        existing = self._find([p.page_id for p in pages]) if self._exists() else {}
        seen: dict[str, str | None] = {}
        points = []
        for i, page in enumerate(pages):
            if page.page_id in seen or page.page_id in existing:
                in_call = page.page_id in seen
                require_same_content(page, in_call, seen[page.page_id] if in_call else
                                  (existing[page.page_id].payload or {}).get(self.fields.content_hash))
                continue
            meta = {**page.metadata, **dict((metadata[i] if metadata is not None else None) or {})}
            clash = self.fields.reserved() & set(meta)
            if clash:
                raise ValueError(f"metadata of page {page.page_id!r} uses the index's payload fields {sorted(clash)}")
            try:
                canonical_json(meta)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"metadata of page {page.page_id!r} is not JSON-serialisable ({exc})") from exc
            seen[page.page_id] = page.content_hash
            vectors = page.vectors.numpy().tolist()
            vector: Any = {self.vector_name: vectors} if self.vector_name else vectors
            if self.prefetch:
                extra = dict(self.prefetch_vectors(page))
                if set(extra) != set(self.prefetch):
                    raise ValueError(f"prefetch_vectors gave {sorted(extra)} for page {page.page_id!r}, the index "
                                     f"prefetches through {sorted(self.prefetch)}")
                vector.update({k: np.asarray(v, dtype=np.float32).tolist() for k, v in extra.items()})
            points.append((page.vectors.shape[0], models.PointStruct(
                id=self._new_point_id(page.page_id), vector=vector, payload={**meta, **self._layout_payload(page)},
            )))
        if not points:
            return []
        if self._dim is None:
            self._create_collection(dim)
        batch: list[Any] = []
        size = 0
        for n, point in points:
            if batch and size + n > self.upsert_batch_vectors:
                self.client.upsert(self.collection, batch, wait=True)
                batch, size = [], 0
            batch.append(point)
            size += n
        self.client.upsert(self.collection, batch, wait=True)
        return list(seen)

    def delete(self, page_ids: Iterable[str], *, missing_ok: bool = False) -> int:
        """Remove pages; returns how many were removed. Unknown ids raise KeyError unless ``missing_ok``."""
        from qdrant_client import models

        if isinstance(page_ids, str):
            page_ids = [page_ids]
        ids = list(dict.fromkeys(page_ids))
        found = self._find(ids) if self._exists() else {}
        missing = [p for p in ids if p not in found]
        if missing and not missing_ok:
            raise KeyError(f"not in the index: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if found:
            self.client.delete(self.collection, models.PointIdsList(points=[r.id for r in found.values()]), wait=True)
        return len(found)

    # --- search ---------------------------------------------------------------------------------------
    def search(
        self,
        query: QueryLike,
        k: int = 20,
        *,
        ef_search: int | None = None,
        exact: bool = False,
        with_embeddings: bool = False,
        k_prime: int | None = None,
        nprobe: int | None = None,
        rescore: int | None = None,
    ) -> list[SearchHit]:
        """Top ``k`` pages for a query embedding (Tq, D), best first, by Qdrant's MaxSim. ``ef_search``: Qdrant's
        ``hnsw_ef``; ``exact``: a full scan (ground truth); ``with_embeddings``: each hit carries its stored
        embedding (the patch vectors come back with the hits: one request)."""
        from qdrant_client import models

        for name, value in (("k_prime", k_prime), ("nprobe", nprobe), ("rescore", rescore)):
            if value is not None:
                raise ConfigError(f"{name} is a FAISS setting (PageIndex); a Qdrant search takes ef_search or exact")
        q = as_query_array(query, self._dim)
        k = check_positive_int("k", k)
        if not self._exists():
            return []
        params = None
        if exact or ef_search is not None:
            params = models.SearchParams(exact=bool(exact),
                                         hnsw_ef=check_positive_int("ef_search", ef_search) if ef_search else None)
        prefetch = None
        if self.prefetch and not exact:
            prefetch = [models.Prefetch(query=q.tolist(), using=name, limit=max(self.prefetch_limit, k))
                        for name in self.prefetch]
        with warnings.catch_warnings():
            # local mode always scans exactly and says so when given search parameters
            warnings.filterwarnings("ignore", message="Local mode performs exact", category=UserWarning)
            points = self.client.query_points(
                self.collection, query=q.tolist(), using=self.vector_name or None, prefetch=prefetch, limit=k,
                search_params=params, with_payload=True,
                with_vectors=([self.vector_name] if self.vector_name else True) if with_embeddings else False,
            ).points
        return [SearchHit(self._page_id(p), float(p.score), rank, self._metadata(p.payload),
                          self._embedding(p) if with_embeddings else None)
                for rank, p in enumerate(points, start=1)]

    def search_batch(self, queries: Sequence[QueryLike], k: int = 20, **kwargs: Any) -> list[list[SearchHit]]:
        return [self.search(q, k, **kwargs) for q in queries]

    # --- records --------------------------------------------------------------------------------------
    def _new_point_id(self, page_id: str) -> str | int:
        if self.fields.page_id is not None:
            return point_id(page_id)
        parsed = _parse_point_id(page_id)
        if parsed is None:
            raise ValueError(f"page id {page_id!r} is not a Qdrant point id (an unsigned integer or a UUID); with "
                             "QdrantFields(page_id=None) page ids are point ids")
        return parsed

    def _page_id(self, record: Any) -> str:
        if self.fields.page_id is None:
            return str(record.id)
        value = (record.payload or {}).get(self.fields.page_id)
        if not isinstance(value, str) or not value:
            raise IndexStateError(f"point {record.id} of {self.collection!r} has no {self.fields.page_id!r} payload "
                                  "field (the page id); add it, or open with QdrantFields(page_id=None)")
        return value

    def _metadata(self, payload: Mapping[str, Any] | None) -> dict[str, Any]:
        reserved = self.fields.reserved()
        return {k: v for k, v in (payload or {}).items() if k not in reserved}

    def _layout_payload(self, page: PageEmbedding) -> dict[str, Any]:
        f = self.fields
        out: dict[str, Any] = {f.grid: list(page.grid)}
        if f.page_id is not None:
            out[f.page_id] = page.page_id
        rows = page.patch_rows
        n = rows.numel()
        if n and torch.equal(rows, rows[0] + torch.arange(n)):
            out[f.patch_start] = int(rows[0])
        else:
            out[f.patch_rows] = rows.tolist()
        if page.content_hash is not None:
            out[f.content_hash] = page.content_hash
        return out

    def _embedding(self, record: Any) -> PageEmbedding:
        f = self.fields
        page_id = self._page_id(record)
        payload = record.payload or {}
        vec = record.vector[self.vector_name] if self.vector_name else record.vector
        vectors = torch.from_numpy(np.asarray(vec, dtype=np.float32).reshape(len(vec), -1))
        grid = payload.get(f.grid)
        if not (isinstance(grid, (list, tuple)) and len(grid) == 2):
            raise IndexStateError(f"page {page_id!r} in Qdrant collection {self.collection!r}: the payload has no "
                                  f"{f.grid!r} [h, w] field; pruning maps need the page's patch grid (see "
                                  "minirerank_core.retrieval.qdrant)")
        h, w = (int(x) for x in grid)
        if f.patch_rows in payload:
            rows = torch.as_tensor(payload[f.patch_rows], dtype=torch.int64)
        elif f.patch_start in payload:
            rows = int(payload[f.patch_start]) + torch.arange(h * w)
        else:
            raise IndexStateError(f"page {page_id!r} in Qdrant collection {self.collection!r}: the payload has "
                                  f"neither {f.patch_start!r} nor {f.patch_rows!r} (which vectors are the grid's "
                                  "patches)")
        try:
            return PageEmbedding(page_id, vectors, rows, (h, w), payload.get(f.content_hash),
                                 self._metadata(payload))
        except ValueError as exc:
            raise IndexStateError(f"Qdrant collection {self.collection!r}: {exc}") from exc

    def _get(self, page_id: str, *, vectors: bool) -> Any:
        record = self._find([page_id], vectors=vectors).get(page_id) if self._exists() else None
        if record is None:
            raise KeyError(f"page {page_id!r} is not in the index")
        return record

    def _find(self, page_ids: Sequence[str], *, vectors: bool = False) -> dict[str, Any]:
        """page id -> point record of the given ids that are in the collection."""
        from qdrant_client import models

        if not self._exists():
            return {}
        want = [self.vector_name] if self.vector_name else True
        with_vectors = want if vectors else False
        out: dict[str, Any] = {}
        ids = list(dict.fromkeys(page_ids))
        if self.fields.page_id is None:
            points = [p for p in (_parse_point_id(i) for i in ids) if p is not None]
            for r in self.client.retrieve(self.collection, points, with_payload=True, with_vectors=with_vectors):
                out[str(r.id)] = r
            return out
        for start in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[start : start + _LOOKUP_CHUNK]
            flt = models.Filter(must=[models.FieldCondition(key=self.fields.page_id, match=models.MatchAny(any=chunk))])
            offset = None
            while True:
                records, offset = self.client.scroll(self.collection, scroll_filter=flt, limit=len(chunk) + 1,
                                                     offset=offset, with_payload=True, with_vectors=with_vectors)
                for r in records:
                    pid = self._page_id(r)
                    if pid in out and out[pid].id != r.id:
                        raise IndexStateError(f"page id {pid!r} is on two points of {self.collection!r} "
                                              f"({out[pid].id}, {r.id})")
                    out[pid] = r
                if offset is None:
                    break
        return out

    def _scroll_all(self, payload: Any) -> Iterable[Any]:
        if not self._exists():
            return
        offset = None
        while True:
            records, offset = self.client.scroll(self.collection, limit=1024, offset=offset, with_payload=payload,
                                                 with_vectors=False)
            yield from records
            if offset is None:
                return


def _as_client(client: Any) -> tuple[Any, bool]:
    """(client, whether we made it): a QdrantClient as is; a URL (server), ":memory:" or a directory (local mode)."""
    from qdrant_client import QdrantClient

    if isinstance(client, QdrantClient):
        return client, False
    if isinstance(client, (str, os.PathLike)):
        where = os.fspath(client)
        if where.startswith(("http://", "https://")):
            return QdrantClient(url=where), True
        if where == ":memory:":
            return QdrantClient(":memory:"), True
        return QdrantClient(path=where), True
    raise ConfigError(f"expected a QdrantClient, a URL, ':memory:' or a directory, got {type(client).__name__}")


def _is_local(client: Any) -> bool:
    opts = getattr(client, "init_options", None) or {}
    return opts.get("location") == ":memory:" or bool(opts.get("path"))


def _the_multivector(client: Any, collection: str) -> str | None:
    vectors = client.get_collection(collection).config.params.vectors
    if not isinstance(vectors, Mapping):
        return None
    multi = [name for name, p in vectors.items() if p.multivector_config is not None]
    if len(multi) != 1:
        raise ConfigError(f"Qdrant collection {collection!r} has multivectors {sorted(multi)}; pass vector_name")
    return multi[0]


def _parse_point_id(page_id: str) -> int | str | None:
    if page_id.isdigit():
        return int(page_id)
    try:
        return str(uuid.UUID(page_id))
    except ValueError:
        return None


__all__ = ["QdrantFields", "QdrantPageIndex", "point_id"]
