"""engine/kv.py plumbing that reimplements part of an HF layer: checked against the layer itself, per family."""

import pytest
import torch

from minirerank_core.engine.families import adapter_for
from minirerank_core.engine.kv import PastKV, additive_mask, causal, run_layer_tail, run_layers
from minirerank_core.engine.prefill import text_positions

from tests.helpers import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_last", [0, 1, 3])
def test_run_layer_tail_equals_the_layers_forward(tiny, family, n_last):
    """The last rows' outputs and every row's recorded keys/values equal the decoder layer's own forward."""
    model, _ = tiny(family)
    a = adapter_for(model)
    g = torch.Generator().manual_seed(0)
    B, P, S = 2, 4, 7
    past = [(torch.randn(B, a.num_kv_heads, P, a.head_dim, generator=g),
             torch.randn(B, a.num_kv_heads, P, a.head_dim, generator=g)) for _ in range(a.num_layers)]
    hidden = torch.randn(B, S, a.hidden_size, generator=g)
    cos_sin = a.rotary(hidden, text_positions(P, S)[:, None].expand(3, B, S))
    allowed = torch.cat([torch.ones(B, S, P, dtype=torch.bool), causal(S, S)[None].expand(B, -1, -1)], 2)
    allowed[1, :, :2] = False  # the batch rows differ
    mask = additive_mask(allowed, a.dtype)
    layer = 1
    with torch.no_grad():
        full_cache, tail_cache = (PastKV({layer: past[layer]}, record={layer}) for _ in range(2))
        full = run_layers(a, hidden, cos_sin, mask, range(layer, layer + 1), full_cache)
        tail = run_layer_tail(a, layer, hidden, cos_sin, mask, tail_cache, n_last)
    assert tail.shape == (B, n_last, a.hidden_size)
    assert torch.allclose(tail, full[:, S - n_last:], rtol=1e-5, atol=1e-5)
    for x, y in zip(tail_cache.recorded[layer], full_cache.recorded[layer]):
        assert torch.equal(x, y)
    # The check can fail: another layer gives other outputs.
    with torch.no_grad():
        other = run_layer_tail(a, 0, hidden, cos_sin, mask, PastKV({0: past[0]}), 1)
    assert (other - full[:, -1:]).abs().max() > 1e-3
