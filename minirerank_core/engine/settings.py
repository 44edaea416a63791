"""`minirerank_config.json`: the settings a reranker checkpoint was trained or saved with, next to its weights.

One file format for everything that writes a reranker directory (`MiniReranker.save_pretrained`, the training
stages, the shipped defaults) and one reader for everything that loads one (`minirerank_core.rerankers.loading`):

    {"format": "minirerank-config/1",
     "config":   {RerankConfig fields: exit_layer, band, keep_ratio, query_positions, shared_offset, ...},
     "template": {"prefix", "query", "positive", "negative"},
     "listwise": {"mode", "configs": {mode: ListwiseConfig fields}, "template": {...}}   (optional)
     ...        free-form metadata (e.g. "training": how and how long it was trained)}

"config" and "template" describe the point-wise reranker; a listwise checkpoint may carry neither. The "listwise"
block is kept as a plain dict here (the engine does not know ListwiseConfig) and is parsed by
`minirerank_core.rerankers.listwise.settings`; a reader that predates it sees it as free-form metadata.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..fileio import format_tag, read_json, write_json
from .config import RerankConfig
from .prompt import PromptTemplate

SETTINGS_FILE = "minirerank_config.json"
SETTINGS_FORMAT = format_tag("config", 1)


@dataclass(frozen=True)
class SavedSettings:
    config: RerankConfig | None = None
    template: PromptTemplate | None = None
    extra: dict = field(default_factory=dict)
    listwise: dict | None = None  # the raw "listwise" block (rerankers.listwise.settings reads it)


def write_settings(directory: str | Path, config: RerankConfig | None, template: PromptTemplate | None, *,
                   name: str | None = None, listwise: dict | None = None, **extra) -> Path:
    """Write `minirerank_config.json` (or `name`) in `directory` atomically (a reader never sees a half-written
    file). The device is not saved: it belongs to the machine that loads the checkpoint, not to the checkpoint.
    `config` / `template` None leave them out (a listwise-only checkpoint); `listwise`: the listwise block."""
    doc: dict = {}
    if config is not None:
        doc["config"] = {k: v for k, v in config.to_dict().items() if k != "device"}
    if template is not None:
        doc["template"] = asdict(template)
    if listwise is not None:
        doc["listwise"] = listwise
    return write_json(Path(directory) / (name or SETTINGS_FILE), {**doc, **extra}, format=SETTINGS_FORMAT)


def read_settings(directory: str | os.PathLike[str] | None) -> SavedSettings:
    """The settings saved in `directory` (or in the settings file `directory` names); empty settings if it holds no
    `minirerank_config.json` (a plain HF checkpoint, a hub id, or None). A file that is unreadable, of another
    format or with unknown fields raises ConfigError."""
    if directory is not None and Path(directory).is_file():
        path = Path(directory)
    elif directory is None or not Path(directory).is_dir():
        return SavedSettings()
    else:
        path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        return SavedSettings()
    doc = read_json(path, format=SETTINGS_FORMAT)
    try:
        config = RerankConfig.from_dict(doc["config"]) if doc.get("config") is not None else None
        template = PromptTemplate(**doc["template"]) if doc.get("template") is not None else None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    listwise = doc.get("listwise")
    if listwise is not None and not isinstance(listwise, dict):
        raise ConfigError(f"{path}: 'listwise' must be an object, got {type(listwise).__name__}")
    extra = {k: v for k, v in doc.items() if k not in ("format", "config", "template", "listwise")}
    return SavedSettings(config, template, extra, listwise)
