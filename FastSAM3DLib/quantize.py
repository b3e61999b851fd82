"""Fast inference paths for :class:`~FastSAM3DLib.session.Session`: int8 encoder, restructured decoder.

On a CPU without native bf16 (AVX2 only, like most laptops and many servers) the fp32 encoder is
already at the fp32 matrix-multiply floor and bf16 is emulated (slower still). What goes below
that floor here:

``fp32-fast``
    The fp32 encoder as it is, and the restated decoder below: the same arithmetic as ``fp32``
    in another order (equal to float rounding), less of it per click.
``int8``
    Every linear layer of the encoder — patch embedding, qkv, projections, MLPs, and the neck's
    convolutions restated as matrix multiplies — runs as a dynamically quantised int8 matrix
    multiply (fbgemm/x86 engine: per-output-channel symmetric int8 weights quantised once,
    activations quantised per call with 7-bit range as fbgemm needs on AVX2). Attention,
    LayerNorm, GELU and the residual stream stay fp32.
``bf16`` (CPU)
    For CPUs with native bf16 (AVX512-BF16 / AMX), where a bf16 matrix multiply runs about 2.5x
    faster than fp32 but whole-model bf16 is not faster (bf16 ``Conv3d`` is slow there) and
    autocast is slower still: every encoder linear layer, the patch embedding and the neck's
    convolutions (restated as matrix multiplies, as in ``int8``) keep their weights in bf16, cast
    once; activations are cast to bf16 at each multiply and the result returns to fp32, so
    attention, LayerNorm, GELU and the residual stream stay fp32. On CUDA "bf16" is autocast.
``sparse``, ``int8-sparse``
    fp32 or int8, and the encoder's global attention blocks use
    :mod:`FastSAM3DLib.sparse_attention` (opt-in: the weights were trained with dense attention).

Every fast mode also decodes with :class:`FastDecoder`: the mask decoder restated so a click does
less work — algebraically the same computation (equal to float rounding in fp32):

* the image-side projections of the first two-way layer are cached per crop embedding: the
  mask prompt enters them only through 16 channels (``mask_downscaling`` ends in a 1x1
  convolution), so per click they cost a rank-16 update; the mask prompt's two strided
  convolutions are gathers of 2x2x2 blocks and matrix multiplies;
* attention with a handful of tokens on one side is two plain matrix multiplies (the fused kernel
  and a row-wise softmax over 10 keys are slow at that shape), key-major when the image is the query,
  and then the values pass through the output projection before the attention weights do: T x C
  per head instead of an N x internal x C multiply after reordering the N x internal output;
* the token self-attention projections that share an input are one matrix multiply;
* the other image-side projections of a layer are one fused matrix multiply;
* the final token->image attention is computed for the tokens that are read (IoU and mask 0, or
  the three candidates) with keys and values folded into the queries (16 x 512 work instead of
  512 x 384 x 384);
* the transposed convolutions (kernel = stride = 2) are matrix multiplies whose outputs stay in
  token order until the very end, and only the masks asked for are computed;
* in the int8 modes its large image-side projections are int8 as well (not the upscaling, whose
  outputs are the logits' inputs), and so are the two-way layers' token-side layers: a handful of
  tokens against whole weight matrices, so their time is spent reading weights, and int8 weights
  are a quarter of the bytes.

Fast paths are built once per model and shared (:func:`fast_path`); they are rebuilt when the
model's parameters change in place. ``precision="fp32"`` never touches any of this.
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .modeling import MaskDecoder3D, PromptEncoder3D, Sam3D
from .modeling.image_encoder import ImageEncoderViT3D, PatchEmbed3D
from .sparse_attention import DEFAULT_PATTERNS, SparseAttention

#: Speed modes this module builds (the Session's ``precision`` values other than fp32/bf16/auto).
FAST_MODES: Tuple[str, ...] = ("fp32-fast", "int8", "bf16", "sparse", "int8-sparse")


def cpu_flags() -> frozenset:
    """The CPU's instruction-set flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, and slow."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def int8_available() -> bool:
    """Whether PyTorch's int8 CPU matrix multiply (fbgemm / x86 engine) is usable here."""
    engines = torch.backends.quantized.supported_engines
    return any(e in engines for e in ("x86", "fbgemm"))


def _quant_ops():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_prepack, torch.ops.quantized.linear_dynamic


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W stored as per-output-channel symmetric int8 and x quantised per call.

    Arguments:
      weight: out x in float weight.
      bias: out, or None.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        if not int8_available():
            raise RuntimeError("int8 matrix multiplies need PyTorch's fbgemm/x86 quantized engine (x86 CPUs)")
        engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
        if torch.backends.quantized.engine not in ("x86", "fbgemm"):
            torch.backends.quantized.engine = engine
        weight = weight.detach().float().cpu()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        zeros = torch.zeros(weight.shape[0], dtype=torch.long)
        prepack, self._linear = _quant_ops()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)
            self._packed = prepack(quantized, None if bias is None else bias.detach().float().cpu())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """... x in -> ... x out (float32)."""
        shape = x.shape
        y = self._linear(x.reshape(-1, shape[-1]).float().contiguous(), self._packed, True)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Bf16Linear(nn.Module):
    """``y = x W^T + b`` with W stored in bf16 (cast once); x is cast per call, y and b are fp32.

    Arguments:
      weight: out x in float weight.
      bias: out, or None.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """... x in -> ... x out (float32)."""
        y = F.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y.add_(self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor], kind: str) -> nn.Module:
    """A linear layer holding ``weight`` (out x in) and ``bias`` in ``kind``: "fp32", "int8" or "bf16"."""
    if kind == "int8":
        return Int8Linear(weight, bias)
    if kind == "bf16":
        return Bf16Linear(weight, bias)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.eval()


# -- encoder --------------------------------------------------------------------------------------


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of a module sharing its parameters, children and hooks, with its own child table.

    Hooks are shared on purpose: a hook registered on the model's block (the session's
    cancellation and progress hooks, a caller's) runs for the fast copy too.
    """
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


class _LinearPatchEmbed(nn.Module):
    """Patch embedding as one (int8 / bf16) matrix multiply over unfolded patches."""

    def __init__(self, patch: PatchEmbed3D, kind: str) -> None:
        super().__init__()
        self.patch_size = patch.patch_size
        proj = patch.proj
        self.linear = _linear(proj.weight.reshape(proj.out_channels, -1), proj.bias, kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, d // p, p, h // p, p, w // p, p)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, d // p, h // p, w // p, c * p * p * p)
        return self.linear(patches)


class _LinearNeck(nn.Module):
    """The neck (1x1 conv, LayerNorm3d, 3x3x3 conv, LayerNorm3d) on channel-last tokens, its
    convolutions as (int8 / bf16) matrix multiplies; the 3^3 one over the 27 shifted copies of the grid."""

    def __init__(self, neck: nn.Sequential, kind: str) -> None:
        super().__init__()
        conv1, norm1, conv2, norm2 = neck
        self.conv1 = _linear(conv1.weight.reshape(conv1.out_channels, -1), conv1.bias, kind)
        k = conv2.kernel_size[0]
        if conv2.kernel_size != (k, k, k) or conv2.padding != (k // 2,) * 3 or conv2.stride != (1, 1, 1):
            raise ValueError("the neck's second convolution must be k x k x k, stride 1, 'same' padding")
        self.kernel = k
        # Rows (out), columns ordered (kd, kh, kw, in) to match the shifted copies below.
        self.conv2 = _linear(conv2.weight.permute(0, 2, 3, 4, 1).reshape(conv2.out_channels, -1), conv2.bias, kind)
        self.norm1 = (norm1.weight, norm1.bias, norm1.eps)
        self.norm2 = (norm2.weight, norm2.bias, norm2.eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x D x H x W x C tokens -> B x out x D x H x W."""
        x = self.conv1(tokens)
        weight, bias, eps = self.norm1
        x = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        b, d, h, w, c = x.shape
        k, r = self.kernel, self.kernel // 2
        padded = F.pad(x, (0, 0, r, r, r, r, r, r))
        shifted = [padded[:, i : i + d, j : j + h, l : l + w] for i in range(k) for j in range(k) for l in range(k)]
        x = self.conv2(torch.cat(shifted, dim=-1))
        weight, bias, eps = self.norm2
        x = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return x.permute(0, 4, 1, 2, 3).contiguous()


class FastImageEncoder(nn.Module):
    """The image encoder with int8 or bf16 linear layers, and optionally sparse global attention.

    Holds a copy of the encoder's structure (blocks, norms, position embedding, relative-position
    tables); the large weights are re-stored in ``kind`` (int8 or bf16), or kept as they are for
    "fp32". For int8 and bf16 the patch embedding and the neck become matrix multiplies too.

    Arguments:
      encoder: the fp32 encoder (left untouched).
      kind: "int8", "bf16" or "fp32".
      sparse: sparse attention in the global attention blocks.
    """

    def __init__(self, encoder: ImageEncoderViT3D, kind: str = "int8", *, sparse: bool = False) -> None:
        super().__init__()
        if kind not in ("int8", "bf16", "fp32"):
            raise ValueError(f"kind must be 'int8', 'bf16' or 'fp32', got {kind!r}")
        skeleton = _shallow(encoder)  # the children below are rebuilt; no weight is copied
        restated = kind != "fp32"
        if restated:
            skeleton.patch_embed = _LinearPatchEmbed(encoder.patch_embed, kind)
        blocks = nn.ModuleList()
        for block in encoder.blocks:
            fast = _shallow(block)
            mlp = _shallow(block.mlp)
            mlp.lin1 = _linear(block.mlp.lin1.weight, block.mlp.lin1.bias, kind)
            mlp.lin2 = _linear(block.mlp.lin2.weight, block.mlp.lin2.bias, kind)
            fast.mlp = mlp
            if block.kind != "mlp":
                attn = _shallow(block.attn)
                attn.qkv = _linear(block.attn.qkv.weight, block.attn.qkv.bias, kind)
                attn.proj = _linear(block.attn.proj.weight, block.attn.proj.bias, kind)
                fast.attn = SparseAttention(attn, DEFAULT_PATTERNS) if sparse and block.window_size == 0 else attn
            blocks.append(fast)
        skeleton.blocks = blocks
        self.encoder = skeleton
        self.neck = _LinearNeck(encoder.neck, kind) if restated else None
        self.blocks = blocks
        self.img_size = encoder.img_size
        self.in_chans = encoder.patch_embed.proj.in_channels
        self.kind, self.sparse = kind, sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 1 x S x S x S -> B x out x S/p x S/p x S/p."""
        encoder = self.encoder
        expected = (self.in_chans, self.img_size, self.img_size, self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"image encoder input must have shape (B, {', '.join(map(str, expected))}); got {tuple(x.shape)}")
        tokens = encoder.patch_embed(x) + encoder.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        if self.neck is None:
            return encoder.neck(tokens.permute(0, 4, 1, 2, 3))
        return self.neck(tokens)


# -- decoder --------------------------------------------------------------------------------------


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _small_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` as plain matrix multiplies: B x h x Nq x d, B x h x Nk x d -> B x h x Nq x d.

    The decoder's attentions have a handful of tokens on one side; there the fused CPU kernel costs
    over a millisecond (512 image queries against 10 tokens), and so does a row-wise softmax over
    10 keys. With many queries and few keys the scores are kept key-major instead, so the softmax
    and both multiplies run along the long, contiguous query axis.
    """
    scale = q.shape[-1] ** -0.5
    if q.shape[-2] > k.shape[-2]:
        weights = (k @ q.transpose(-1, -2)).mul_(scale).softmax(dim=-2)  # B x h x Nk x Nq
        return (v.transpose(-1, -2) @ weights).transpose(-1, -2)
    return (q @ k.transpose(-1, -2)).mul_(scale).softmax(dim=-1) @ v


def _block_order(grid: Tuple[int, int, int], *blocks: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Where each voxel of a (D, H, W) grid is, in an order that lists the grid's voxels block by block.

    ``blocks`` are the edge lengths of nested blocks, outermost first (each level splits its parent
    in ``b`` x ``b`` x ``b``); the innermost voxels vary fastest, in (z, y, x) order within a level.
    Returns the 1-D index ``order`` with ``grid_flat = blocked_flat[order]``.
    """
    coarse = tuple(int(g) // math.prod(blocks) for g in grid)
    levels = len(blocks)
    shape = list(coarse) + [b for b in blocks for _ in range(3)]
    blocked = torch.arange(math.prod(shape), device=device).reshape(shape)
    # blocked axes: coarse z, y, x, then per level (z, y, x); grid axis a = coarse a, level-1 a, level-2 a, ...
    permutation = [axis for a in range(3) for axis in [a] + [3 + 3 * level + a for level in range(levels)]]
    return blocked.permute(permutation).reshape(-1)


class _EmbeddingCache:
    """A tensor derived from each embedding, keyed by the embedding tensor's identity (a few crops at a time)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: Dict[int, Tuple[weakref.ref, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def get(self, tensor: torch.Tensor, build) -> torch.Tensor:
        key = id(tensor)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is tensor:
                return entry[1]
        value = build(tensor)
        with self._lock:
            self._entries = {k: e for k, e in self._entries.items() if e[0]() is not None}
            while len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (weakref.ref(tensor), value)
        return value


class FastDecoder(nn.Module):
    """Prompt encoder + mask decoder of a :class:`Sam3D`, restated to do less work per click.

    Computes what ``model.decode`` computes (see the module docstring for how); dropout is never
    applied (use the model itself for MC dropout).

    Arguments:
      model: the model (its modules are referenced, and fused weights derived from them).
      int8: int8 matrix multiplies for the large image-side projections of the second two-way layer
        and the two-way layers' token-side layers.
    """

    def __init__(self, model: Sam3D, *, int8: bool = False) -> None:
        super().__init__()
        # The parts, not the model: the fast-path cache is keyed weakly by the model.
        self.prompt_encoder, self.mask_decoder = model.prompt_encoder, model.mask_decoder
        prompt, decoder = model.prompt_encoder, model.mask_decoder
        transformer = decoder.transformer
        if len(transformer.layers) != 2:
            raise ValueError("the fast decoder is written for the two-layer two-way transformer")
        self.int8 = int8
        kind = "int8" if int8 else "fp32"
        with torch.no_grad():
            pe = prompt.get_dense_pe().float()
            self.register_buffer("key_pe", pe.flatten(2).transpose(1, 2).contiguous())  # 1 x N x C
            down = prompt.mask_downscaling
            self._down = down
            last = down[6]  # Conv3d(mask_in_chans, C, 1): the only route of the mask prompt into the embedding
            mask_w, mask_b = last.weight.reshape(last.out_channels, -1).float(), last.bias.float()  # C x 16, C
            layer0, layer1 = transformer.layers
            # Layer 0: the keys and the image-side projections move with the mask prompt through its
            # 16 channels only: one rank-16 update of [x | k0 | v0 | q0] per click.
            projections = (layer0.cross_attn_token_to_image.k_proj, layer0.cross_attn_token_to_image.v_proj,
                           layer0.cross_attn_image_to_token.q_proj)
            self.split0 = (last.out_channels,) + tuple(p.out_features for p in projections)
            self.register_buffer("update16_w", torch.cat(
                [mask_w.T] + [(p.weight.float() @ mask_w).T for p in projections], dim=1).contiguous())  # 16 x sum(split0)
            self.register_buffer("update16_b", torch.cat([mask_b] + [p.weight.float() @ mask_b for p in projections]))
            # The mask prompt's two stride-2 convolutions as gathers of 2x2x2 blocks and matrix multiplies.
            # Weights in (sub-voxel, channel) order, to match channel-last rows gathered block by block.
            grid = tuple(int(s) for s in prompt.mask_input_size)
            for n, conv in enumerate((down[0], down[3]), 1):
                if conv.kernel_size != (2, 2, 2) or conv.stride != (2, 2, 2):
                    raise ValueError("the fast decoder is written for mask_downscaling with 2x2x2 stride-2 convolutions")
                self.register_buffer(f"mask_blocks{n}", torch.argsort(_block_order(grid, 2, device=pe.device)))
                self.register_buffer(f"mask_conv{n}_w", conv.weight.float().permute(0, 2, 3, 4, 1).reshape(conv.out_channels, -1))
                grid = tuple(s // 2 for s in grid)
            self.register_buffer("mask_order", _block_order(tuple(4 * s for s in prompt.image_embedding_size), 2, 2, device=pe.device))
            # Image->token attentions: the output projection per head (heads x head dim x C), applied to the values.
            for n, layer in enumerate((layer0, layer1)):
                out_proj = layer.cross_attn_image_to_token.out_proj
                heads = layer.cross_attn_image_to_token.num_heads
                self.register_buffer(f"i2t_out{n}_w", out_proj.weight.float().T.reshape(heads, -1, out_proj.out_features).contiguous())
                self.register_buffer(f"i2t_out{n}_b", out_proj.bias.float())
            # Token self-attention: layer 0 projects one input to q, k, v, layer 1 one input to q, k
            # (the two layers' attentions have the same widths).
            attn0, attn1 = layer0.self_attn, layer1.self_attn
            self.self_qkv0 = _linear(torch.cat([attn0.q_proj.weight, attn0.k_proj.weight, attn0.v_proj.weight]).float(),
                                     torch.cat([attn0.q_proj.bias, attn0.k_proj.bias, attn0.v_proj.bias]).float(), kind)
            self.self_qk1 = _linear(torch.cat([attn1.q_proj.weight, attn1.k_proj.weight]).float(),
                                    torch.cat([attn1.q_proj.bias, attn1.k_proj.bias]).float(), kind)
            self.split_self = (attn0.q_proj.out_features, attn0.k_proj.out_features, attn0.v_proj.out_features)
            # Layer 1: one matrix multiply for k (token->image), q (image->token) and v (token->image);
            # v's input lacks the positional encoding, so key_pe @ Wv^T is subtracted afterwards.
            t2i, i2t = layer1.cross_attn_token_to_image, layer1.cross_attn_image_to_token
            fused_w = torch.cat([t2i.k_proj.weight, i2t.q_proj.weight, t2i.v_proj.weight]).float()
            fused_b = torch.cat([t2i.k_proj.bias, i2t.q_proj.bias, t2i.v_proj.bias]).float()
            self.fused1 = _linear(fused_w, fused_b, kind)
            self.register_buffer("v1_pe", self.key_pe[0] @ t2i.v_proj.weight.float().T)
            self.split1 = (t2i.k_proj.out_features, i2t.q_proj.out_features, t2i.v_proj.out_features)
            # Output upscaling: ConvTranspose3d(k=2, s=2) == per-token matmul to 8 sub-voxels. fp32 in
            # every mode: its outputs are the logits' immediate inputs, and int8 there cost Dice@5
            # 0.018 against fp32 where an int8 decoder with an fp32 upscaling costs 0.005 (8 click
            # seeds each, see MEASURED_DICE5_COST), for about 0.5 ms a click.
            up1, norm, act1, up2, act2 = decoder.output_upscaling
            self.up1 = _linear(up1.weight.permute(2, 3, 4, 1, 0).reshape(-1, up1.in_channels), up1.bias.repeat(8), "fp32")
            self.up2 = _linear(up2.weight.permute(2, 3, 4, 1, 0).reshape(-1, up2.in_channels), up2.bias.repeat(8), "fp32")
            self.c1, self.c2 = up1.out_channels, up2.out_channels
            self.up_norm = (norm.weight, norm.bias, norm.eps)
            self.act1, self.act2 = act1, act2
            # Token-side layers: int8 copies in the int8 mode, looked up by the layer they stand for.
            self.token_linears = nn.ModuleList()
            self._token: Dict[int, nn.Module] = {}
            if int8:
                for linear in self._token_side_linears(decoder):
                    self.token_linears.append(Int8Linear(linear.weight, linear.bias))
                    self._token[id(linear)] = self.token_linears[-1]
        self._cache = _EmbeddingCache()

    @staticmethod
    def _token_side_linears(decoder: nn.Module) -> List[nn.Linear]:
        """The two-way layers' linear layers that only ever see the prompt and output tokens (a dozen
        rows), less the self-attention projections fused above. The final attention and the heads
        see one to four rows, where an fp32 multiply is the faster one (int8's per-call activation
        quantisation costs more than the weight bytes it saves)."""
        layers = decoder.transformer.layers
        linears: List[nn.Linear] = [layers[1].self_attn.v_proj]  # layer 0's is part of its fused q, k, v
        for layer in layers:
            attn, t2i, i2t = layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            linears += [attn.out_proj, t2i.q_proj, t2i.out_proj, i2t.k_proj, i2t.v_proj, layer.mlp.lin1, layer.mlp.lin2]
        return linears

    def _token_layer(self, linear: nn.Linear) -> nn.Module:
        """The layer to run for one of the model's token-side linear layers (its int8 copy, if any)."""
        return self._token.get(id(linear), linear)

    # -- pieces --------------------------------------------------------------------------------

    def _per_embedding(self, embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """[x | k0 | v0 | q0] without the mask prompt (x: the embedding's tokens), and the same plus
        the bias of the mask prompt's rank-16 update: 1 x N x sum(split0) each."""
        layer0 = self.mask_decoder.transformer.layers[0]
        with torch.inference_mode():
            x = embedding.float().flatten(2).transpose(1, 2)  # 1 x N x C
            t2i, i2t = layer0.cross_attn_token_to_image, layer0.cross_attn_image_to_token
            fused = torch.cat([x, t2i.k_proj(x + self.key_pe), t2i.v_proj(x), i2t.q_proj(x + self.key_pe)], dim=-1)
            return fused, fused + self.update16_b

    def _mask_features(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """The mask prompt's 16 channels before the final 1x1 convolution: B x N x 16."""
        down = self._down
        b = mask_logits.shape[0]
        h = mask_logits.float().reshape(b, -1, 1)  # B x voxels x channels, voxels in grid order
        for blocks, weight, (conv, norm, act) in ((self.mask_blocks1, self.mask_conv1_w, down[0:3]),
                                                  (self.mask_blocks2, self.mask_conv2_w, down[3:6])):
            h = h.index_select(1, blocks).reshape(b, -1, weight.shape[1])  # rows: 2x2x2 blocks, each (sub-voxel, channel)
            h = act(F.layer_norm(F.linear(h, weight, conv.bias), (weight.shape[0],), norm.weight, norm.bias, norm.eps))
        return h

    def _attend(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A decoder Attention given already projected q, k, v (B x N x internal): output projection included."""
        out = _small_attention(_heads(q, module.num_heads), _heads(k, module.num_heads), _heads(v, module.num_heads))
        return self._token_layer(module.out_proj)(_merge(out))

    def _image_to_tokens(self, layer: int, q_image: torch.Tensor, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """A two-way layer's image->token attention, output projection included: B x N x C.

        ``softmax(q k^T) v W_o^T = softmax(q k^T) (v W_o^T)``: with T tokens as keys, projecting the
        values first costs T x C per head, and the image side one N x hT x C multiply instead of
        an N x internal x C one after a reordering of the N x internal output.

        Arguments:
          layer: 0 or 1.
          q_image: the image queries, already projected: B x N x internal.
          queries, tokens: the layer's token state and the prompt tokens (B x T x C).
        """
        module = self.mask_decoder.transformer.layers[layer].cross_attn_image_to_token
        heads = module.num_heads
        k = _heads(self._token_layer(module.k_proj)(queries + tokens), heads)  # B x h x T x d
        v = _heads(self._token_layer(module.v_proj)(queries), heads)
        q = _heads(q_image, heads)  # B x h x N x d
        # Key-major scores (see _small_attention): the softmax runs along the long query axis.
        weights = (k @ q.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).softmax(dim=-2)  # B x h x T x N
        projected = v @ getattr(self, f"i2t_out{layer}_w")  # B x h x T x C
        return torch.baddbmm(getattr(self, f"i2t_out{layer}_b"), weights.flatten(1, 2).transpose(1, 2), projected.flatten(1, 2))

    def _mlp(self, block, x: torch.Tensor) -> torch.Tensor:
        """A transformer MLPBlock on tokens (no dropout)."""
        return self._token_layer(block.lin2)(block.act(self._token_layer(block.lin1)(x)))

    def _head(self, mlp, x: torch.Tensor) -> torch.Tensor:
        """A mask-decoder MLP (ReLU between layers) on tokens."""
        for i, layer in enumerate(mlp.layers):
            x = layer(x)
            if i < len(mlp.layers) - 1:
                x = F.relu(x)
        return x

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        image_embeddings: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_logits: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Same arguments and results as :meth:`Sam3D.decode`.

        Returns:
          low-res logits B x M x 32 x 32 x 32 and predicted IoU B x M (M = 1, or 3 with ``multimask_output``).
        """
        if image_embeddings.shape[0] != 1:
            raise ValueError("the fast decoder takes one image embedding (broadcast to the prompt batch)")
        prompt, decoder = self.prompt_encoder, self.mask_decoder
        transformer = decoder.transformer
        layer0, layer1 = transformer.layers
        cached, cached_with_bias = self._cache.get(image_embeddings, self._per_embedding)

        sparse = prompt._embed_points(coords, labels, pad=True).float()
        if mask_logits is not None and sparse.shape[0] == 1:  # one prompt set for several masks, as the model broadcasts it
            sparse = sparse.expand(mask_logits.shape[0], -1, -1)
        batch = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0).float()
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)  # B x T x C
        key_pe = self.key_pe
        if mask_logits is not None:
            features = self._mask_features(mask_logits)  # B' x N x 16
            if features.shape[0] == 1:
                fused0 = torch.addmm(cached_with_bias[0], features[0], self.update16_w)[None]
            else:
                fused0 = torch.baddbmm(cached_with_bias, features, self.update16_w.expand(features.shape[0], -1, -1))
        else:
            no_mask = prompt.no_mask_embed.weight.float()[0]  # C
            fused0 = cached + torch.cat([no_mask] + [p.weight.float() @ no_mask for p in (
                layer0.cross_attn_token_to_image.k_proj, layer0.cross_attn_token_to_image.v_proj,
                layer0.cross_attn_image_to_token.q_proj)])
        keys, k0, v0, q0 = (t.expand(batch, -1, -1) for t in torch.split(fused0, self.split0, dim=-1))

        # Layer 0 (its self-attention sees no positional encoding and has no residual).
        q, k, v = torch.split(self.self_qkv0(tokens), self.split_self, dim=-1)
        queries = layer0.norm1(self._attend(layer0.self_attn, q, k, v))
        t2i = layer0.cross_attn_token_to_image
        queries = layer0.norm2(queries + self._attend(t2i, self._token_layer(t2i.q_proj)(queries + tokens), k0, v0))
        queries = layer0.norm3(queries + self._mlp(layer0.mlp, queries))
        keys = layer0.norm4(keys + self._image_to_tokens(0, q0, queries, tokens))

        # Layer 1.
        q, k = torch.split(self.self_qk1(queries + tokens), self.split_self[:2], dim=-1)
        v = self._token_layer(layer1.self_attn.v_proj)(queries)
        queries = layer1.norm1(queries + self._attend(layer1.self_attn, q, k, v))
        k1, q1, v1 = torch.split(self.fused1(keys + key_pe), self.split1, dim=-1)
        v1 = v1 - self.v1_pe
        t2i = layer1.cross_attn_token_to_image
        queries = layer1.norm2(queries + self._attend(t2i, self._token_layer(t2i.q_proj)(queries + tokens), k1, v1))
        queries = layer1.norm3(queries + self._mlp(layer1.mlp, queries))
        keys = layer1.norm4(keys + self._image_to_tokens(1, q1, queries, tokens))

        # Final token->image attention, for the IoU token and the mask tokens asked for only, with
        # the key and value projections folded into those R queries.
        outputs = list(range(1, decoder.num_mask_tokens)) if multimask_output else [0]
        read_tokens = [0] + [1 + k for k in outputs]
        final = transformer.final_attn_token_to_image
        read = (queries + tokens)[:, read_tokens]
        q = _heads(final.q_proj(read), final.num_heads)  # B x h x R x d
        heads, dim = q.shape[1], q.shape[-1]
        wk = final.k_proj.weight.reshape(heads, dim, -1)  # h x d x C
        bk = final.k_proj.bias.reshape(heads, dim)
        wv = final.v_proj.weight.reshape(heads, dim, -1)
        bv = final.v_proj.bias.reshape(heads, dim)
        rows = q.shape[2]
        q_folded = torch.einsum("bhqd,hdc->bhqc", q, wk).reshape(batch, heads * rows, -1)  # B x hR x C
        logits = q_folded @ (keys + key_pe).transpose(1, 2) + (q * bk[None, :, None]).sum(-1).reshape(batch, -1, 1)
        weights = (logits * dim**-0.5).softmax(dim=-1)  # B x hR x N
        pooled = (weights @ keys).reshape(batch, heads, rows, -1)  # B x h x R x C
        out = torch.einsum("bhqc,hdc->bhqd", pooled, wv) + bv[None, :, None]
        read = transformer.norm_final_attn(queries[:, read_tokens] + final.out_proj(_merge(out)))
        iou = self._head(decoder.iou_prediction_head, read[:, 0])[:, outputs]
        hyper = torch.stack(
            [self._head(decoder.output_hypernetworks_mlps[k], read[:, 1 + j]) for j, k in enumerate(outputs)], dim=-1
        )  # B x c2 x M

        # Upscaling: token -> 8 sub-voxels -> 8 sub-voxels each, then mask m = hyper_m . features.
        n = keys.shape[1]
        up = self.up1(keys).reshape(batch, n * 8, self.c1)  # rows (token, sub1), channel last
        weight, bias, eps = self.up_norm
        up = self.act1(F.layer_norm(up, (self.c1,), weight, bias, eps))
        up = self.act2(self.up2(up).reshape(batch, n * 64, self.c2))  # rows (token, sub1, sub2)
        g = prompt.image_embedding_size
        masks = (up @ hyper).index_select(1, self.mask_order).transpose(1, 2)  # B x M x voxels, in grid order
        return masks.reshape(batch, len(outputs), g[0] * 4, g[1] * 4, g[2] * 4), iou


# -- the session's entry point ----------------------------------------------------------------------


class FastPath:
    """What a session uses in a fast mode: ``encoder(x)`` and ``decode(...)`` like ``Sam3D.decode``.

    Parts the fast path cannot restate (a model whose encoder or decoder was replaced, e.g. by a
    test double, or whose ``decode`` was overridden) are the model's own.
    """

    def __init__(self, model: Sam3D, mode: str, encoder: Optional[nn.Module], decoder: Optional[FastDecoder]) -> None:
        self.mode = mode
        self._model = weakref.ref(model)  # the cache is keyed weakly by the model: no strong reference
        self._encoder = encoder
        self._decoder = decoder

    @property
    def encoder(self) -> nn.Module:
        model = self._model()
        if self._encoder is None or "forward" in vars(model.image_encoder):  # replaced since the build
            return model.image_encoder
        return self._encoder

    def decode(self, image_embeddings, coords, labels, mask_logits=None, multimask_output=False):
        """As :meth:`Sam3D.decode`."""
        model = self._model()
        overridden = "decode" in vars(model) or any(
            "forward" in vars(m) for m in (model.prompt_encoder, model.mask_decoder)
        )
        if self._decoder is None or overridden:
            return model.decode(image_embeddings, coords, labels, mask_logits, multimask_output)
        return self._decoder(image_embeddings, coords, labels, mask_logits, multimask_output)


_paths: "weakref.WeakKeyDictionary[Sam3D, Dict[str, Tuple[Tuple[int, int], FastPath]]]" = weakref.WeakKeyDictionary()
_paths_lock = threading.Lock()


def _weights_fingerprint(model: nn.Module) -> Tuple[int, int]:
    """Changes whenever a parameter or buffer is modified in place (optimizer steps,
    ``load_state_dict``), replaced (``load_state_dict(assign=True)``) or moved to another device or
    dtype (``model.to``): what the fast path's restated copies were made from.

    Called on every click, so it walks the module tree itself (``model.parameters()`` keeps a memo
    of names) and keeps two sums: about 0.2 ms for the full-size student.
    """
    versions = addresses = 0
    modules = [model]
    while modules:
        module = modules.pop()
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is not None:
                    versions += tensor._version
                    addresses += tensor.data_ptr()
        modules.extend(child for child in module._modules.values() if child is not None)
    return versions, addresses


def runs_fast_path(mode: str, device: torch.device) -> bool:
    """Whether a resolved precision runs through :func:`fast_path` on ``device``: every speed mode of
    :data:`FAST_MODES`, except bf16 off the CPU, which is autocast of the model itself."""
    return mode in FAST_MODES and not (mode == "bf16" and device.type != "cpu")


def check_mode(model: Sam3D, mode: str) -> None:
    """Raise ValueError unless ``mode`` is a speed mode of :data:`FAST_MODES` usable for ``model``
    (the int8 modes need an x86 CPU with PyTorch's fbgemm kernels and the model on the CPU)."""
    if mode not in FAST_MODES:
        raise ValueError(f"unknown speed mode {mode!r}: expected one of {', '.join(FAST_MODES)}")
    if mode.startswith("int8") and (model.device.type != "cpu" or not int8_available()):
        raise ValueError(f"speed mode {mode!r} needs an x86 CPU (PyTorch's fbgemm int8 kernels); the model is on {model.device}")
    if mode == "bf16" and model.device.type != "cpu":
        raise ValueError(f"the bf16 fast path is for CPUs; on {model.device} bf16 is autocast (use the model directly)")


def fast_path(model: Sam3D, mode: str) -> FastPath:
    """The fast path of ``model`` for a speed mode of :data:`FAST_MODES`, built on first use
    (quantising the weights takes about a second for the full-size student) and shared by every
    session of the model until its parameters change.

    Raises:
      ValueError: see :func:`check_mode`.
    """
    check_mode(model, mode)
    fingerprint = _weights_fingerprint(model)
    with _paths_lock:
        entry = _paths.setdefault(model, {}).get(mode)
        if entry is not None and entry[0] == fingerprint:
            return entry[1]
        int8, sparse = mode.startswith("int8"), "sparse" in mode
        kind = "int8" if int8 else "bf16" if mode == "bf16" else "fp32"
        encoder = decoder = None
        with torch.no_grad():
            if mode != "fp32-fast" and type(model.image_encoder) is ImageEncoderViT3D and "forward" not in vars(model.image_encoder):
                encoder = FastImageEncoder(model.image_encoder, kind, sparse=sparse).eval()
            restatable = (
                type(model.mask_decoder) is MaskDecoder3D
                and type(model.prompt_encoder) is PromptEncoder3D
                and "decode" not in vars(model)
                and type(model).decode is Sam3D.decode
                and len(model.mask_decoder.transformer.layers) == 2
            )
            if restatable:
                decoder = FastDecoder(model, int8=int8).eval()
        path = FastPath(model, mode, encoder, decoder)
        _paths[model][mode] = (fingerprint, path)
        return path


# -- choosing a mode ------------------------------------------------------------------------------

#: Largest Dice@5 loss against fp32 that ``precision="auto"`` accepts (issue 7).
AUTO_MAX_DICE_COST = 0.005
#: Dice@5 cost of each speed mode against fp32 (fp32 minus the mode, mean over the 14 Colin27
#: structures, 10 interactions, click mode "all"), averaged over click seeds, each seed paired with fp32:
#: ``python Testing/benchmarks/speed_mode_dice.py --model CHECKPOINT --modes int8 fp32-fast --seeds 0 1 2 3 4 5 6 7``.
#: int8 and fp32-fast measured 2026-12-01 on the committed campaign file (``Resources/Training``, the
#: average of four runs; fp32 Dice@5 0.516), 8 seeds: int8 +0.0048 (per seed -0.002, -0.023, +0.006,
#: +0.025, +0.011, +0.021, -0.022, +0.022: a standard error of 0.007, so 0.005 is not resolved; with
#: the upscaling in int8 too, as before, +0.018, 7 of 8 seeds positive), fp32-fast +0.0002. The others
#: were measured 2026-11-30 on the campaign's step-6,674 checkpoint over seeds 0-2 (bf16 +0.015, -0.036,
#: +0.025; sparse +0.016, -0.024, -0.044; int8-sparse, with the int8 upscaling, +0.034, -0.008, +0.036),
#: bf16 through the CPU fast path with emulated bf16 arithmetic (the same rounding as native). One
#: seed's difference is mostly click trajectories parting after near-ties; re-measure with the bundled model.
MEASURED_DICE5_COST: Dict[str, Optional[float]] = {"fp32-fast": 0.0002, "int8": 0.0048, "bf16": 0.0014, "sparse": -0.0171, "int8-sparse": 0.0206}
#: Modes "auto" may pick on a CPU, fastest first. The sparse modes are opt-in only (DESIGN.md §3).
AUTO_CPU_ORDER: Tuple[str, ...] = ("bf16", "int8", "fp32-fast")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete mode for a requested precision: "auto" becomes bf16 on CUDA and, on a CPU, the
    fastest mode of :data:`AUTO_CPU_ORDER` whose measured Dice@5 cost is at most
    :data:`AUTO_MAX_DICE_COST` (bf16 only on CPUs with native bf16, int8 only where its kernels
    exist); other values pass through."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    if device.type != "cpu":
        return "fp32"
    for mode in AUTO_CPU_ORDER:
        cost = MEASURED_DICE5_COST.get(mode)
        if cost is None or cost > AUTO_MAX_DICE_COST:
            continue
        if mode.startswith("int8") and not int8_available():
            continue
        if mode == "bf16" and not native_bf16_cpu():
            continue
        return mode
    return "fp32"
