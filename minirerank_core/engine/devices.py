"""Where and in what precision the models run: ``device="auto"`` and ``dtype="auto"`` resolved once, here.

``auto`` device: CUDA, then Apple MPS, then the CPU. ``auto`` dtype: bfloat16 on a GPU that supports it (float16 on
one that does not, and on MPS), float32 on the CPU: measured on this project's CPUs, torch's bf16 matmul is emulated
without AVX-512-BF16 (0.1 vs 13.4 GFLOP/s for fp32 on a 2-core AVX2 machine; benchmarks/engine.py --dtype), so
fp32 is both exact and fastest there. Pass a dtype explicitly on a CPU with native bf16 once measured there.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> str:
    """A concrete device string for ``device`` ("auto" or None: cuda, then mps, then cpu)."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from exc


def resolve_dtype(dtype: str | None, device: str) -> str:
    """A concrete dtype name for ``dtype`` on ``device`` ("auto" or None: see the module docstring)."""
    if dtype is None or dtype == "auto":
        kind = torch.device(device).type
        if kind == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if kind == "mps":
            return "float16"
        return "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


__all__ = ["DTYPES", "resolve_device", "resolve_dtype"]
