"""Scaled dot-product attention behind one function, with interchangeable backends.

Every attention layer of the model calls :func:`attention` (the fast decoder of
:mod:`FastSAM3DLib.quantize`, whose attentions have a handful of tokens on one side, writes its
own). Three backends compute the same thing:

``"math"``
    The reference: ``softmax(q @ k^T * scale + bias) @ v`` written out in plain tensor operations.
``"sdpa"``
    :func:`torch.nn.functional.scaled_dot_product_attention` with the bias passed as an additive
    mask. PyTorch dispatches to its fused CPU kernel or, on CUDA, to the flash / memory-efficient
    kernels. The default.
``"flash"``
    The ``flash-attn`` package, on CUDA in fp16/bf16 and only for calls without a bias (flash-attn
    has no arbitrary additive bias, so the encoder's relative-position attention never uses it).
    Calls it cannot serve fall back to ``"sdpa"``.

The backend is chosen once per process (:func:`set_backend`, or the ``FASTSAM3D_ATTENTION``
environment variable) and can be overridden per call or with :func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

BACKENDS: Tuple[str, ...] = ("math", "sdpa", "flash")

_state = threading.local()
_default_backend: Optional[str] = None


def flash_attn_installed() -> bool:
    """Whether the ``flash_attn`` package can be imported (it is only useful on CUDA)."""
    return importlib.util.find_spec("flash_attn") is not None


def available_backends() -> List[str]:
    """Backends usable in this process (``"flash"`` needs flash-attn and a CUDA device)."""
    names = ["math", "sdpa"]
    if flash_attn_installed() and torch.cuda.is_available():
        names.append("flash")
    return names


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend in force for this thread: a :func:`use_backend` override, else the default."""
    override = getattr(_state, "backend", None)
    if override is not None:
        return override
    if _default_backend is not None:
        return _default_backend
    return _validate(os.environ.get("FASTSAM3D_ATTENTION", "sdpa"))


def set_backend(name: str) -> None:
    """Set the process-wide default backend."""
    global _default_backend
    _default_backend = _validate(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` for every attention call made by this thread inside the ``with`` block."""
    previous = getattr(_state, "backend", None)
    _state.backend = _validate(name)
    try:
        yield
    finally:
        _state.backend = previous


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1) @ v


def _flash_applies(q: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    return (
        bias is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
        and flash_attn_installed()
    )


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn wants (B, N, heads, head_dim).
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T / sqrt(head_dim) + bias) v``.

    Arguments:
      q: queries, B x heads x Nq x head_dim.
      k: keys, B x heads x Nk x head_dim.
      v: values, B x heads x Nk x head_dim_v.
      bias: additive logits bias broadcastable to B x heads x Nq x Nk, or None.
      backend: one of :data:`BACKENDS`; None uses :func:`get_backend`.

    Returns:
      B x heads x Nq x head_dim_v.
    """
    name = _validate(backend) if backend is not None else get_backend()
    if name == "math":
        return _math_attention(q, k, v, bias)
    if name == "flash" and _flash_applies(q, bias):
        return _flash_attention(q, k, v)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def relative_positions(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis.

    Arguments:
      q_size: number of query positions along the axis.
      k_size: number of key positions along the axis.
      rel_pos: the learned table, (2 * max(q_size, k_size) - 1) x head_dim; a table of another
        length is resized linearly, as in ViTDet.

    Returns:
      q_size x k_size x head_dim.
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T.unsqueeze(0), size=length, mode="linear").squeeze(0).T
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    index = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[index.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_d: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int, int],
    k_size: Tuple[int, int, int],
) -> torch.Tensor:
    """The 3-axis relative-position bias exactly as the public SAM-Med3D / FastSAM3D weights learned it.

    ViTDet's 2D bias is ``q . Rh[qh, kh] + q . Rw[qw, kw]``. The public 3D code extends it with
    broadcasting indices that do not line up with the key axes, and the released weights were
    trained with that. Writing the query grid position as (i, j, l) and the key's as (p, s, r),
    the bias it adds is::

        q(i, j, l) . Rd[i, r]  +  q(i, j, p) . Rh[j, r]  +  q(i, j, s) . Rw[s, r]

    (every term indexes the table with the key's *last* axis, and two of them take the query
    vector at another position of the query's row). It needs cubic grids (all six sides equal),
    which every model here has. Reproducing it is what makes public checkpoints give the
    published outputs; see ``Testing/tests/test_exactness.py``.

    Arguments:
      q: queries, B x heads x (qd*qh*qw) x head_dim (unscaled).
      rel_pos_d, rel_pos_h, rel_pos_w: the per-axis tables, (2S-1) x head_dim.
      q_size, k_size: the query and key grids (d, h, w); all six sides must be equal.

    Returns:
      B x heads x (qd*qh*qw) x (kd*kh*kw), in q's dtype.
    """
    if len(set(q_size) | set(k_size)) != 1:
        raise ValueError(f"the relative-position bias needs a cubic grid; got query {q_size}, key {k_size}")
    qd, qh, qw = q_size
    kd, kh, kw = k_size
    b, heads, _, dim = q.shape
    rd = relative_positions(qd, kd, rel_pos_d).to(q.dtype)
    rh = relative_positions(qh, kh, rel_pos_h).to(q.dtype)
    rw = relative_positions(qw, kw, rel_pos_w).to(q.dtype)
    grid_q = q.reshape(b, heads, qd, qh, qw, dim)
    # Each B x heads x qd x qh x qw x k: the query at (i, j, l) against table row (i | j | l, k).
    bias_d = torch.einsum("bndhwc,dkc->bndhwk", grid_q, rd)
    bias_h = torch.einsum("bndhwc,hkc->bndhwk", grid_q, rh)
    bias_w = torch.einsum("bndhwc,wkc->bndhwk", grid_q, rw)
    # Broadcast into B x heads x (qd, qh, qw) x (kd, kh, kw) with the public code's index layout.
    bias = (
        bias_d[:, :, :, :, :, None, None, :]
        + bias_h[:, :, :, :, None, :, None, :]
        + bias_w[:, :, :, :, None, None, :, :]
    )
    return bias.reshape(b, heads, qd * qh * qw, kd * kh * kw)
