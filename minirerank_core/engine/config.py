"""RerankConfig: the speed/quality knobs of the cached sparse path, validated against the loaded model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from ..errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RerankConfig:
    """Settings of the miniReranker path. The defaults reproduce the dense model exactly.

    exit_layer: score from the hidden state after this many LM layers (None = all layers).
    band: (b0, b1) — the query attends to the page only in layers b0 <= l < b1 (None = every layer before exit).
    keep_ratio: fraction of a page's cached visual tokens the query may see (top by the importance map).
    index_keep_ratio: fraction of visual tokens kept *before* the page prefill (query-independent, shrinks the cache).
    query_positions: "exact" (standard M-RoPE: the query follows the page) or "shared" (the query starts at
        `shared_offset` for every page; only for models trained that way; makes layers < b0 run once per query).
    """

    exit_layer: int | None = None
    band: tuple[int, int] | None = None
    keep_ratio: float = 1.0
    index_keep_ratio: float = 1.0
    query_positions: Literal["exact", "shared"] = "exact"
    shared_offset: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 32

    def replace(self, **changes) -> "RerankConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["band"] = list(self.band) if self.band is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RerankConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown RerankConfig fields {sorted(unknown)}")
        d = dict(d)
        if d.get("band") is not None:
            d["band"] = tuple(d["band"])
        return cls(**d)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def resolve(self, num_layers: int) -> "RerankConfig":
        """Fill defaults from the model and check every setting against it; raises ConfigError."""
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        exit_layer = num_layers if self.exit_layer is None else self.exit_layer
        if not isinstance(exit_layer, int) or not 1 <= exit_layer <= num_layers:
            raise ConfigError(f"exit_layer must be an int in [1, {num_layers}] for this model, got {self.exit_layer!r}")
        band = (0, exit_layer) if self.band is None else tuple(self.band)
        if len(band) != 2 or not all(isinstance(b, int) for b in band) or not 0 <= band[0] < band[1] <= exit_layer:
            raise ConfigError(
                f"band must be (b0, b1) with 0 <= b0 < b1 <= exit_layer={exit_layer} (model has {num_layers} layers), got {self.band!r}"
            )
        for name in ("keep_ratio", "index_keep_ratio"):
            r = getattr(self, name)
            if not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {r!r}")
        if self.query_positions not in ("exact", "shared"):
            raise ConfigError(f"query_positions must be 'exact' or 'shared', got {self.query_positions!r}")
        if self.shared_offset is not None and (not isinstance(self.shared_offset, int) or self.shared_offset < 0):
            raise ConfigError(f"shared_offset must be a non-negative int, got {self.shared_offset!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {self.batch_size!r}")
        return replace(self, exit_layer=exit_layer, band=band)

    @property
    def is_dense_equivalent(self) -> bool:
        """True when the cached path must equal a plain forward (checked after resolve())."""
        return (
            self.band == (0, self.exit_layer)
            and self.keep_ratio == 1.0
            and self.index_keep_ratio == 1.0
            and self.query_positions == "exact"
        )
