"""Qwen2-VL (MonoQwen2-VL, jina-reranker-m0): plain merged visual tokens, no deepstack."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, VisualFeatures


class Qwen2VLAdapter(FamilyAdapter):
    family = "qwen2_vl"

    def encode_image(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[VisualFeatures]:
        out = self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        return [VisualFeatures(e) for e in out.pooler_output]
