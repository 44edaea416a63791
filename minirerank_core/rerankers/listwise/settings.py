"""The listwise settings a checkpoint was trained with, in its `minirerank_config.json` (engine.settings' format):

    "listwise": {"mode": "single_pass",                           the mode a plain from_pretrained() runs
                 "configs": {"single_pass": {ListwiseConfig fields}, "cached": {...}},   one per trained layout
                 "template": {ListwiseTemplate fields}}

One model can be trained for both layouts (ZipRerank's single pass and the cached vision-first variant); each
layout keeps its own keep ratio, pruning rule and, for cached, exit layer and band. The device is never saved.
The point-wise "config" / "template" of the same file are untouched, so one folder can carry both heads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...engine.settings import read_settings, write_settings
from ...errors import ConfigError
from .config import ListwiseConfig
from .prompt import DEFAULT_LISTWISE_TEMPLATE, ListwiseTemplate


@dataclass(frozen=True)
class ListwiseSettings:
    configs: dict[str, ListwiseConfig] = field(default_factory=dict)  # by mode
    mode: str = "single_pass"
    template: ListwiseTemplate = DEFAULT_LISTWISE_TEMPLATE

    def config(self, mode: str | None = None) -> ListwiseConfig:
        """The saved config of `mode` (default: the saved default mode); ListwiseConfig(mode=mode) if that layout
        was not saved."""
        mode = mode or self.mode
        return self.configs.get(mode) or ListwiseConfig(mode=mode)

    def to_dict(self) -> dict:
        configs = {m: {k: v for k, v in c.to_dict().items() if k != "device"} for m, c in self.configs.items()}
        return {"mode": self.mode, "configs": configs, "template": asdict(self.template)}

    @classmethod
    def from_dict(cls, block: dict) -> "ListwiseSettings":
        try:
            configs = {m: ListwiseConfig.from_dict(c) for m, c in (block.get("configs") or {}).items()}
            template = ListwiseTemplate(**block["template"]) if block.get("template") else DEFAULT_LISTWISE_TEMPLATE
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"listwise settings: {exc}") from exc
        for m, c in configs.items():
            if c.mode != m:
                raise ConfigError(f"listwise settings: the config saved under {m!r} has mode {c.mode!r}")
        mode = block.get("mode") or next(iter(configs), "single_pass")
        if mode not in ("single_pass", "cached"):
            raise ConfigError(f"listwise settings: mode must be 'single_pass' or 'cached', got {mode!r}")
        return cls(configs, mode, template)


def listwise_settings(configs: Sequence[ListwiseConfig], template: ListwiseTemplate = DEFAULT_LISTWISE_TEMPLATE,
                      mode: str | None = None) -> ListwiseSettings:
    """Settings holding one config per layout; `mode` (default: the first config's) is what from_pretrained runs."""
    by_mode = {c.mode: c for c in configs}
    if len(by_mode) != len(configs):
        raise ConfigError("one listwise config per mode")
    mode = mode or (configs[0].mode if configs else "single_pass")
    if configs and mode not in by_mode:
        raise ConfigError(f"default mode {mode!r} has no config among {sorted(by_mode)}")
    return ListwiseSettings(by_mode, mode, template)


def write_listwise_settings(directory: str | Path, settings: ListwiseSettings, **extra) -> Path:
    """Add (or replace) the listwise block of `directory`'s minirerank_config.json, keeping what else it holds."""
    saved = read_settings(directory)
    return write_settings(directory, saved.config, saved.template, listwise=settings.to_dict(), **{**saved.extra, **extra})


def read_listwise_settings(directory: str | os.PathLike[str] | None) -> ListwiseSettings | None:
    """The listwise settings saved in `directory`, None when it has none (a hub id, a plain or point-wise checkpoint)."""
    block = read_settings(directory).listwise
    return None if block is None else ListwiseSettings.from_dict(block)


__all__ = ["ListwiseSettings", "listwise_settings", "read_listwise_settings", "write_listwise_settings"]
