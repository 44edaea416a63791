"""RerankConfig: the speed/quality knobs of the cached sparse path, validated against the loaded model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from ..validation import check_choice, check_positive_int, check_ratio
from ..errors import ConfigError
from .devices import DTYPES, resolve_device, resolve_dtype
from .kv import KV_DTYPES, fp8_supported



def check_query_limits(max_query_tokens: object, query_overflow: object) -> None:
    if max_query_tokens is not None:
        check_positive_int("max_query_tokens", max_query_tokens)
    check_choice("query_overflow", query_overflow, ("error", "truncate"))


def check_kv_dtype(kv_dtype: object) -> None:
    """None, "int8", or "fp8" where this torch has float8 e4m3 tensors; else ConfigError."""
    if kv_dtype is None:
        return
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv_dtype must be None, 'int8' or 'fp8', got {kv_dtype!r}")
    if kv_dtype == "fp8" and not fp8_supported():
        raise ConfigError(f"kv_dtype='fp8' needs torch.float8_e4m3fn (torch >= 2.1); this torch is {torch.__version__}")


@dataclass(frozen=True)
class RerankConfig:
    """Settings of the miniReranker path. The defaults reproduce the dense model exactly.

    exit_layer: score from the hidden state after this many LM layers (None = all layers).
    band: (b0, b1) — the query attends to the page only in layers b0 <= l < b1 (None = every layer before exit).
    keep_ratio: fraction of a page's cached visual tokens the query may see (top by the importance map).
    index_keep_ratio: fraction of visual tokens kept *before* the page prefill (query-independent, shrinks the cache).
    query_positions: "exact" (standard M-RoPE: the query follows the page) or "shared" (the query starts at
        `shared_offset` for every page; only for models trained that way; makes layers < b0 run once per query).
    max_query_tokens: the longest query accepted, in tokens (None: min(512, 1/8 of the model's context)).
    query_overflow: a longer query raises InvalidQueryError ("error") or is cut to the limit with a warning
        ("truncate").
    kv_dtype: store the page cache compressed: "int8" or "fp8" (float8 e4m3), one byte per element plus scales,
        decoded in the scorer; None (default) stores the model's own values, unchanged. Part of the cache key.
    """

    exit_layer: int | None = None
    band: tuple[int, int] | None = None
    keep_ratio: float = 1.0
    index_keep_ratio: float = 1.0
    query_positions: Literal["exact", "shared"] = "exact"
    shared_offset: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 32
    max_query_tokens: int | None = None
    query_overflow: Literal["error", "truncate"] = "error"
    kv_dtype: Literal["int8", "fp8"] | None = None

    def replace(self, **changes) -> "RerankConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["band"] = list(self.band) if self.band is not None else None
        if self.kv_dtype is None:  # files saved without compression stay readable by versions that predate it
            del d["kv_dtype"]
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
        """The torch dtype (of the resolved config; "auto" resolves on this machine)."""
        return DTYPES[resolve_dtype(self.dtype, resolve_device(self.device))]

    def resolve(self, num_layers: int) -> "RerankConfig":
        """Fill defaults from the model and check every setting against it; raises ConfigError."""
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        exit_layer = num_layers if self.exit_layer is None else self.exit_layer
        if not isinstance(exit_layer, int) or not 1 <= exit_layer <= num_layers:
            raise ConfigError(f"exit_layer must be an int in [1, {num_layers}] for this model, got {self.exit_layer!r}")
        band = (0, exit_layer) if self.band is None else tuple(self.band)
        if len(band) != 2 or not all(isinstance(b, int) for b in band) or not 0 <= band[0] < band[1] <= exit_layer:
            raise ConfigError(
                f"band must be (b0, b1) with 0 <= b0 < b1 <= exit_layer={exit_layer} (model has {num_layers} layers), got {self.band!r}"
            )
        for name in ("keep_ratio", "index_keep_ratio"):
            check_ratio(name, getattr(self, name))
        if self.query_positions not in ("exact", "shared"):
            raise ConfigError(f"query_positions must be 'exact' or 'shared', got {self.query_positions!r}")
        if self.shared_offset is not None and (not isinstance(self.shared_offset, int) or self.shared_offset < 0):
            raise ConfigError(f"shared_offset must be a non-negative int, got {self.shared_offset!r}")
        check_positive_int("batch_size", self.batch_size)
        check_query_limits(self.max_query_tokens, self.query_overflow)
        check_kv_dtype(self.kv_dtype)
        return replace(self, exit_layer=exit_layer, band=band, device=device, dtype=dtype)

    @property
    def is_dense_equivalent(self) -> bool:
        """True when the cached path must equal a plain forward (checked after resolve())."""
        return (
            self.band == (0, self.exit_layer)
            and self.keep_ratio == 1.0
            and self.index_keep_ratio == 1.0
            and self.query_positions == "exact"
            and self.kv_dtype is None
        )
