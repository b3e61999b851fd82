"""An opt-in sparse attention over the encoder's 3D token grid (DESIGN.md §3).

The paper's "3D sparse flash attention" follows LongNet: attention restricted to segments of the
token sequence, some contiguous and some dilated, so each query sees a fraction of the keys while
information still travels across the whole volume. The public implementation is unused by every
released checkpoint and buggy; this one is written from the idea and is correct by construction:

* the 8^3 grid is cut into **groups** of tokens by a pattern — ``("local", s)``: contiguous
  s x s x s blocks; ``("dilated", r)``: the tokens sharing their coordinates modulo r (a stride-r
  sub-grid that spans the whole volume);
* each head uses one pattern (by default half the heads local 4^3 blocks, half dilated by 2: every
  query attends 64 of the 512 keys);
* within a group it is exactly the dense attention restricted to the group's keys, with the same
  decomposed relative-position bias the weights learned, gathered for the pairs that remain;
* outputs are scattered back to their own tokens (the public code's missing step).

A pattern whose groups hold every token (``("local", 8)`` on an 8^3 grid) reproduces dense
attention; :func:`masked_dense_attention` re-states any pattern as dense attention with the
excluded pairs masked out (the tests compare the two).

Dense attention stays the default: the released weights were trained with it, so this mode's
accuracy cost must be measured (``fastsam3d evaluate --precision sparse``) before it is used.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import relative_positions

Pattern = Tuple[str, int]
#: Per-head patterns used when none are given: half local 4^3 blocks, half dilated by 2.
DEFAULT_PATTERNS: Tuple[Pattern, ...] = (("local", 4), ("dilated", 2))


def group_indices(grid: Tuple[int, int, int], pattern: Pattern) -> torch.Tensor:
    """Token indices (C order over ``grid``) of each group of a pattern: G x S, every token exactly once.

    Raises:
      ValueError: an unknown pattern, or a size that does not divide the grid.
    """
    kind, size = pattern
    d, h, w = grid
    if kind not in ("local", "dilated"):
        raise ValueError(f"unknown sparse pattern {kind!r}: expected 'local' or 'dilated'")
    if size < 1 or d % size or h % size or w % size:
        raise ValueError(f"sparse pattern {pattern}: {size} must divide the token grid {grid}")
    index = torch.arange(d * h * w).reshape(d, h, w)
    if kind == "local":
        blocks = index.reshape(d // size, size, h // size, size, w // size, size)
        return blocks.permute(0, 2, 4, 1, 3, 5).reshape(-1, size**3)
    strided = index.reshape(d // size, size, h // size, size, w // size, size)
    return strided.permute(1, 3, 5, 0, 2, 4).reshape(size**3, -1)


def head_patterns(num_heads: int, patterns: Sequence[Pattern] = DEFAULT_PATTERNS) -> List[Pattern]:
    """Spread ``patterns`` over the heads in contiguous runs (6 heads, 2 patterns: 3 + 3)."""
    if not patterns:
        raise ValueError("at least one sparse pattern is needed")
    per = -(-num_heads // len(patterns))
    return [tuple(patterns[min(h // per, len(patterns) - 1)]) for h in range(num_heads)]


def _bias_terms(
    q: torch.Tensor, rel_pos: Sequence[torch.Tensor], grid: Tuple[int, int, int]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three factors of the public decomposed bias, each B x heads x (d*h*w*S) flattened.

    bias(query (i, j, l), key (p, s, r)) = Bd[i, j, l, r] + Bh[i, j, p, r] + Bw[i, j, s, r]
    (see :func:`FastSAM3DLib.attention.decomposed_rel_pos_bias`, which builds the dense matrix).
    """
    d, h, w = grid
    b, heads, _, dim = q.shape
    rd, rh, rw = (relative_positions(n, n, table).to(q.dtype) for n, table in zip(grid, rel_pos))
    grid_q = q.reshape(b, heads, d, h, w, dim)
    bias_d = torch.einsum("bndhwc,dkc->bndhwk", grid_q, rd)
    bias_h = torch.einsum("bndhwc,hkc->bndhwk", grid_q, rh)
    bias_w = torch.einsum("bndhwc,wkc->bndhwk", grid_q, rw)
    return tuple(t.reshape(b, heads, -1) for t in (bias_d, bias_h, bias_w))


def _group_bias(terms, groups: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
    """Bias of every (query, key) pair inside each group: B x heads x G x S x S."""
    d, h, w = grid
    side = w  # the tables index the key's last axis; all sides are equal (cubic grid)
    qi, qj, ql = groups // (h * w), (groups // w) % h, groups % w
    kp, ks, kr = qi, qj, ql  # keys are the same tokens as the queries of a group
    q_i, q_j, q_l = (t[:, :, None] for t in (qi, qj, ql))
    k_p, k_s, k_r = (t[:, None, :] for t in (kp, ks, kr))
    bias_d, bias_h, bias_w = terms
    index_d = ((q_i * h + q_j) * w + q_l) * side + k_r
    index_h = ((q_i * h + q_j) * w + k_p) * side + k_r
    index_w = ((q_i * h + q_j) * w + k_s) * side + k_r
    g, s = groups.shape
    flat = lambda index: index.reshape(-1)  # noqa: E731
    out = (
        bias_d[:, :, flat(index_d)] + bias_h[:, :, flat(index_h)] + bias_w[:, :, flat(index_w)]
    )
    return out.reshape(*out.shape[:2], g, s, s)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Tuple[int, int, int],
    patterns: Sequence[Pattern],
    rel_pos: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """Grouped self-attention over a token grid.

    Arguments:
      q, k, v: B x heads x N x head_dim, N = d*h*w tokens in C order.
      grid: (d, h, w).
      patterns: one pattern per head (:func:`head_patterns`).
      rel_pos: the (rel_pos_d, rel_pos_h, rel_pos_w) tables, or None for no bias.

    Returns:
      B x heads x N x head_dim: each token's output from the keys of its group.
    """
    b, heads, n, dim = q.shape
    if len(patterns) != heads:
        raise ValueError(f"{len(patterns)} patterns for {heads} heads")
    terms = _bias_terms(q, rel_pos, grid) if rel_pos is not None else None
    out = torch.empty_like(v)
    head = 0
    while head < heads:  # runs of heads sharing a pattern are computed together
        stop = head
        while stop < heads and tuple(patterns[stop]) == tuple(patterns[head]):
            stop += 1
        groups = group_indices(grid, tuple(patterns[head])).to(q.device)
        g, s = groups.shape
        flat = groups.reshape(-1)
        qg, kg, vg = (t[:, head:stop, flat].reshape(b, stop - head, g, s, -1) for t in (q, k, v))
        bias = None
        if terms is not None:
            bias = _group_bias(tuple(t[:, head:stop] for t in terms), groups, grid).to(q.dtype)
        result = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bias)
        out[:, head:stop, flat] = result.reshape(b, stop - head, g * s, -1)
        head = stop
    return out


def pattern_mask(grid: Tuple[int, int, int], patterns: Sequence[Pattern]) -> torch.Tensor:
    """heads x N x N bool: which keys each query may attend under each head's pattern."""
    n = grid[0] * grid[1] * grid[2]
    masks = []
    for pattern in patterns:
        groups = group_indices(grid, tuple(pattern))
        label = torch.empty(n, dtype=torch.long)
        label[groups.reshape(-1)] = torch.arange(groups.shape[0]).repeat_interleave(groups.shape[1])
        masks.append(label[:, None] == label[None, :])
    return torch.stack(masks)


def masked_dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Tuple[int, int, int],
    patterns: Sequence[Pattern],
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The same computation as :func:`sparse_attention`, stated plainly: dense attention (math, no
    fused kernel) with the dense bias and the pairs outside each head's pattern set to -inf."""
    scale = q.shape[-1] ** -0.5
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    allowed = pattern_mask(grid, patterns).to(q.device)
    logits = logits.masked_fill(~allowed[None], float("-inf"))
    return logits.softmax(dim=-1) @ v


class SparseAttention(nn.Module):
    """Drop-in for an encoder :class:`~FastSAM3DLib.modeling.image_encoder.Attention` (global
    blocks), sharing its weights, computing :func:`sparse_attention` instead of dense attention.

    Arguments:
      dense: the block's attention module (its ``qkv``/``proj`` may have been swapped for int8).
      patterns: the per-run patterns (spread over the heads by :func:`head_patterns`).
    """

    def __init__(self, dense: nn.Module, patterns: Sequence[Pattern] = DEFAULT_PATTERNS) -> None:
        super().__init__()
        self.qkv = dense.qkv
        self.proj = dense.proj
        self.num_heads = dense.num_heads
        self.use_rel_pos = dense.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_d, self.rel_pos_h, self.rel_pos_w = dense.rel_pos_d, dense.rel_pos_h, dense.rel_pos_w
        self.patterns = head_patterns(self.num_heads, patterns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x D x H x W x C -> B x D x H x W x C."""
        b, d, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, d * h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        tables = (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else None
        out = sparse_attention(q, k, v, (d, h, w), self.patterns, tables)
        return self.proj(out.transpose(1, 2).reshape(b, d, h, w, c))
