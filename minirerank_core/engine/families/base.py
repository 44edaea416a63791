"""What the engine needs from a model family, in one place: layers, norms, rotary, visual encoder, M-RoPE ids."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import UnsupportedModelError


@dataclass
class VisualFeatures:
    """The vision tower's output for one image: merged visual tokens (N, H) and deepstack features (Qwen3-VL)."""

    embeds: torch.Tensor
    deepstack: list[torch.Tensor] = field(default_factory=list)  # one (N, H) per early LM layer, may be empty

    def select(self, index: torch.Tensor) -> "VisualFeatures":
        """Keep the rows in `index` (index-time pruning applies to deepstack features too)."""
        return VisualFeatures(self.embeds[index], [d[index] for d in self.deepstack])


class FamilyAdapter:
    """Shared accessors over a HF `*ForConditionalGeneration` Qwen-VL model. Subclasses override what differs."""

    family = "base"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        cfg = model.config
        self.image_token_id: int = cfg.image_token_id
        self.vision_start_token_id: int = cfg.vision_start_token_id
        self.vision_end_token_id: int = cfg.vision_end_token_id
        self.patch_size: int = cfg.vision_config.patch_size
        self.merge_size: int = cfg.vision_config.spatial_merge_size
        text = self.text_model
        self.num_layers: int = len(text.layers)
        self.num_kv_heads: int = text.config.num_key_value_heads
        self.head_dim: int = getattr(text.config, "head_dim", None) or text.config.hidden_size // text.config.num_attention_heads
        self.hidden_size: int = text.config.hidden_size
        # The engine builds full causal masks itself; a sliding-window layer would see more than HF lets it.
        sliding = [i for i, t in enumerate(getattr(text.config, "layer_types", None) or []) if t != "full_attention"]
        if sliding:
            raise UnsupportedModelError(
                f"{type(model).__name__}: LM layers {sliding[:4]}{'...' if len(sliding) > 4 else ''} use sliding-window "
                "attention, which the cached engine does not implement (released Qwen-VL checkpoints set "
                "use_sliding_window=false)"
            )

    # --- the language model's pieces -------------------------------------------------------------
    @property
    def text_model(self):
        return self.model.model.language_model

    @property
    def layers(self):
        return self.text_model.layers

    @property
    def norm(self):
        return self.text_model.norm

    @property
    def lm_head(self):
        return self.model.lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for (3, B, S) M-RoPE position ids, mixed per the family's section layout."""
        return self.text_model.rotary_emb(hidden, position_ids)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.embed_tokens.weight.device

    # --- positions and vision ---------------------------------------------------------------------
    def rope_index(self, input_ids: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(3, B, S) M-RoPE position ids of a tokenised prompt with images, from the model's own rule."""
        mm_types = (input_ids == self.image_token_id).int()
        positions, _ = self.model.model.get_rope_index(input_ids, mm_types, image_grid_thw=grid_thw)
        return positions

    def encode_image(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[VisualFeatures]:
        raise NotImplementedError

    def inject_deepstack(self, layer_idx: int, hidden: torch.Tensor, visual_mask: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """Add deepstack features after LM layer `layer_idx` (Qwen3-VL); identity for families without them."""
        return hidden
