"""`minirerank_config.json`: the settings a reranker checkpoint was trained or saved with, next to its weights.

One file format for everything that writes a reranker directory (`MiniReranker.save_pretrained`, the training
stages, the shipped defaults) and one reader for everything that loads one (`MiniReranker.from_pretrained`, the
CLI, the integrations, `minirerank_core.defaults`):

    {"format": "minirerank-config/1",
     "config":   {RerankConfig fields: exit_layer, band, keep_ratio, query_positions, shared_offset, ...},
     "template": {"prefix", "query", "positive", "negative"},
     ...        free-form metadata (e.g. "training": how and how long it was trained)}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .config import RerankConfig
from .prompt import PromptTemplate

SETTINGS_FILE = "minirerank_config.json"
SETTINGS_FORMAT = "minirerank-config/1"


@dataclass(frozen=True)
class SavedSettings:
    config: RerankConfig | None = None
    template: PromptTemplate | None = None
    extra: dict = field(default_factory=dict)


def write_settings(directory: str | Path, config: RerankConfig, template: PromptTemplate, **extra) -> Path:
    """Write `minirerank_config.json` atomically (a reader never sees a half-written file). The device is not
    saved: it belongs to the machine that loads the checkpoint, not to the checkpoint."""
    path = Path(directory) / SETTINGS_FILE
    fields = {k: v for k, v in config.to_dict().items() if k != "device"}
    doc = {"format": SETTINGS_FORMAT, "config": fields, "template": asdict(template), **extra}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_settings(directory: str | Path) -> SavedSettings:
    """The settings saved in `directory`; empty settings if it holds no `minirerank_config.json` (a plain HF
    checkpoint). A file that is unreadable, of another format or with unknown fields raises ConfigError."""
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        return SavedSettings()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format", SETTINGS_FORMAT) != SETTINGS_FORMAT:
        raise ConfigError(f"{path}: not a {SETTINGS_FORMAT} file")
    try:
        config = RerankConfig.from_dict(doc["config"]) if doc.get("config") is not None else None
        template = PromptTemplate(**doc["template"]) if doc.get("template") is not None else None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    extra = {k: v for k, v in doc.items() if k not in ("format", "config", "template")}
    return SavedSettings(config, template, extra)


def saved_config(model: str | os.PathLike[str] | None) -> RerankConfig | None:
    """The RerankConfig a checkpoint directory was trained / saved with, so that callers overriding one field
    (a device, a keep ratio from a CLI flag) keep the others. `None` means the shipped default model; a hub id or
    a directory without settings gives None."""
    if model is None:
        from ..defaults import DEFAULT_RERANKER_DIR as model  # noqa: N811
    if not Path(model).is_dir():
        return None
    return read_settings(model).config
