"""Every attention backend computes what the plain-math reference computes."""

from __future__ import annotations

import pytest
import torch

from FastSAM3DLib import attention as attn_module
from FastSAM3DLib.attention import BACKENDS, attention, available_backends, decomposed_rel_pos_bias, get_backend, use_backend


def _inputs(with_bias: bool, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 64, 16, generator=generator, dtype=dtype) for _ in range(3))
    bias = None
    if with_bias:
        tables = [torch.randn(7, 16, generator=generator, dtype=dtype) for _ in range(3)]
        bias = decomposed_rel_pos_bias(q, *tables, (4, 4, 4), (4, 4, 4))
    return q, k, v, bias


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "math"])
def test_backends_equal_math(backend, with_bias):
    if backend not in available_backends():
        pytest.skip(f"attention backend {backend!r} needs flash-attn on a CUDA device")
    q, k, v, bias = _inputs(with_bias)
    expected = attention(q, k, v, bias, backend="math")
    result = attention(q, k, v, bias, backend=backend)
    assert torch.allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_flash_falls_back_where_it_cannot_apply():
    # On CPU (or with a bias) the flash backend serves the call through sdpa, with the same result.
    q, k, v, bias = _inputs(True)
    assert torch.allclose(attention(q, k, v, bias, backend="flash"), attention(q, k, v, bias, backend="math"), atol=1e-5)


def test_backend_selection_and_override(monkeypatch):
    monkeypatch.setattr(attn_module, "_default_backend", None)
    monkeypatch.setenv("FASTSAM3D_ATTENTION", "math")
    assert get_backend() == "math"
    with use_backend("sdpa"):
        assert get_backend() == "sdpa"
    assert get_backend() == "math"
    attn_module.set_backend("sdpa")
    assert get_backend() == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        use_backend("xformers").__enter__()


def test_bias_is_rejected_for_non_cubic_grids():
    q = torch.zeros(1, 1, 4 * 4 * 2, 8)
    table = torch.zeros(7, 8)
    with pytest.raises(ValueError, match="cubic grid"):
        decomposed_rel_pos_bias(q, table, table, table, (4, 4, 2), (4, 4, 2))
