"""Model families the engine supports, and how to pick one for a loaded model."""

from __future__ import annotations

import torch

from ...errors import UnsupportedModelError
from .base import FamilyAdapter, VisualFeatures
from .qwen2_5_vl import Qwen2_5VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "qwen3_vl": Qwen3VLAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2_5VLAdapter,
}


def adapter_for(model: torch.nn.Module) -> FamilyAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported: {sorted(ADAPTERS)} (Qwen3VLForConditionalGeneration, Qwen2VLForConditionalGeneration, "
            "Qwen2_5_VLForConditionalGeneration)"
        )
    if not hasattr(model, "lm_head") or not hasattr(model, "model"):
        raise UnsupportedModelError(f"expected a *ForConditionalGeneration model, got {type(model).__name__}")
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "FamilyAdapter", "VisualFeatures", "adapter_for"]
