"""ListwiseConfig: how candidates are windowed, pruned and scored by the listwise reranker."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from ...validation import check_positive_int, check_ratio
from ...engine.config import RerankConfig, check_query_limits
from ...errors import ConfigError

RANKGPT_LABELS: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOPQRST")


@dataclass(frozen=True)
class ListwiseConfig:
    """Settings of ListwiseReranker. The defaults are ZipRerank's: one pass over up to 20 labelled pages.

    mode: "single_pass" (ZipRerank: query, then the labelled pages, in one prompt) or "cached" (vision-first:
        every page's band KV is prefilled once and reused; see minirerank_core.rerankers.listwise.cached).
    window, stride: sliding windows over longer lists (RankGPT: 20 and 10, back to front).
    keep_ratio: fraction of each page's visual tokens kept. single_pass: chosen by QI-EI (or by the first
        stage's importance maps when given, see prune_by); cached: chosen by the importance maps (required when < 1).
    prune_by: single_pass only. "maps": a page's first-stage importance map when it has one, else QI-EI; "qiei":
        always QI-EI, as ZipRerank (the maps are ignored) - a model trained with QI-EI then runs as trained.
    labels: one single-token label per window slot; a window can hold at most len(labels) pages.
    exit_layer, band: cached mode only, as in RerankConfig (None = every layer).
    readout: "all": the answer token "[" attends to everything it may see in every layer; "labels": in the last layer
        before the exit (single pass: the model's last layer) it attends to the label tokens only (a pointer over the
        labels, the read-out layer the shipped listwise model was built with; see rerankers/listwise/cached.py and
        single_pass.single_pass_logits). Saved with the model.
    window_batch: windows that run in one forward (independent windows: one per query in rerank_batch).
    image_batch: pages per vision-tower / page-prefill batch.
    max_query_tokens, query_overflow: as in RerankConfig.
    """

    mode: Literal["single_pass", "cached"] = "single_pass"
    window: int = 20
    stride: int = 10
    keep_ratio: float = 1.0
    prune_by: Literal["maps", "qiei"] = "maps"
    labels: tuple[str, ...] = RANKGPT_LABELS
    exit_layer: int | None = None
    band: tuple[int, int] | None = None
    readout: Literal["all", "labels"] = "all"
    dtype: str = "auto"
    device: str = "auto"
    window_batch: int = 4
    image_batch: int = 16
    max_query_tokens: int | None = None
    query_overflow: Literal["error", "truncate"] = "error"

    def replace(self, **changes) -> "ListwiseConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["band"] = list(self.band) if self.band is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "ListwiseConfig":
        """The inverse of to_dict (JSON lists back to tuples); unknown fields raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"a ListwiseConfig must be an object, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown ListwiseConfig fields {sorted(unknown)}")
        d = dict(data)
        if d.get("labels") is not None:
            d["labels"] = tuple(d["labels"])
        if d.get("band") is not None:
            d["band"] = tuple(d["band"])
        return cls(**d)

    def page_config(self) -> RerankConfig:
        """The point-wise settings of the shared page side (adapter, page KV cache, dtype, device)."""
        return RerankConfig(exit_layer=self.exit_layer, band=self.band, dtype=self.dtype, device=self.device,
                            batch_size=self.image_batch)

    def resolve(self, num_layers: int) -> "ListwiseConfig":
        """Fill exit_layer/band from the model and check every setting; raises ConfigError."""
        if self.mode not in ("single_pass", "cached"):
            raise ConfigError(f"mode must be 'single_pass' or 'cached', got {self.mode!r}")
        if self.mode == "single_pass" and (self.exit_layer is not None or self.band is not None):
            raise ConfigError("exit_layer and band apply to mode='cached' only; single_pass runs every layer")
        labels = tuple(self.labels)
        if not labels or not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels):
            raise ConfigError(f"labels must be distinct non-empty strings, got {self.labels!r}")
        for name in ("window", "stride", "window_batch", "image_batch"):
            check_positive_int(name, getattr(self, name))
        if self.window > len(labels):
            raise ConfigError(
                f"window={self.window} puts more candidates in one prompt than there are labels ({len(labels)}: "
                f"{labels[0]}..{labels[-1]}); use window <= {len(labels)} or give more labels"
            )
        if not self.stride < self.window:
            raise ConfigError(f"stride must be smaller than window (else pages cannot move between windows), "
                              f"got stride={self.stride}, window={self.window}")
        check_ratio("keep_ratio", self.keep_ratio)
        if self.prune_by not in ("maps", "qiei"):
            raise ConfigError(f"prune_by must be 'maps' or 'qiei', got {self.prune_by!r}")
        if self.mode == "cached" and self.prune_by != "maps":
            raise ConfigError("prune_by='qiei' applies to mode='single_pass'; cached pages are pruned by the first "
                              "stage's importance maps")
        if self.readout not in ("all", "labels"):
            raise ConfigError(f"readout must be 'all' or 'labels', got {self.readout!r}")
        check_query_limits(self.max_query_tokens, self.query_overflow)
        page = self.page_config().resolve(num_layers)  # checks exit_layer, band; resolves device and dtype
        exit_layer, band = (page.exit_layer, page.band) if self.mode == "cached" else (None, None)
        if self.readout == "labels" and self.mode == "cached" and band[0] <= exit_layer - 1 < band[1]:
            raise ConfigError(f"readout='labels' needs a read-out layer (exit_layer - 1 = {exit_layer - 1}) outside "
                              f"the band {band}")
        return replace(self, labels=labels, exit_layer=exit_layer, band=band, device=page.device, dtype=page.dtype)
