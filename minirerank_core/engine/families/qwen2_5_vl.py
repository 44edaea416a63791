"""Qwen2.5-VL (ColQwen2.5's base, Qwen2.5-VL-based rerankers): Qwen2-VL's decoder and M-RoPE, a different vision tower.

What differs from Qwen2-VL, and why the adapter stays this small:

* The vision tower uses window attention (most blocks attend within `window_size` pixel windows, the blocks in
  `fullatt_block_indexes` over the whole image) and permutes tokens into window order and back. All of that lives
  inside the model's own `get_image_features`, which returns merged tokens in the usual row-major order, per image.
* The M-RoPE rule takes `second_per_grid_ts`, which scales temporal ids of *videos* only; a still image uses the
  same (t, h, w) ids as Qwen2-VL, so the model's own `get_rope_index` (called by the base adapter without
  `second_per_grid_ts`) gives exactly what a processor-fed forward computes for a page.
"""

from __future__ import annotations

import torch

from .base import FamilyAdapter, VisualFeatures


class Qwen2_5VLAdapter(FamilyAdapter):
    family = "qwen2_5_vl"

    def encode_image(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[VisualFeatures]:
        out = self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        return [VisualFeatures(e) for e in out.pooler_output]
