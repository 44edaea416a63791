"""Shared plumbing of the training stages: device/precision/threads, resumable checkpoints, logging, batches.

Checkpoints hold no pickles: tensors (model, optimizer moments) go to safetensors, everything else to JSON, so a
checkpoint directory can be inspected and resumed safely. Batches are drawn from `random.Random(f"{seed}:{step}")`,
so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from ..fileio import recover_dir, replace_dir, write_json


# --- runtime ------------------------------------------------------------------------------------------------
def add_runtime_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps (default: cpu)")
    ap.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                    help="autocast precision; auto = bf16 on cuda, none on cpu (see MODEL_CARD.md: on CPUs without "
                         "native bf16 matmuls autocast is slower than float32)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice; on a shared, oversubscribed CPU 1 is fastest)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


def setup_runtime(args) -> tuple[torch.device, torch.dtype | None]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = args.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return device, (torch.bfloat16 if amp == "bf16" else None)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- schedule -----------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, max_norm: float = 1.0) -> None:
    """One update: backward, clip the gradient norm of `params`, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# --- checkpoints --------------------------------------------------------------------------------------------
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = t
    for name, v in meta["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(ckpt_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None, step: int, extra: dict | None = None) -> None:
    """Atomically write model + optimizer + step to `ckpt_dir` (a temp dir renamed over the old one)."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _save_shared_safe(state, tmp / "model.safetensors")
    meta = {"step": step, "time": time.time(), **(extra or {})}
    if opt is not None:
        t, m = _flatten_optimizer(opt)
        save_file(t, str(tmp / "optimizer.safetensors"))
        meta["optimizer"] = m
    write_json(tmp / "state.json", meta)
    replace_dir(tmp, ckpt_dir)


def _save_shared_safe(state: dict[str, torch.Tensor], path: Path) -> None:
    # Tied weights share storage; safetensors refuses aliases, so store each storage once and clone the rest.
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    save_file(out, str(path))


def has_checkpoint(ckpt_dir: Path) -> bool:
    """Whether `ckpt_dir` holds a checkpoint written by save_checkpoint (one interrupted between its two renames
    is recovered first): a run that resumes from it must not redo what the checkpoint already holds."""
    ckpt_dir = Path(ckpt_dir)
    recover_dir(ckpt_dir)
    return (ckpt_dir / "state.json").exists()


def load_checkpoint(ckpt_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> dict | None:
    """Restore a checkpoint written by save_checkpoint; returns its state.json (None if there is none)."""
    ckpt_dir = Path(ckpt_dir)
    if not has_checkpoint(ckpt_dir):
        return None
    meta = json.loads((ckpt_dir / "state.json").read_text())
    missing, unexpected = model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")), strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if opt is not None and "optimizer" in meta:
        opt.load_state_dict(_unflatten_optimizer(load_file(str(ckpt_dir / "optimizer.safetensors")), meta["optimizer"]))
    return meta


class Logger:
    """Appends one JSON line per event to `path` and echoes a short line to stdout."""

    def __init__(self, path: Path, quiet: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        self.t0 = time.time()

    def __call__(self, **event) -> None:
        event = {"t": round(time.time() - self.t0, 1), **event}
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
        if not self.quiet:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items()), flush=True)


def progress(total: int, initial: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=quiet, mininterval=15, unit="step")
