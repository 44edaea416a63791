"""ListwiseConfig: how candidates are windowed, pruned and scored by the listwise reranker."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from ..engine.config import RerankConfig
from ..errors import ConfigError

RANKGPT_LABELS: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOPQRST")


@dataclass(frozen=True)
class ListwiseConfig:
    """Settings of ListwiseReranker. The defaults are ZipRerank's: one pass over up to 20 labelled pages.

    mode: "single_pass" (ZipRerank: query, then the labelled pages, in one prompt) or "cached" (vision-first:
        every page's band KV is prefilled once and reused; see minirerank_core.listwise.cached).
    window, stride: sliding windows over longer lists (RankGPT: 20 and 10, back to front).
    keep_ratio: fraction of each page's visual tokens kept. single_pass: chosen by QI-EI (or by the first
        stage's importance maps when given); cached: chosen by the importance maps (required when < 1).
    labels: one single-token label per window slot; a window can hold at most len(labels) pages.
    exit_layer, band: cached mode only, as in RerankConfig (None = every layer).
    window_batch: windows that run in one forward (independent windows: one per query in rerank_batch).
    image_batch: pages per vision-tower / page-prefill batch.
    """

    mode: Literal["single_pass", "cached"] = "single_pass"
    window: int = 20
    stride: int = 10
    keep_ratio: float = 1.0
    labels: tuple[str, ...] = RANKGPT_LABELS
    exit_layer: int | None = None
    band: tuple[int, int] | None = None
    dtype: str = "float32"
    device: str = "cpu"
    window_batch: int = 4
    image_batch: int = 16

    def replace(self, **changes) -> "ListwiseConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["band"] = list(self.band) if self.band is not None else None
        return d

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
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if self.window > len(labels):
            raise ConfigError(
                f"window={self.window} puts more candidates in one prompt than there are labels ({len(labels)}: "
                f"{labels[0]}..{labels[-1]}); use window <= {len(labels)} or give more labels"
            )
        if not self.stride < self.window:
            raise ConfigError(f"stride must be smaller than window (else pages cannot move between windows), "
                              f"got stride={self.stride}, window={self.window}")
        if not isinstance(self.keep_ratio, (int, float)) or not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        page = self.page_config().resolve(num_layers)  # checks exit_layer, band, dtype
        exit_layer, band = (page.exit_layer, page.band) if self.mode == "cached" else (None, None)
        return replace(self, labels=labels, exit_layer=exit_layer, band=band)
