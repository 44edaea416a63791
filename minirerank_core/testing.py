"""Tiny random Qwen-VL models, tokenizers and processors built entirely in code (no download).

Used by the project's tests and available to users writing their own: every code path of the engine can be
exercised on a model that builds in well under a second on a CPU.
"""

from __future__ import annotations

from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

Family = Literal["qwen3_vl", "qwen2_vl"]

# Qwen's special tokens, in Qwen's order; ids are assigned from 0 in the tiny vocabularies.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_BASE_CORPUS = """
Judge whether the page answers the query. Answer yes or no. yes no Yes No True False
system user assistant Query: Document: Does the page answer the query? relevant irrelevant
Assert the relevance of the previous image document to the following query, answer True or False.
The query is: what is the revenue growth in the annual report of the company for the last quarter
table figure chart section introduction conclusion results method data model training evaluation
Rank the pages by relevance to the query. The most relevant page label is [A] [B] [C] [D] [E] [F] [G]
[H] [I] [J] [K] [L] [M] [N] [O] [P] [Q] [R] [S] [T] 0123456789 abcdefghijklmnopqrstuvwxyz
"""


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer with Qwen's special tokens, trained in code on `corpus` (plus a base text).

    Deterministic for a given corpus and vocab size, so two calls give identical tokenizers.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Label words repeated so BPE merges each into one token, as in Qwen's real vocabulary.
    labels = "\n".join(["yes", "no", "Yes", "No", "True", "False"] * 64)
    tok.train_from_iterator([_BASE_CORPUS, labels, *(corpus or [])], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    fast.padding_side = "left"
    return fast


def special_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def build_processor(family: Family, tokenizer=None, *, max_pixels: int = 64 * 64 * 4, min_pixels: int = 32 * 32):
    """A real HF processor (image processor + tokenizer) for `family`, with a small pixel budget."""
    from transformers import Qwen2VLImageProcessor

    tokenizer = tokenizer or build_tokenizer()
    patch = 16 if family == "qwen3_vl" else 14
    # Qwen3-VL normalises with mean/std 0.5; Qwen2-VL with CLIP's statistics (as the released checkpoints do).
    norm = (
        dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        if family == "qwen3_vl"
        else dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    )
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels, **norm
    )
    # The processors insist on a video processor although pages never use one.
    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video)
    if family == "qwen2_vl":
        from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video)
    raise ValueError(f"unknown family {family!r}")


def tiny_config(
    family: Family,
    tokenizer,
    *,
    num_layers: int = 6,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    vision_hidden: int = 32,
):
    """A Qwen3-VL or Qwen2-VL config of toy size whose special-token ids match `tokenizer`."""
    ids = special_ids(tokenizer)
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    # M-RoPE sections (t, h, w) must sum to head_dim / 2.
    mrope = [half - 2 * (half // 4), half // 4, half // 4]
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        pad_token_id=ids["<|endoftext|>"],
    )
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["head_dim"] = head_dim
        vision = dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=hidden_size,
            num_position_embeddings=64,
            deepstack_visual_indexes=list(range(min(2, vision_depth))),
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=vision_depth,
            embed_dim=vision_hidden,
            hidden_size=hidden_size,
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown family {family!r}")


def tiny_model(family: Family, tokenizer=None, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised `Qwen3VLForConditionalGeneration` / `Qwen2VLForConditionalGeneration`."""
    tokenizer = tokenizer or build_tokenizer()
    config = tiny_config(family, tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    if family == "qwen3_vl":
        from transformers import Qwen3VLForConditionalGeneration as cls
    else:
        from transformers import Qwen2VLForConditionalGeneration as cls
    model = cls(config).to(dtype).eval()
    # Random init leaves tiny logits; widen the weights a little so scores differ visibly between pages.
    return model


def tiny_model_and_processor(family: Family, *, seed: int = 0, max_pixels: int = 64 * 64 * 4, **config_kwargs):
    tokenizer = build_tokenizer()
    processor = build_processor(family, tokenizer, max_pixels=max_pixels)
    model = tiny_model(family, tokenizer, seed=seed, **config_kwargs)
    return model, processor


def random_page_image(width: int, height: int, seed: int = 0):
    """A reproducible RGB test page with structure (blocks of colour), not pure noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(blocks).resize((width, height), Image.NEAREST)
    return img


def tiny_embedder(family: Family = "qwen3_vl", tokenizer=None, *, seed: int = 0, max_pixels: int = 64 * 64 * 4, **config_kwargs):
    """A random ColQwen3 / ColQwen2 (colpali-engine) with its processor, sharing the tiny reranker's vision config."""
    from colpali_engine.models import ColQwen2, ColQwen2Processor, ColQwen3, ColQwen3Processor

    tokenizer = tokenizer or build_tokenizer()
    hf = build_processor(family, tokenizer, max_pixels=max_pixels)
    model_cls, proc_cls = (ColQwen3, ColQwen3Processor) if family == "qwen3_vl" else (ColQwen2, ColQwen2Processor)
    torch.manual_seed(seed)
    model = model_cls(tiny_config(family, tokenizer, **config_kwargs)).eval()
    processor = proc_cls(image_processor=hf.image_processor, tokenizer=hf.tokenizer, video_processor=hf.video_processor)
    return model, processor
