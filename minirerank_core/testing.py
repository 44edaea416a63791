"""Tiny random Qwen-VL models, tokenizers and processors built entirely in code (no download).

Used by the project's tests and available to users writing their own: every code path of the engine can be
exercised on a model that builds in well under a second on a CPU.
"""

from __future__ import annotations

from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

Family = Literal["qwen3_vl", "qwen2_vl", "qwen2_5_vl"]
FAMILIES: tuple[str, ...] = ("qwen3_vl", "qwen2_vl", "qwen2_5_vl")

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
    # Qwen3-VL normalises with mean/std 0.5; Qwen2-VL and Qwen2.5-VL with CLIP's statistics (as the released
    # checkpoints do).
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
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video)
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
    """A Qwen3-VL, Qwen2-VL or Qwen2.5-VL config of toy size whose special-token ids match `tokenizer`."""
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
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # Their text configs default to Qwen's real bos/eos ids, outside a tiny vocabulary.
        text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
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
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        # Windows of 56 px = 2 x 2 merged tokens, so test pages span several windows; the last block attends
        # over the whole image (as blocks 7, 15, 23, 31 do in the released 32-block towers).
        vision = dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=hidden_size,
            window_size=56,
            fullatt_block_indexes=[vision_depth - 1],
            tokens_per_second=2,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown family {family!r}")


def tiny_model(family: Family, tokenizer=None, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised `Qwen3VLForConditionalGeneration` / `Qwen2VLForConditionalGeneration` /
    `Qwen2_5_VLForConditionalGeneration`."""
    import transformers

    tokenizer = tokenizer or build_tokenizer()
    config = tiny_config(family, tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    cls = getattr(transformers, _MODEL_CLASSES[family])
    return cls(config).to(dtype).eval()


_MODEL_CLASSES = {
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def tiny_model_and_processor(family: Family, *, seed: int = 0, max_pixels: int = 64 * 64 * 4, **config_kwargs):
    tokenizer = build_tokenizer()
    processor = build_processor(family, tokenizer, max_pixels=max_pixels)
    model = tiny_model(family, tokenizer, seed=seed, **config_kwargs)
    return model, processor


class TinyModels:
    """(model, processor) of a tiny random Qwen-VL per family, seed and settings, each built once: the ``tiny``
    fixture of the test suites (``tiny("qwen3_vl")``)."""

    def __init__(self, max_pixels: int = 200 * 200) -> None:
        self.max_pixels = max_pixels
        self._cache: dict = {}

    def __call__(self, family: Family, seed: int = 0, **config_kwargs):
        key = (family, seed, tuple(sorted(config_kwargs.items())))
        if key not in self._cache:
            self._cache[key] = tiny_model_and_processor(family, seed=seed, max_pixels=self.max_pixels, **config_kwargs)
        return self._cache[key]


def random_page_image(width: int, height: int, seed: int = 0):
    """A reproducible RGB test page with structure (blocks of colour), not pure noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(blocks).resize((width, height), Image.NEAREST)
    return img


def tiny_embedder(family: Family = "qwen3_vl", tokenizer=None, *, seed: int = 0, max_pixels: int = 64 * 64 * 4, **config_kwargs):
    """A random ColQwen3 / ColQwen2 / ColQwen2.5 (colpali-engine) with its processor, sharing the tiny reranker's
    vision config."""
    import colpali_engine.models as cm

    tokenizer = tokenizer or build_tokenizer()
    hf = build_processor(family, tokenizer, max_pixels=max_pixels)
    model_name, proc_name = _COLPALI_CLASSES[family]
    model_cls, proc_cls = getattr(cm, model_name), getattr(cm, proc_name)
    torch.manual_seed(seed)
    model = model_cls(tiny_config(family, tokenizer, **config_kwargs)).eval()
    processor = proc_cls(image_processor=hf.image_processor, tokenizer=hf.tokenizer, video_processor=hf.video_processor)
    return model, processor


_COLPALI_CLASSES = {
    "qwen3_vl": ("ColQwen3", "ColQwen3Processor"),
    "qwen2_vl": ("ColQwen2", "ColQwen2Processor"),
    "qwen2_5_vl": ("ColQwen2_5", "ColQwen2_5_Processor"),
}


def tiny_pipeline(docs=(), config=None, *, embedder_max_pixels: int = 32 * 32 * 40, reranker_max_pixels: int = 32 * 32 * 12,
                  seed: int = 0, **pipeline_kwargs):
    """A RerankPipeline of a tiny random ColQwen3 embedder and Qwen3-VL MiniReranker (``config``) sharing a pixel
    budget (so the embedder's patch grid is the reranker's visual grid), with ``docs`` added. In memory unless
    ``pipeline_kwargs`` give an ``index``; progress bars off."""
    from .pipeline import RerankPipeline
    from .rerankers import MiniReranker
    from .retrieval import PageIndex
    from .retrieval.embedder import PageEmbedder

    tokenizer = build_tokenizer()
    colqwen, col_proc = tiny_embedder("qwen3_vl", tokenizer, seed=seed, max_pixels=embedder_max_pixels)
    model, processor = tiny_model_and_processor("qwen3_vl", seed=seed, max_pixels=reranker_max_pixels)
    reranker = MiniReranker(model, processor, config)
    embedder = PageEmbedder(colqwen, col_proc, pixel_budget=reranker.pixel_budget)
    pipeline_kwargs.setdefault("dpi", 40)
    pipeline_kwargs.setdefault("show_progress", False)
    index = pipeline_kwargs.pop("index", None) or PageIndex()
    pipe = RerankPipeline(embedder, reranker, index, **pipeline_kwargs)
    if docs:
        pipe.add(list(docs))
    return pipe


def make_pdf(path, sizes_pt: list[tuple[int, int]], seed: int = 0):
    """A real PDF made with pypdfium2: one random picture per page (``sizes_pt``: page sizes in points), filling it."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument.new()
    for i, (w, h) in enumerate(sizes_pt):
        page = pdf.new_page(w, h)
        img = pdfium.PdfImage.new(pdf)
        img.set_bitmap(pdfium.PdfBitmap.from_pil(random_page_image(w, h, seed + i)))
        img.set_matrix(pdfium.PdfMatrix().scale(w, h))
        page.insert_obj(img)
        page.gen_content()
        page.close()
    pdf.save(str(path))
    pdf.close()
    return path


# --- first-stage embedders of other families (colpali-engine), built in code ------------------------------------
def tiny_colpali(tokenizer=None, *, seed: int = 0):
    """A random ColPali (PaliGemma) and its processor: a 56 px SigLIP with 14 px patches, a fixed 4 x 4 grid."""
    import copy

    from colpali_engine.models import ColPali, ColPaliProcessor
    from transformers import PaliGemmaConfig, SiglipImageProcessor

    tok = copy.deepcopy(tokenizer or build_tokenizer())
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<image>"]})
    proc = ColPaliProcessor(image_processor=SiglipImageProcessor(size={"height": 56, "width": 56}, image_seq_length=16),
                            tokenizer=tok)
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=56, patch_size=14),
        text_config=dict(model_type="gemma", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                         pad_token_id=tok.pad_token_id),
        image_token_index=proc.image_token_id, projection_dim=64,
    )
    torch.manual_seed(seed)
    return ColPali(config).eval(), proc


def tiny_colidefics3(tokenizer=None, *, seed: int = 0):
    """A random ColIdefics3 (ColSmol) and its processor: 32 px tiles of 2 x 2 tokens (8 px patches, pixel shuffle 2)
    plus a global view; pages up to 96 px on the long side."""
    import copy

    from colpali_engine.models import ColIdefics3, ColIdefics3Processor
    from transformers import Idefics3Config, Idefics3ImageProcessor

    tok = copy.deepcopy(tokenizer or build_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>",
                                                         "<end_of_utterance>"]})
    ip = Idefics3ImageProcessor(size={"longest_edge": 96}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    proc = ColIdefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
    )
    torch.manual_seed(seed)
    return ColIdefics3(config).eval(), proc


# --- replicas of published checkpoints ---------------------------------------------------------------------------
# Tiny random models saved with the files and the tensor / config key names the published checkpoints use, so the
# library's normal loaders can be tested offline on them. Published checkpoints predate transformers 5 and store
# the pre-5 key layout; each replica rewrites its keys to that layout (the loaders must map them back).
#
#   save_tiny_monoqwen          lightonai/MonoQwen2-VL-v0.1: a LoRA adapter over Qwen/Qwen2-VL-2B-Instruct
#   save_tiny_jina_m0           jinaai/jina-reranker-m0: Qwen2-VL backbone + score.* head, custom modeling.py
#   save_tiny_qwen3_vl_reranker Qwen/Qwen3-VL-Reranker-2B/8B: a plain Qwen3-VL checkpoint (query-first prompt)
#   save_tiny_colqwen2_5        vidore/colqwen2.5-v0.2: a LoRA adapter over vidore/colqwen2.5-base
#   save_tiny_colqwen3          a merged ColQwen3 checkpoint (the key layout ColQwen3's conversion map reads)
#   save_tiny_colpali           vidore/colpali-v1.3: a LoRA adapter over vidore/colpaligemma-3b-pt-448-base
#   save_tiny_colsmol           vidore/colSmol-256M: a LoRA adapter over a ColIdefics3 (SmolVLM) base
#
# An adapter's base is saved beside it (``<path>-base`` unless ``base_path`` is given) and its
# adapter_config.json names the base by absolute path: the published ones name a hub id, unreachable offline.

# Qwen2-VL-*-Instruct's chat template (chat_template.json of the published repositories): a default system turn,
# image and text parts of a user turn concatenated, "<|im_start|>assistant\n" as the generation prompt.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN_LM_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Pre-transformers-5 key layouts, as regex rewrites of the current names.
_LEGACY_QWEN_VL = ((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual."))  # *ForConditionalGeneration
_LEGACY_COLQWEN = ((r"^language_model\.", "model."),)  # ColQwen2 / 2.5: the base model's LM under model.*
_LEGACY_COLQWEN3 = ((r"^visual\.", "model.visual."), (r"^language_model\.", "model.language_model."))
_LEGACY_COLPALI = (
    (r"^model\.model\.language_model\.", "model.language_model.model."),
    (r"^model\.model\.vision_tower\.", "model.vision_tower."),
    (r"^model\.model\.multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^model\.lm_head\.", "model.language_model.lm_head."),
)


def _rename(tensors: dict, rules) -> dict:
    import re

    out = {}
    for name, t in tensors.items():
        for pattern, repl in rules:
            name = re.sub(pattern, repl, name)
        out[name] = t
    return out


def _save_tensors(tensors: dict, path, shards: int = 1) -> None:
    """model.safetensors, or ``shards`` files and model.safetensors.index.json (the hub's sharded layout)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}  # untie shared storage
    if shards <= 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per : (i + 1) * per]
        save_file({k: tensors[k] for k in part}, path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _legacy_qwen2_vl_config(config) -> dict:
    """A Qwen2-VL config as the published (transformers 4) repositories store it: the text model's settings flat at
    the top level, M-RoPE as ``rope_scaling: {"type": "mrope", "mrope_section": [...]}`` plus ``rope_theta``."""
    d = config.to_dict()
    text = d.pop("text_config")
    rope = text.pop("rope_parameters", None) or {}
    for key in ("layer_types", "model_type", "architectures", "transformers_version", "dtype", "_name_or_path"):
        text.pop(key, None)
    flat = {**text, **d, "model_type": "qwen2_vl"}
    flat["torch_dtype"] = flat.pop("dtype", None) or "float32"  # transformers 4's name
    flat.pop("_name_or_path", None)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
    flat["rope_theta"] = rope.get("rope_theta", 10000.0)
    return flat


def _save_model_published(model, path, rules=(), *, config_updates: dict | None = None, drop=(), extra=None,
                          shards: int = 1, legacy_config: bool = False) -> None:
    """config.json (+ generation_config.json when the model has one) and the weights under legacy key names;
    ``legacy_config``: a Qwen2-VL config in its published flat form."""
    import json
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = _legacy_qwen2_vl_config(model.config) if legacy_config else model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config.update(config_updates or {})
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    if getattr(model, "generation_config", None) is not None and getattr(model, "can_generate", lambda: False)():
        model.generation_config.save_pretrained(path)
    tensors = {k: v for k, v in model.state_dict().items() if not any(k.startswith(d) for d in drop)}
    _save_tensors({**_rename(tensors, rules), **(extra or {})}, path, shards)


def _save_processor_published(processor, path) -> None:
    """Processor files as the published (transformers 4) repositories lay them out: preprocessor_config.json,
    the tokenizer's files, chat_template.json when there is a chat template and, for processors with settings of
    their own (Idefics3's image_seq_len), processor_config.json."""
    import json
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    if getattr(processor, "chat_template", None):
        (path / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}, indent=2))
    if getattr(processor, "image_seq_len", None) is not None:
        (path / "processor_config.json").write_text(json.dumps({"image_seq_len": processor.image_seq_len}, indent=2))


def _save_lora_adapter(model, path, base_path, target_modules, task_type: str, rules=(), *, seed: int = 0,
                       rank: int = 4) -> None:
    """A PEFT LoRA adapter over ``model`` (lora_B random, so it changes the outputs) saved as
    adapter_config.json + adapter_model.safetensors, base_model_name_or_path = ``base_path`` (absolute), the
    tensor names rewritten by ``rules`` (applied after the "base_model.model." prefix)."""
    import copy
    import json
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    import warnings

    path = Path(path)
    with warnings.catch_warnings():  # peft's notes on transformers deprecations and on the absent base config
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=target_modules, task_type=task_type, init_lora_weights="gaussian"))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        peft_model.save_pretrained(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(Path(base_path).resolve())
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    prefix = "base_model.model."
    tensors = load_file(path / "adapter_model.safetensors")
    renamed = {prefix + k: v for k, v in _rename({k[len(prefix):]: v for k, v in tensors.items()}, rules).items()}
    save_file(renamed, path / "adapter_model.safetensors", metadata={"format": "pt"})


def merged_adapter_model(path):
    """The model an adapter replica describes, built without the loaders under test: the base loaded by its own
    class (every weight present: no key left unmapped), then each LoRA pair of adapter_model.safetensors added to
    its weight by hand, W += (alpha / r) B A. The reference the library's loading is compared with."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    base_dir = cfg["base_model_name_or_path"]
    arch = json.loads((Path(base_dir) / "config.json").read_text())["architectures"][0]
    if arch.startswith("Col"):
        import colpali_engine.models as cm

        cls = getattr(cm, arch)
    else:
        import transformers

        cls = getattr(transformers, arch)
    model, info = cls.from_pretrained(base_dir, local_files_only=True, output_loading_info=True)
    if info["missing_keys"]:
        raise AssertionError(f"{base_dir}: weights not found under any known name: {sorted(info['missing_keys'])[:5]}")
    modules = dict(model.named_modules())
    # A LoRA name is the module's name in the layout the adapter was saved from: the current one or a legacy one.
    by_legacy = {}
    for rules in ((), _LEGACY_QWEN_VL, _LEGACY_COLQWEN, _LEGACY_COLQWEN3, _LEGACY_COLPALI):
        by_legacy.update({_rename({n: None}, rules).popitem()[0]: m for n, m in modules.items()})
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(Path(path) / "adapter_model.safetensors")
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            by_legacy[name].weight += scale * (b.float() @ a.float()).to(by_legacy[name].weight.dtype)
    return model.eval()


def _base_dir(path, base_path):
    from pathlib import Path

    path = Path(path)
    return Path(base_path) if base_path is not None else path.with_name(path.name + "-base")


def save_tiny_monoqwen(path, base_path=None, *, seed: int = 0, max_pixels: int = 64 * 64 * 4):
    """lightonai/MonoQwen2-VL-v0.1's layout: ``path`` holds adapter_config.json + adapter_model.safetensors (LoRA on
    the LM's projections, pre-5 key names) and no processor; the base (a tiny Qwen2-VL-Instruct: flat config.json,
    pre-5 key names, its processor with Qwen2-VL's chat template) is saved at ``base_path``. Returns ``path``."""
    from pathlib import Path

    path, base = Path(path), _base_dir(path, base_path)
    model, processor = tiny_model_and_processor("qwen2_vl", seed=seed, max_pixels=max_pixels)
    processor.chat_template = QWEN2_VL_CHAT_TEMPLATE
    _save_model_published(model, base, _LEGACY_QWEN_VL, drop=("lm_head.",) if model.config.tie_word_embeddings else (),
                          legacy_config=True)
    _save_processor_published(processor, base)
    _save_lora_adapter(model, path, base, _QWEN_LM_PROJECTIONS, "CAUSAL_LM", _LEGACY_QWEN_VL, seed=seed)
    (path / "README.md").unlink(missing_ok=True)  # peft's model card stub; the published README is prose
    return path


def save_tiny_jina_m0(path, *, seed: int = 0, max_pixels: int = 64 * 64 * 4, shards: int = 1):
    """jinaai/jina-reranker-m0's layout: a flat Qwen2-VL config.json with ``architectures: ["JinaVLForRanking"]``
    and ``auto_map`` pointing at modeling.py, the backbone under pre-5 key names without an LM head, the score head as
    ``score.0.*`` (H x H) and ``score.2.*`` (1 x H), the processor files, and a modeling.py that raises if anything
    imports it (the library must not run remote code). Returns ``path``."""
    from pathlib import Path

    path = Path(path)
    model, processor = tiny_model_and_processor("qwen2_vl", seed=seed, max_pixels=max_pixels)
    hidden = model.config.text_config.hidden_size
    g = torch.Generator().manual_seed(seed + 7)
    head = {
        "score.0.weight": torch.randn(hidden, hidden, generator=g) / hidden**0.5,
        "score.0.bias": torch.randn(hidden, generator=g) * 0.1,
        "score.2.weight": torch.randn(1, hidden, generator=g) / hidden**0.5,
        "score.2.bias": torch.randn(1, generator=g) * 0.1,
    }
    _save_model_published(model, path, _LEGACY_QWEN_VL, drop=("lm_head.",), extra=head, shards=shards, legacy_config=True,
                          config_updates={"architectures": ["JinaVLForRanking"],
                                          "auto_map": {"AutoModel": "modeling.JinaVLForRanking"}})
    _save_processor_published(processor, path)
    (path / "modeling.py").write_text(
        '"""Stand-in for jina-reranker-m0\'s modeling.py in a test replica: executing it is a bug."""\n'
        'raise RuntimeError("remote code of the jina-reranker-m0 replica was executed")\n')
    return path


def save_tiny_qwen3_vl_reranker(path, *, seed: int = 0, max_pixels: int = 64 * 64 * 4):
    """Qwen/Qwen3-VL-Reranker-2B's layout: a plain Qwen3VLForConditionalGeneration checkpoint (config.json,
    model.safetensors under transformers-5 names, as the Qwen3-VL repositories store them) with its processor. Name
    the folder like the published one (".../Qwen3-VL-Reranker-2B") for the loader to recognise its prompt. Returns
    ``path``."""
    from pathlib import Path

    path = Path(path)
    model, processor = tiny_model_and_processor("qwen3_vl", seed=seed, max_pixels=max_pixels)
    _save_model_published(model, path, drop=("lm_head.",) if model.config.tie_word_embeddings else ())
    _save_processor_published(processor, path)
    return path


def save_tiny_colqwen2_5(path, base_path=None, *, seed: int = 0, max_pixels: int = 28 * 28 * 24):
    """vidore/colqwen2.5-v0.2's layout: ``path`` holds adapter_config.json + adapter_model.safetensors (LoRA on the
    LM's projections and custom_text_proj, colpali's target regex, pre-5 names) and the processor files; the base
    (vidore/colqwen2.5-base: ``architectures: ["ColQwen2_5"]``, keys ``model.*``, ``visual.*``,
    ``custom_text_proj.*``) at ``base_path``. Returns ``path``."""
    from pathlib import Path

    path, base = Path(path), _base_dir(path, base_path)
    model, processor = tiny_embedder("qwen2_5_vl", seed=seed, max_pixels=max_pixels)
    _save_model_published(model, base, _LEGACY_COLQWEN)
    _save_processor_published(processor, base)
    _save_lora_adapter(model, path, base, "(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|"
                       ".*(custom_text_proj).*$)", "FEATURE_EXTRACTION", _LEGACY_COLQWEN, seed=seed)
    _save_processor_published(processor, path)
    return path


def save_tiny_colqwen3(path, *, seed: int = 0, max_pixels: int = 32 * 32 * 24):
    """A merged ColQwen3 checkpoint: ``architectures: ["ColQwen3"]``, keys ``model.visual.*``,
    ``model.language_model.*`` and ``custom_text_proj.*`` (what ColQwen3's checkpoint conversion map reads), and
    the processor files. Returns ``path``."""
    from pathlib import Path

    path = Path(path)
    model, processor = tiny_embedder("qwen3_vl", seed=seed, max_pixels=max_pixels)
    _save_model_published(model, path, _LEGACY_COLQWEN3)
    _save_processor_published(processor, path)
    return path


def save_tiny_colpali(path, base_path=None, *, seed: int = 0):
    """vidore/colpali-v1.3's layout: a LoRA adapter (language model projections and custom_text_proj, pre-5 names)
    with the processor files at ``path``; the base (vidore/colpaligemma-3b-pt-448-base: ``architectures:
    ["ColPali"]``, keys ``model.language_model.model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
    ``custom_text_proj.*``) at ``base_path``. Returns ``path``."""
    from pathlib import Path

    path, base = Path(path), _base_dir(path, base_path)
    model, processor = tiny_colpali(seed=seed)
    _save_model_published(model, base, _LEGACY_COLPALI)
    _save_processor_published(processor, base)
    _save_lora_adapter(model, path, base, "(.*(language_model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|"
                       "o_proj).*$|.*(custom_text_proj).*$)", "FEATURE_EXTRACTION", _LEGACY_COLPALI, seed=seed)
    _save_processor_published(processor, path)
    return path


def save_tiny_colsmol(path, base_path=None, *, seed: int = 0):
    """vidore/colSmol-256M's layout: a LoRA adapter (text model projections and the ``linear`` projection) with the
    processor files (processor_config.json carries image_seq_len) at ``path``; the ColIdefics3 base
    (``architectures: ["ColIdefics3"]``, keys ``model.*``, ``linear.*``) at ``base_path``. Returns ``path``."""
    from pathlib import Path

    path, base = Path(path), _base_dir(path, base_path)
    model, processor = tiny_colidefics3(seed=seed)
    _save_model_published(model, base)
    _save_processor_published(processor, base)
    _save_lora_adapter(model, path, base, "(.*(text_model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|"
                       "o_proj).*$|.*(linear).*$)", "FEATURE_EXTRACTION", seed=seed)
    _save_processor_published(processor, path)
    return path
