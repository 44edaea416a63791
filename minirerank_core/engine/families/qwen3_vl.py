"""Qwen3-VL: vision tower with deepstack features added to the visual tokens' hidden states in early LM layers."""

from __future__ import annotations

import torch

from .base import FamilyAdapter, VisualFeatures


class Qwen3VLAdapter(FamilyAdapter):
    family = "qwen3_vl"

    def encode_image(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[VisualFeatures]:
        out = self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        per_image_deepstack = list(zip(*out.deepstack_features)) if out.deepstack_features else [()] * len(out.pooler_output)
        return [VisualFeatures(e, list(d)) for e, d in zip(out.pooler_output, per_image_deepstack)]

    def inject_deepstack(self, layer_idx, hidden, visual_mask, feats):
        # Same rule as Qwen3VLTextModel: after layer i < len(feats), add feats[i] at the visual positions.
        if layer_idx >= len(feats):
            return hidden
        hidden = hidden.clone()
        hidden[visual_mask] = hidden[visual_mask] + feats[layer_idx].to(hidden.dtype)
        return hidden
