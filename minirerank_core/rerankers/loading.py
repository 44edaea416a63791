"""Loading a reranker checkpoint once, for either reranker: the model, its processor, its saved settings and, for a
published reranker, the prompt and head its own code scores with.

Layouts recognised, in this order (the first that applies wins):

* a minirerank checkpoint: HF files + ``minirerank_config.json`` (config and prompt it was trained with);
* a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``, no ``config.json``; e.g.
  lightonai/MonoQwen2-VL-v0.1 over Qwen/Qwen2-VL-2B-Instruct): transformers loads the base named by
  ``base_model_name_or_path`` and applies the adapter (peft); the processor comes from the adapter folder if it has
  one, else from the base;
* jina-reranker-m0 (``architectures: ["JinaVLForRanking"]``, custom ``modeling.py``): loaded WITHOUT executing its
  remote code. The backbone is a plain ``Qwen2VLForConditionalGeneration`` (its LM head, which the published model
  replaces with Identity, is dropped) and the ``score.*`` tensors become a :class:`~..engine.prompt.JinaM0Head`;
  the prompt is :data:`~..engine.prompt.JINA_M0_TEMPLATE` (document first: vision-first);
* any other Qwen-VL ``*ForConditionalGeneration`` checkpoint.

A published checkpoint whose files do not say which prompt it was trained with is recognised by its name (hub id or
path, case-insensitive; see ``PUBLISHED``): "monoqwen" → ``MONOQWEN_TEMPLATE``; "qwen3-vl-reranker" →
``QWEN3_VL_RERANKER_TEMPLATE``, a query-first prompt: such a model loads (e.g. as a distillation teacher, scored
exactly by :meth:`Checkpoint.dense_scores`) but cannot back the cached rerankers, which raise ConfigError saying
so. A renamed copy needs ``template=`` passed explicitly. Where the published code resizes pages into its own
pixel budget (jina-reranker-m0, Qwen3-VL-Reranker), the processor is set to that budget.

A local path never touches the network. A hub id downloads when a network is there; offline
(``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) and not in the local cache, it raises
:class:`ModelNotFoundError` naming the id.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.devices import DTYPES, resolve_device, resolve_dtype
from ..engine.prompt import (
    DEFAULT_TEMPLATE,
    JINA_M0_TEMPLATE,
    MONOQWEN_TEMPLATE,
    QWEN3_VL_RERANKER_TEMPLATE,
    JinaM0Head,
    NoLMHead,
    PromptTemplate,
    QueryFirstTemplate,
    YesNoHead,
    label_token_id,
)
from ..engine.settings import SavedSettings, read_settings
from ..errors import ConfigError, ModelNotFoundError

logger = logging.getLogger("minirerank")


@dataclass(frozen=True)
class Published:
    """What a published reranker's own code uses beyond its files: its prompt and, when its code resizes pages
    itself, the pixel budget (min, max) it resizes into."""

    template: PromptTemplate | QueryFirstTemplate
    pixels: tuple[int, int] | None = None


# Name fragments (lower case) of published checkpoints whose files do not carry their prompt.
PUBLISHED: tuple[tuple[str, Published], ...] = (
    ("monoqwen", Published(MONOQWEN_TEMPLATE)),  # model card: the base's processor as it is
    # src/models/qwen3_vl_reranker.py: MIN_PIXELS = 4 * 32 * 32, MAX_PIXELS = 1800 * 32 * 32 (qwen_vl_utils resize)
    ("qwen3-vl-reranker", Published(QWEN3_VL_RERANKER_TEMPLATE, (4 * 32 * 32, 1800 * 32 * 32))),
)
# modeling.py, compute_score: AutoProcessor.from_pretrained(..., max_pixels=602112, min_pixels=3136)
JINA_M0 = Published(JINA_M0_TEMPLATE, (3136, 602112))
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    ``settings``: those of its ``minirerank_config.json``; for a published checkpoint without one, the prompt its
    own code uses (``settings.template``, None when unknown). ``head``: the checkpoint's own score head when it is
    not yes/no over the LM head (jina-reranker-m0), else None. ``layout``: "minirerank", "peft-adapter",
    "jina-reranker-m0" or "hf".
    """

    model: torch.nn.Module
    processor: Any
    settings: SavedSettings
    name: str
    head: torch.nn.Module | None = None
    layout: str = "hf"
    base: str | None = field(default=None)  # the base model of a PEFT adapter

    @property
    def template(self) -> PromptTemplate | QueryFirstTemplate:
        """The prompt this checkpoint scores with (the default prompt when nothing says otherwise)."""
        return self.settings.template or DEFAULT_TEMPLATE

    @property
    def vision_first(self) -> bool:
        """Whether the page comes before the query (required to cache and reuse page KV)."""
        return self.template.vision_first

    def score_head(self) -> torch.nn.Module:
        """The checkpoint's own head, else yes/no (the template's labels) over its LM head."""
        if self.head is not None:
            return self.head
        tok = self.processor.tokenizer
        t = self.template
        return YesNoHead(self.model.lm_head, label_token_id(tok, t.positive), label_token_id(tok, t.negative))

    def dense_scores(self, query: str, images: list, batch_size: int = 8) -> list[float]:
        """The checkpoint's own scoring: one plain HF forward of its prompt per page, the head on the last token.
        Exact for any prompt, query-first included (the way to use Qwen3-VL-Reranker, e.g. as a teacher)."""
        from ..engine.reference import dense_scores
        from ..pages import as_pages
        from ..validation import check_query

        imgs = [p.image() for p in as_pages(list(images))]
        return dense_scores(self.model.eval(), self.processor, self.template, self.score_head(), check_query(query),
                            imgs, batch_size).tolist()


def checkpoint_path(path_or_id: str | os.PathLike[str] | None) -> str:
    """``path_or_id``, or the default reranker shipped in the package for None."""
    if path_or_id is None:
        from ..defaults import DEFAULT_RERANKER_DIR

        return str(DEFAULT_RERANKER_DIR)
    return os.fspath(path_or_id)


_TOY_SAID = False
TOY_NOTE = ("the shipped default models are toys (MODEL_CARD.md): they read only the typewriter-rendered documentation "
            "pages they were trained on and rank real documents at chance. For real documents load a real checkpoint, "
            "e.g. MiniReranker.from_pretrained('lightonai/MonoQwen2-VL-v0.1') or `--model PATH` (README: Real documents)")


def say_toy_once(name: str) -> None:
    """Warn once per process when the shipped toy reranker is loaded."""
    global _TOY_SAID
    from ..defaults import ASSETS_DIR

    if _TOY_SAID or not Path(name).resolve().is_relative_to(ASSETS_DIR.resolve()):
        return
    _TOY_SAID = True
    import warnings

    from ..errors import ToyModelWarning

    logger.info("minirerank: %s", TOY_NOTE)
    warnings.warn(f"minirerank: {TOY_NOTE}", ToyModelWarning, stacklevel=4)


def load_checkpoint(path_or_id: str | os.PathLike[str] | None = None, *, dtype: str | None = None,
                    device: str | None = None, local_files_only: bool | None = None, **hf_kwargs: Any) -> Checkpoint:
    """Load a Qwen-VL reranker checkpoint by local path (never touches the network), hub id, or None for the
    shipped default (layouts: see the module docstring). ``dtype``: the weights' dtype ("auto": bf16 on a GPU that
    supports it, float32 on the CPU; default: the saved settings', else "auto"), resolved for ``device``.
    ``hf_kwargs`` go to the model's ``from_pretrained`` (``device_map``, ``quantization_config``, ``revision``,
    ``token``, ``attn_implementation``, ``trust_remote_code``: only what the caller passes); remote code is never run
    unless the caller passes ``trust_remote_code=True``."""
    from transformers import AutoModelForImageTextToText

    name = checkpoint_path(path_or_id)
    settings = read_settings(name)  # empty for a hub id or a plain HF checkpoint
    dtype = resolve_dtype(dtype or (settings.config.dtype if settings.config is not None else "auto"),
                          resolve_device(device))
    hf_kwargs = {k: v for k, v in hf_kwargs.items() if v is not None}
    hf_kwargs.setdefault("attn_implementation", "sdpa")  # takes the engine's explicit masks
    offline = _offline(name, local_files_only)
    hub = {k: hf_kwargs[k] for k in ("revision", "token") if k in hf_kwargs}
    files = hub_files(name, ("config.json", "adapter_config.json"), offline, what="reranker checkpoint", **hub)
    kw = dict(dtype=DTYPES[dtype], local_files_only=offline, **hf_kwargs)
    head, base, layout = None, None, "minirerank" if settings.config or settings.template else "hf"

    if files["config.json"] is None:  # a PEFT adapter: transformers loads its base and applies it
        base = adapter_base(name, files["adapter_config.json"], local_files_only)
        # One flag serves both folders: a local folder is never fetched, so only the base's need counts.
        kw["local_files_only"] = offline and _offline(base, local_files_only)
        model = AutoModelForImageTextToText.from_pretrained(name, **kw)
        layout = "peft-adapter" if layout == "hf" else layout
    elif "JinaVLForRanking" in (_read_json(files["config.json"]).get("architectures") or []):
        model, head = _load_jina_m0(name, kw)
        layout = "jina-reranker-m0" if layout == "hf" else layout
    else:
        model = AutoModelForImageTextToText.from_pretrained(name, **kw)
    processor = load_processor(name, base, local_files_only, **hub)

    if settings.template is None:
        published = JINA_M0 if head is not None else published_settings(name)
        if published is not None:
            settings = SavedSettings(settings.config, published.template, settings.extra)
            if published.pixels is not None:
                _set_pixels(processor.image_processor, *published.pixels)
    if not (settings.template or DEFAULT_TEMPLATE).vision_first:
        logger.warning("%s: %s", name, settings.template.cache_error())
    say_toy_once(name)
    return Checkpoint(model, processor, settings, name, head=head, layout=layout, base=base)


def published_settings(name: str) -> Published | None:
    """What the published checkpoint named ``name`` scores with (see PUBLISHED), else None. A hub id is matched as
    a whole; a local path by its folder name, or by the repository folder of a Hugging Face cache snapshot
    (``models--org--name/snapshots/<revision>``), never by the folders it happens to sit in."""
    path = Path(name)
    if not path.exists():
        names = [name]
    else:
        parts = path.resolve().parts
        names = [parts[-1], *(p for p in parts if p.startswith("models--"))]
    for candidate in names:
        lowered = candidate.lower().replace("_", "-")
        for fragment, published in PUBLISHED:
            if fragment in lowered:
                return published
    return None


def _set_pixels(image_processor, min_pixels: int, max_pixels: int) -> None:
    """Set a Qwen-VL image processor's pixel budget (transformers 5 keeps it in ``size``; older in attributes)."""
    if getattr(image_processor, "size", None) is not None:
        image_processor.size["shortest_edge"] = min_pixels
        image_processor.size["longest_edge"] = max_pixels
    for attr, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if getattr(image_processor, attr, None) is not None:
            setattr(image_processor, attr, value)


# --- files, hub ids and errors --------------------------------------------------------------------------------
def _offline(name: str, local_files_only: bool | None) -> bool:
    """Whether loading ``name`` stays off the network: a local path always does; a hub id unless told."""
    return Path(name).exists() if local_files_only is None else local_files_only


def hub_files(name: str, filenames: tuple[str, ...], offline: bool, *, what: str = "checkpoint",
              required: bool = True, revision: str | None = None, token: str | bool | None = None) -> dict[str, str | None]:
    """Where each of ``filenames`` is: a local path (for a hub id, downloaded when online), or None for a file the
    checkpoint does not have. ``required``: raise ModelNotFoundError naming ``name`` when it has none of them or
    cannot be reached (else every entry is None)."""
    from transformers.utils import cached_file

    path = Path(name)
    if path.is_dir():
        found = {f: str(path / f) if (path / f).is_file() else None for f in filenames}
    elif path.exists():
        if not required:
            return dict.fromkeys(filenames)
        raise ModelNotFoundError(f"{what} {name!r} is a file, not a checkpoint directory")
    else:
        found = {}
        for f in filenames:
            try:
                found[f] = cached_file(name, f, local_files_only=offline, revision=revision, token=token,
                                       _raise_exceptions_for_missing_entries=False,
                                       _raise_exceptions_for_connection_errors=False)
            except (OSError, ValueError) as exc:  # an invalid repo id, a gated or missing repository
                if not required:
                    return dict.fromkeys(filenames)
                raise ModelNotFoundError(_not_found(what, name, filenames, offline, exc)) from exc
    if required and not any(found.values()):
        raise ModelNotFoundError(_not_found(what, name, filenames, offline))
    return found


def _not_found(what: str, name: str, filenames: tuple[str, ...], offline: bool, exc: Exception | None = None) -> str:
    from huggingface_hub import is_offline_mode

    if Path(name).is_dir():
        return f"{what} {name!r}: the directory has none of {', '.join(filenames)}"
    if is_offline_mode():
        why = "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache"
    elif offline:
        why = "local_files_only=True and it is not in the local cache"
    else:
        why = "it could not be fetched from the Hugging Face Hub (no such repository, no access, or no network)"
    detail = f" ({str(exc).splitlines()[0]})" if exc is not None and str(exc) else ""
    return (f"cannot load {what} {name!r}: no such local directory, and {why}{detail}. Pass a local path, or "
            f"download it first (huggingface-cli download {name}).")


def adapter_base(name: str, adapter_config: str, local_files_only: bool | None) -> str:
    """The base model a PEFT adapter names, checked to be loadable (ModelNotFoundError naming both otherwise)."""
    base = _read_json(adapter_config).get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(f"PEFT adapter {name!r}: adapter_config.json names no base_model_name_or_path")
    try:
        hub_files(base, ("config.json",), _offline(base, local_files_only), what="base model")
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"PEFT adapter {name!r}: {exc} The adapter's adapter_config.json names this base "
                                 "(base_model_name_or_path); point it at a local copy to load offline.") from exc
    try:
        import peft  # noqa: F401 - transformers applies adapters through peft
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ConfigError(f"{name!r} is a PEFT adapter; loading it needs the peft package") from exc
    return base


def load_processor(name: str, base: str | None, local_files_only: bool | None, *, revision: str | None = None,
                   token: str | bool | None = None):
    """The checkpoint's processor; an adapter folder without processor files uses its base's."""
    from transformers import AutoProcessor

    source, hub = name, {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    if base is not None and not any(hub_files(name, _PROCESSOR_FILES, _offline(name, local_files_only),
                                              required=False, **hub).values()):
        source, hub = base, {}
    return AutoProcessor.from_pretrained(source, local_files_only=_offline(source, local_files_only), **hub)


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable JSON ({exc})") from exc


# --- jina-reranker-m0 -------------------------------------------------------------------------------------------
def _load_jina_m0(name: str, kw: dict) -> tuple[torch.nn.Module, JinaM0Head]:
    """Backbone as a plain Qwen2VLForConditionalGeneration, head from the checkpoint's ``score.*`` tensors."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    offline = kw["local_files_only"]
    kw = {k: v for k, v in kw.items() if k != "trust_remote_code"}  # a concrete class: no remote code to trust
    config = Qwen2VLConfig.from_pretrained(name, local_files_only=offline)
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    config.auto_map = None  # its modeling.py is never imported
    # The checkpoint has no LM head (the published model replaces it with Identity): tie it to the embeddings so
    # nothing is randomly initialised while loading, then drop it.
    config.tie_word_embeddings = True
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the score.* tensors are "unused" by the backbone: read below
    try:
        model = Qwen2VLForConditionalGeneration.from_pretrained(name, config=config, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.tie_word_embeddings = False
    model.lm_head = NoLMHead(f"{name}: jina-reranker-m0 has no LM head to read yes/no logits from; score it with "
                             "its own head (Checkpoint.head, a JinaM0Head)")
    head = JinaM0Head.from_state_dict(_read_tensors(name, "score.", offline))
    return model, head


def _read_tensors(name: str, prefix: str, offline: bool) -> dict[str, torch.Tensor]:
    """Tensors whose names start with ``prefix`` from a (possibly sharded) safetensors checkpoint."""
    from safetensors import safe_open

    files = hub_files(name, ("model.safetensors.index.json", "model.safetensors"), offline)
    if files["model.safetensors.index.json"] is not None:
        weight_map = _read_json(files["model.safetensors.index.json"])["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
        paths = [hub_files(name, (s,), offline)[s] for s in shards]
    else:
        paths = [files["model.safetensors"]]
    out: dict[str, torch.Tensor] = {}
    for p in paths:
        with safe_open(p, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
    return out


__all__ = ["Checkpoint", "ModelNotFoundError", "PUBLISHED", "Published", "checkpoint_path", "hub_files",
           "load_checkpoint", "published_settings"]
