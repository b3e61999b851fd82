"""The 3D ViT image encoder of SAM-Med3D (teacher) and FastSAM3D (student).

Tokens are kept as B x D x H x W x C. Three block kinds exist, distinguished by their ``kind``:

``"standard"``   SAM-Med3D's pre-norm block: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``.
``"fastsam3d"``  FastSAM3D's block, which normalises the residual stream itself:
                 ``x = x + attn(norm1(x)); x = norm2(x); x = x + mlp(x)``.
``"mlp"``        FastSAM3D's attention-free block: ``x = norm2(x); x = x + mlp(x)``.

The public checkpoints only reproduce with the right kind, and nothing in their keys tells the
two attention kinds apart; :mod:`FastSAM3DLib.build` decides from the rest of the architecture.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attention, decomposed_rel_pos_bias
from .common import LayerNorm3d, MLPBlock

BLOCK_KINDS: Tuple[str, ...] = ("standard", "fastsam3d", "mlp")


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches to tokens (a Conv3d with kernel = stride = patch size)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x in_chans x S x S x S -> B x S/p x S/p x S/p x embed_dim.

        Computed as one matrix multiply over the unfolded patches: the same arithmetic as the
        strided convolution, but it runs at matrix-multiply speed in every precision (CPU bf16
        convolutions are several times slower than bf16 matmuls).
        """
        b, c, d, h, w = x.shape
        p = self.patch_size
        if d % p or h % p or w % p:
            raise ValueError(f"input spatial size {(d, h, w)} is not a multiple of the patch size {p}")
        patches = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, d // p, h // p, w // p, c * p * p * p)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(patches, weight, self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention over a 3D token grid with decomposed relative-position bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: Tuple[int, int, int] = (8, 8, 8),
    ) -> None:
        """
        Arguments:
          dim: token width.
          num_heads: number of heads; head_dim = dim / num_heads.
          qkv_bias: learn a bias for q, k, v.
          use_rel_pos: add the decomposed relative-position bias.
          input_size: the attended grid (d, h, w); the tables have 2*size-1 rows.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x D x H x W x C -> B x D x H x W x C."""
        b, d, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, d * h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x heads x N x head_dim
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_d, self.rel_pos_h, self.rel_pos_w, (d, h, w), (d, h, w))
        out = attention(q, k, v, bias)
        out = out.transpose(1, 2).reshape(b, d, h, w, c)
        return self.proj(out)


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """Zero-pad a token grid to a multiple of the window and cut it into windows.

    Arguments:
      x: B x D x H x W x C.
      window_size: window side S.

    Returns:
      (B * windows) x S x S x S x C, and the padded grid (Dp, Hp, Wp).
    """
    b, d, h, w, c = x.shape
    pad_d, pad_h, pad_w = ((window_size - n % window_size) % window_size for n in (d, h, w))
    if pad_d or pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h, 0, pad_d))
    dp, hp, wp = d + pad_d, h + pad_h, w + pad_w
    s = window_size
    x = x.reshape(b, dp // s, s, hp // s, s, wp // s, s, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, s, s, s, c)
    return windows, (dp, hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded: Tuple[int, int, int], size: Tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: reassemble windows and crop the padding.

    Arguments:
      windows: (B * windows) x S x S x S x C.
      window_size: window side S.
      padded: the padded grid (Dp, Hp, Wp).
      size: the original grid (D, H, W).

    Returns:
      B x D x H x W x C.
    """
    dp, hp, wp = padded
    d, h, w = size
    s = window_size
    b = windows.shape[0] // ((dp // s) * (hp // s) * (wp // s))
    x = windows.reshape(b, dp // s, hp // s, wp // s, s, s, s, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, :d, :h, :w, :].contiguous()


class Block(nn.Module):
    """One encoder block of the given kind (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kind: str = "standard",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = True,
        window_size: int = 0,
        input_size: Tuple[int, int, int] = (8, 8, 8),
    ) -> None:
        """
        Arguments:
          dim: token width.
          num_heads: attention heads.
          kind: "standard", "fastsam3d" or "mlp".
          mlp_ratio: MLP hidden width / dim.
          qkv_bias: learn a bias for q, k, v.
          norm_layer: normalisation class (called with ``dim``).
          act_layer: MLP activation class.
          use_rel_pos: decomposed relative-position bias in the attention.
          window_size: 0 for global attention, else the side of the (zero-padded) attention window.
          input_size: the token grid; sets the relative tables of global blocks.
        """
        super().__init__()
        if kind not in BLOCK_KINDS:
            raise ValueError(f"unknown block kind {kind!r}: expected one of {', '.join(BLOCK_KINDS)}")
        self.kind = kind
        self.window_size = window_size
        if kind != "mlp":
            self.norm1 = norm_layer(dim)
            attn_size = input_size if window_size == 0 else (window_size,) * 3
            self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, input_size=attn_size)
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        if self.window_size == 0:
            return self.attn(x)
        # Padded tokens are zeros after norm1, so they enter the window with q = k = v = qkv bias.
        size = (x.shape[1], x.shape[2], x.shape[3])
        windows, padded = window_partition(x, self.window_size)
        return window_unpartition(self.attn(windows), self.window_size, padded, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x D x H x W x C -> B x D x H x W x C."""
        if self.kind == "standard":
            x = x + self._attend(x)
            return x + self.mlp(self.norm2(x))
        if self.kind == "fastsam3d":
            x = x + self._attend(x)
        x = self.norm2(x)
        return x + self.mlp(x)


class ImageEncoderViT3D(nn.Module):
    """Patch embedding + absolute position embedding + ViT blocks + convolutional neck."""

    def __init__(
        self,
        *,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        num_heads: int = 12,
        block_kinds: Sequence[str] = ("standard",) * 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = True,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
        norm_eps: float = 1e-6,
    ) -> None:
        """
        Arguments:
          img_size: side of the input cube (voxels).
          patch_size: side of a patch; the token grid is img_size / patch_size per axis.
          in_chans: input channels.
          embed_dim: token width.
          num_heads: attention heads per block.
          block_kinds: one kind per block ("standard", "fastsam3d", "mlp"); its length is the depth.
          mlp_ratio: MLP hidden width / embed_dim.
          out_chans: neck output channels (the prompt/decoder width).
          qkv_bias: learn a bias for q, k, v.
          norm_layer: normalisation class for the blocks.
          act_layer: MLP activation class.
          use_rel_pos: decomposed relative-position bias.
          window_size: window side for non-global attention blocks (0: all global).
          global_attn_indexes: blocks that attend globally when window_size > 0.
          norm_eps: eps of the block and neck normalisations.
        """
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                kind=kind,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=lambda dim: norm_layer(dim, eps=norm_eps),
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid, grid),
            )
            for i, kind in enumerate(block_kinds)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans, eps=norm_eps),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans, eps=norm_eps),
        )

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus position embedding: B x 1 x S x S x S -> B x G x G x G x embed_dim."""
        return self.patch_embed(x) + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x in_chans x S x S x S -> B x out_chans x S/p x S/p x S/p."""
        self.check_input(x)
        x = self.tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))

    def forward_with_intermediates(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Like :meth:`forward`, also returning every block's output tokens (for distillation).

        Returns:
          the neck output B x out_chans x G x G x G, and a list of depth tensors B x G x G x G x embed_dim.
        """
        x = self.tokens(x)
        outputs: List[torch.Tensor] = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return self.neck(x.permute(0, 4, 1, 2, 3)), outputs

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is B x in_chans x img_size^3."""
        expected = (self.patch_embed.proj.in_channels, self.img_size, self.img_size, self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"image encoder input must have shape (B, {', '.join(map(str, expected))}); got {tuple(x.shape)}")
