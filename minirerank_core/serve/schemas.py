"""Request and response bodies (pydantic), compatible with the Cohere (v1 and v2) and Jina rerank APIs.

Unknown request fields (Cohere's ``max_tokens_per_doc``, ``priority``, ``rank_fields``...) are accepted and
ignored, so the official clients work unchanged; responses carry Cohere's ``id`` / ``results`` / ``meta`` and
Jina's ``model`` / ``usage``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class DocumentObject(BaseModel):
    """A document as an object: Jina's multimodal ``{"image": ...}``, or Cohere's ``{"text": ...}`` when the text
    is itself an image (data URL, base64), a page id of the index or a path under the server's root."""

    model_config = ConfigDict(extra="allow")

    image: Optional[str] = None
    text: Optional[str] = None


Document = Union[str, DocumentObject]


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    query: str = Field(description="The search query (checked against the reranker's token limit).")
    documents: list[Document] = Field(
        description="Page images: data URLs, base64 strings, {'image': ...} objects, page ids of the server's index, "
                    "or paths under the server's --root.")
    top_n: Optional[int] = Field(default=None, description="Return the best N (None: all).")
    return_documents: bool = Field(default=False, description="Echo each document in its result.")
    model: Optional[str] = Field(default=None, description="Accepted for compatibility; the server serves one model "
                                                           "(named in the response's `model`).")


class RerankResultItem(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="sigmoid(score), in [0, 1].")
    score: float = Field(description="The reranker's raw score (logit(positive) - logit(negative) point-wise).")
    document: Optional[dict[str, Any]] = None


class ApiVersion(BaseModel):
    version: str = "2"


class BilledUnits(BaseModel):
    """Counts of what the request used (nothing is billed): images reranked, and Cohere's search units
    (one per query of up to 100 documents)."""

    search_units: int
    images: int


class Meta(BaseModel):
    api_version: ApiVersion = Field(default_factory=ApiVersion)
    billed_units: BilledUnits
    warnings: list[str] = Field(default_factory=list)


class Usage(BaseModel):
    """Jina's usage block: query tokens plus the documents' visual tokens the reranker read."""

    total_tokens: int


class RerankResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    model: str
    results: list[RerankResultItem]
    meta: Meta
    usage: Usage


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: str
    k: int = Field(default=20, description="First-stage candidates to rerank (as `minirerank search -k`).")
    top_n: Optional[int] = Field(default=5, description="Results to return (None: all k).")
    rerank: bool = Field(default=True, description="False: first stage only (as `--no-rerank`).")


class SearchResultRow(BaseModel):
    """One row exactly as `minirerank search --json` prints it, plus relevance_score."""

    rank: int
    page_id: str
    score: float
    first_stage_score: float
    first_stage_rank: Optional[int]
    source: Optional[str] = None
    page: Optional[int] = None
    relevance_score: float


class SearchResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    model: str
    query: str
    index: Optional[str] = Field(description="The served workspace directory (None: an index in memory).")
    pages_in_index: int
    candidates: int
    reranked: bool
    results: list[SearchResultRow]
    seconds: float


class ErrorResponse(BaseModel):
    """Every error: ``type`` names it (e.g. TooManyDocumentsError), ``message`` says what to fix. ``detail``
    repeats the message for clients that read FastAPI's / Jina's field."""

    type: str
    message: str
    detail: Any = None


__all__ = ["Document", "DocumentObject", "ErrorResponse", "Meta", "RerankRequest", "RerankResponse", "RerankResultItem",
           "SearchRequest", "SearchResponse", "SearchResultRow", "Usage"]
