"""device="auto" / dtype="auto": the selection logic, tested on the CPU by pretending other devices exist."""

import pytest
import torch

from minirerank_core import ConfigError, MiniReranker, RerankConfig
from minirerank_core.engine.devices import resolve_device, resolve_dtype


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"  # explicit devices pass through
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu-7")


def test_auto_dtype_is_bf16_where_supported_and_fp32_on_the_cpu(monkeypatch):
    assert resolve_dtype("auto", "cpu") == "float32"  # measured: bf16 is emulated (slow) without AVX-512-BF16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda:0") == "float16"
    assert resolve_dtype("auto", "mps") == "float16"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"  # explicit wins
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype("int4", "cpu")


def test_configs_resolve_auto_on_this_machine(tiny):
    cfg = RerankConfig().resolve(8)
    assert cfg.device == resolve_device("auto") and cfg.dtype == resolve_dtype("auto", cfg.device)
    model, proc = tiny("qwen3_vl")
    r = MiniReranker(model, proc)  # defaults: auto, auto
    assert r.config.device == "cpu" and r.config.dtype == "float32" and r.model.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_equal_cpu_scores(page_images):
    from minirerank_core import testing as T

    model, proc = T.tiny_model_and_processor("qwen3_vl", max_pixels=200 * 200)  # its own: it moves to the GPU
    cpu = MiniReranker(model, proc, RerankConfig(device="cpu")).score("q", page_images)
    gpu = MiniReranker(model, proc, RerankConfig(device="cuda", dtype="float32")).score("q", page_images)
    assert gpu == pytest.approx(cpu, rel=1e-3, abs=1e-4)
