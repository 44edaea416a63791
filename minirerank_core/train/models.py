"""Architectures of the shipped models, built from configs in code, and the processors that go with them.

Both models are Qwen3-VL: the reranker is `Qwen3VLForConditionalGeneration`, the embedder colpali-engine's
`ColQwen3` (a `Qwen3VLModel` + a 320-d projection). They share one vision-tower config and one pixel budget, so
a page becomes the identical merged visual-token grid in both and the embedder's importance maps need no
resampling. The same `build_*` functions accept any sizes, so the training stages also run on real checkpoints
(pass --init PATH to a stage instead).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..testing import special_ids

PATCH = 16
MERGE = 2


@dataclass(frozen=True)
class VisionSpec:
    depth: int = 4
    hidden: int = 128
    heads: int = 2
    mlp_ratio: int = 3
    deepstack: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class TextSpec:
    layers: int = 8
    hidden: int = 192
    heads: int = 3
    kv_heads: int = 1
    intermediate: int = 512


@dataclass(frozen=True)
class ModelSpec:
    vision: VisionSpec = VisionSpec()
    reranker: TextSpec = TextSpec()
    embedder: TextSpec = TextSpec(layers=3)
    max_visual_tokens: int = 144  # pixel budget: 144 merged tokens of 32x32 px (a 320x448 page is 140)
    min_visual_tokens: int = 4

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(VisionSpec(**{**d["vision"], "deepstack": tuple(d["vision"]["deepstack"])}), TextSpec(**d["reranker"]),
                   TextSpec(**d["embedder"]), d["max_visual_tokens"], d["min_visual_tokens"])

    @property
    def max_pixels(self) -> int:
        return self.max_visual_tokens * (PATCH * MERGE) ** 2

    @property
    def min_pixels(self) -> int:
        return self.min_visual_tokens * (PATCH * MERGE) ** 2


def qwen3vl_config(tokenizer, vision: VisionSpec, text: TextSpec):
    from transformers import Qwen3VLConfig

    ids = special_ids(tokenizer)
    head_dim = text.hidden // text.heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 4), half // 4, half // 4]  # (t, h, w) sections sum to head_dim / 2
    text_cfg = dict(
        vocab_size=len(tokenizer), hidden_size=text.hidden, intermediate_size=text.intermediate,
        num_hidden_layers=text.layers, num_attention_heads=text.heads, num_key_value_heads=text.kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
    )
    vision_cfg = dict(
        depth=vision.depth, hidden_size=vision.hidden, intermediate_size=vision.hidden * vision.mlp_ratio,
        num_heads=vision.heads, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
        out_hidden_size=text.hidden, num_position_embeddings=1024, deepstack_visual_indexes=list(vision.deepstack),
    )
    return Qwen3VLConfig(
        text_config=text_cfg, vision_config=vision_cfg, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def build_reranker(tokenizer, spec: ModelSpec, seed: int = 0):
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(qwen3vl_config(tokenizer, spec.vision, spec.reranker))


def build_embedder(tokenizer, spec: ModelSpec, seed: int = 0):
    from colpali_engine.models import ColQwen3

    torch.manual_seed(seed)
    return ColQwen3(qwen3vl_config(tokenizer, spec.vision, spec.embedder))


def _image_processor(spec: ModelSpec):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=spec.min_pixels,
                                 max_pixels=spec.max_pixels, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def reranker_processor(tokenizer, spec: ModelSpec):
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    video = Qwen3VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    return Qwen3VLProcessor(image_processor=_image_processor(spec), tokenizer=tokenizer, video_processor=video)


def embedder_processor(tokenizer, spec: ModelSpec):
    from colpali_engine.models import ColQwen3Processor
    from transformers import Qwen3VLVideoProcessor

    video = Qwen3VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    return ColQwen3Processor(image_processor=_image_processor(spec), tokenizer=tokenizer, video_processor=video)


def vision_state(model) -> dict[str, torch.Tensor]:
    """The vision tower's weights of a Qwen3-VL model (reranker or ColQwen3 embedder), by name under `visual.`."""
    visual = model.model.visual if hasattr(model, "lm_head") else model.visual
    return {k: v.detach().clone() for k, v in visual.state_dict().items()}


def visual_module(model):
    return model.model.visual if hasattr(model, "lm_head") else model.visual


def text_embeddings(model):
    lm = model.model.language_model if hasattr(model, "lm_head") else model.language_model
    return lm.embed_tokens


def lm_layer(name: str) -> int | None:
    """The LM decoder layer a parameter name belongs to (None: vision tower, embeddings, final norm, head)."""
    marker = "language_model.layers."
    return int(name.split(marker, 1)[1].split(".", 1)[0]) if marker in name else None


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def load_pretrained_reader(pretrain_dir, tokenizer, seed: int = 0):
    """The reranker-shaped model holding the `pretrain` stage's vision tower and token embeddings, and its spec."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    pretrain_dir = Path(pretrain_dir)
    spec = ModelSpec.from_dict(json.loads((pretrain_dir / "spec.json").read_text()))
    model = build_reranker(tokenizer, spec, seed=seed)
    state = load_file(str(pretrain_dir / "ckpt" / "model.safetensors"))
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"pretrain checkpoint does not fit: missing {missing[:5]} unexpected {unexpected[:5]}")
    return model, spec


def copy_vision_and_embeddings(src, dst) -> None:
    """Copy the vision tower and the token-embedding table from `src` to `dst` (reranker or ColQwen3, same shapes)."""
    visual_module(dst).load_state_dict(visual_module(src).state_dict())
    with torch.no_grad():
        text_embeddings(dst).weight.copy_(text_embeddings(src).weight)


class FrozenVisionCache:
    """Memoises a frozen vision tower's outputs per image (keyed by a hash of the image's pixel patches).

    The tower's `forward` is replaced on the instance only (no module is added, so state_dict, saving and every
    caller - the engine's adapters, ColQwen3, a plain HF forward - are unchanged); outputs are bit-identical to the
    tower's own, computed once per distinct page. Only valid while the tower's weights do not change.
    """

    def __init__(self, visual):
        self.visual = visual
        self.store: dict[bytes, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._forward = visual.forward
        visual.forward = self.forward

    def close(self) -> None:
        del self.visual.forward
        self.store = {}

    def share_with(self, other_visual) -> "FrozenVisionCache":
        """A cache on `other_visual` that shares this one's store; only if both towers hold identical weights."""
        a, b = self.visual.state_dict(), other_visual.state_dict()
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            raise ValueError("vision towers differ: their outputs cannot share a cache")
        other = FrozenVisionCache(other_visual)
        other.store = self.store
        return other

    @staticmethod
    def _key(chunk: torch.Tensor, thw: torch.Tensor) -> bytes:
        import hashlib

        h = hashlib.blake2b(chunk.detach().float().cpu().numpy().tobytes(), digest_size=16)
        h.update(thw.cpu().numpy().tobytes())
        return h.digest()

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        kwargs.pop("return_dict", None)
        merge = self.visual.spatial_merge_size ** 2
        sizes = grid_thw.prod(-1).tolist()
        chunks = torch.split(hidden_states, sizes)
        keys = [self._key(c, g) for c, g in zip(chunks, grid_thw)]
        missing = []
        seen = set()
        for i, k in enumerate(keys):
            if k not in self.store and k not in seen:
                missing.append(i)
                seen.add(k)
        if missing:
            with torch.no_grad():
                out = self._forward(torch.cat([chunks[i] for i in missing]), grid_thw[missing], return_dict=True, **kwargs)
            msz = [sizes[i] // merge for i in missing]
            pooled = torch.split(out.pooler_output, msz)
            deep = [torch.split(d, msz) for d in out.deepstack_features]
            for j, i in enumerate(missing):
                self.store[keys[i]] = (pooled[j].clone(), [d[j].clone() for d in deep])
        n_deep = len(self.store[keys[0]][1])
        return BaseModelOutputWithDeepstackFeatures(
            last_hidden_state=None,
            pooler_output=torch.cat([self.store[k][0] for k in keys]),
            deepstack_features=[torch.cat([self.store[k][1][j] for k in keys]) for j in range(n_deep)],
        )


def residual_identity_init(model, proj: torch.nn.Linear | None = None) -> None:
    """Zero every LM layer's output projections (attention o_proj, MLP down_proj), so each residual block starts
    as the identity, and (for ColQwen) make the 320-d head copy the hidden state into its first dimensions.

    With a pretrained reader (visual tokens cosine-aligned with the token-embedding table) this makes the untrained
    embedder an exact bag-of-tokens MaxSim matcher: query token t and page cell c score cos(E[t], v_c). Training
    then starts from a working retriever instead of noise; the zeroed projections receive gradients at once.
    """
    lm = model.model.language_model if hasattr(model, "lm_head") else model.language_model
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        if proj is not None:
            proj.weight.zero_()
            n = min(proj.weight.shape)
            proj.weight[:n, :n] = torch.eye(n)
            if proj.bias is not None:
                proj.bias.zero_()


@torch.no_grad()
def sharpen_attention(adapter, layers: range, scale: float) -> None:
    """Multiply the attention logits of these LM layers by `scale` (a lower softmax temperature) by scaling the
    queries: the q-norm weight where the family normalises queries (Qwen3-VL), else the q projection. The model
    stays a plain checkpoint of its family (no new parameter, nothing to undo at load time)."""
    for l in layers:
        attn = adapter.layers[l].self_attn
        if getattr(attn, "q_norm", None) is not None:
            attn.q_norm.weight.mul_(scale)
        else:
            attn.q_proj.weight.mul_(scale)
            if attn.q_proj.bias is not None:
                attn.q_proj.bias.mul_(scale)
