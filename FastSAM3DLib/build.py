"""Model configurations, the builder, and architecture inference from a state dict.

A configuration is a plain dict (JSON-serialisable, stored in our safetensors metadata). Named
variants are one builder with different numbers, as in ``segment_anything/build_sam.py``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .modeling import ImageEncoderViT3D, MaskDecoder3D, PromptEncoder3D, Sam3D

ModelConfig = Dict[str, Any]

_BASE: ModelConfig = {
    "img_size": 128,
    "patch_size": 16,
    "in_chans": 1,
    "embed_dim": 768,
    "num_heads": 12,
    "block_kinds": ["standard"] * 12,
    "mlp_ratio": 4.0,
    "window_size": 0,
    "global_attn_indexes": [],
    "use_rel_pos": True,
    "prompt_dim": 384,
    "mask_in_chans": 16,
    "num_point_embeddings": 2,
    "decoder_depth": 2,
    "decoder_heads": 8,
    "decoder_mlp_dim": 2048,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    "decoder_dropout": 0.0,
    # Trained for SAM's ambiguity rule (candidate masks for a lone first click: Sam3D.uses_multimask).
    "first_click_multimask": False,
}

_FASTSAM3D_KINDS = ["mlp", "mlp", "fastsam3d", "fastsam3d", "fastsam3d", "fastsam3d"]

CONFIGS: Dict[str, ModelConfig] = {
    # The public FastSAM3D student (FastSAM3D.pth): 6 blocks, the first two attention-free.
    "fastsam3d": {**_BASE, "num_heads": 6, "block_kinds": _FASTSAM3D_KINDS},
    # The public SAM-Med3D ViT-B teacher at 128^3 (sam_med3d_turbo.pth).
    "sam-med3d": {**_BASE, "window_size": 14, "global_attn_indexes": [2, 5, 8, 11]},
    # The architecture of our bundled model: the student's layout at half the width.
    "fastsam3d-384": {**_BASE, "embed_dim": 384, "num_heads": 6, "block_kinds": _FASTSAM3D_KINDS, "decoder_dropout": 0.1},
    # Small configurations for tests: same classes, tiny widths.
    "tiny": {
        **_BASE,
        "embed_dim": 48,
        "num_heads": 2,
        "block_kinds": ["mlp", "fastsam3d", "fastsam3d"],
        "prompt_dim": 48,
        "decoder_mlp_dim": 96,
        "iou_head_hidden_dim": 32,
        "decoder_dropout": 0.1,
    },
    "tiny-teacher": {
        **_BASE,
        "embed_dim": 48,
        "num_heads": 2,
        "block_kinds": ["standard"] * 6,
        "window_size": 14,
        "global_attn_indexes": [2, 5],
        "prompt_dim": 48,
        "decoder_mlp_dim": 96,
        "iou_head_hidden_dim": 32,
    },
}


def model_config(name_or_config: str | Mapping[str, Any]) -> ModelConfig:
    """A complete configuration from a registered name or a (partial) dict of overrides."""
    if isinstance(name_or_config, str):
        if name_or_config not in CONFIGS:
            raise ValueError(f"unknown model {name_or_config!r}: expected one of {', '.join(CONFIGS)}")
        return {"name": name_or_config, **CONFIGS[name_or_config]}
    unknown = set(name_or_config) - set(_BASE) - {"name"}
    if unknown:
        raise ValueError(f"unknown model configuration fields: {', '.join(sorted(unknown))}")
    return {"name": "custom", **_BASE, **dict(name_or_config)}


def build_model(name_or_config: str | Mapping[str, Any] = "fastsam3d") -> Sam3D:
    """A randomly initialised model of the named (or given) architecture, in eval mode."""
    cfg = model_config(name_or_config)
    grid = cfg["img_size"] // cfg["patch_size"]
    image_encoder = ImageEncoderViT3D(
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        in_chans=cfg["in_chans"],
        embed_dim=cfg["embed_dim"],
        num_heads=cfg["num_heads"],
        block_kinds=cfg["block_kinds"],
        mlp_ratio=cfg["mlp_ratio"],
        out_chans=cfg["prompt_dim"],
        norm_layer=nn.LayerNorm,
        use_rel_pos=cfg["use_rel_pos"],
        window_size=cfg["window_size"],
        global_attn_indexes=cfg["global_attn_indexes"],
    )
    prompt_encoder = PromptEncoder3D(
        embed_dim=cfg["prompt_dim"],
        image_embedding_size=(grid, grid, grid),
        input_image_size=(cfg["img_size"],) * 3,
        mask_in_chans=cfg["mask_in_chans"],
        num_point_embeddings=cfg["num_point_embeddings"],
    )
    mask_decoder = MaskDecoder3D(
        transformer_dim=cfg["prompt_dim"],
        num_multimask_outputs=cfg["num_multimask_outputs"],
        transformer_depth=cfg["decoder_depth"],
        transformer_heads=cfg["decoder_heads"],
        transformer_mlp_dim=cfg["decoder_mlp_dim"],
        iou_head_depth=cfg["iou_head_depth"],
        iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        dropout=cfg["decoder_dropout"],
    )
    model = Sam3D(image_encoder, prompt_encoder, mask_decoder, config=cfg)
    return model.eval()


def _indices(keys: Sequence[str], pattern: str) -> List[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})


def _shape(state: Mapping[str, torch.Tensor], key: str) -> Tuple[int, ...]:
    if key not in state:
        raise KeyError(key)
    return tuple(state[key].shape)


def infer_config(
    state: Mapping[str, torch.Tensor], overrides: Optional[Mapping[str, Any]] = None, encoder_only: bool = False
) -> ModelConfig:
    """Read the architecture off a full-model state dict's keys and shapes.

    Width, depth, heads (from the relative-position table width), attention-free blocks and
    window blocks (tables longer than the global grid needs) are all visible in the keys. The one
    thing that is not — whether attention blocks normalise the residual stream (FastSAM3D) or not
    (SAM-Med3D) — is decided by the family: windowed encoders are SAM-Med3D teachers, the rest
    FastSAM3D students. ``overrides`` (e.g. from our file metadata) win over everything inferred.
    With ``encoder_only`` only ``image_encoder.*`` keys are read; decoder fields keep their defaults.

    Raises:
      KeyError: a key needed to infer the architecture is missing.
    """
    keys = list(state)
    pos = _shape(state, "image_encoder.pos_embed")
    patch = _shape(state, "image_encoder.patch_embed.proj.weight")
    embed_dim, grid, patch_size = pos[-1], pos[1], patch[-1]
    depth_ids = _indices(keys, r"image_encoder\.blocks\.(\d+)\.")
    if depth_ids != list(range(len(depth_ids))):
        raise KeyError(f"image_encoder.blocks.N: block indices are not contiguous: {depth_ids}")

    global_ids, window_sizes, head_dims, kinds = [], set(), set(), []
    use_rel_pos = True
    for i in depth_ids:
        prefix = f"image_encoder.blocks.{i}."
        if prefix + "attn.qkv.weight" not in state:
            kinds.append("mlp")
            continue
        kinds.append("attention")
        table = prefix + "attn.rel_pos_d"
        if table in state:
            rows, head_dim = _shape(state, table)
            head_dims.add(head_dim)
            side = (rows + 1) // 2
            if side == grid:
                global_ids.append(i)
            else:
                window_sizes.add(side)
        else:
            use_rel_pos = False
            global_ids.append(i)
    windows = sorted(window_sizes)
    if len(windows) > 1:
        raise ValueError(f"blocks use several attention window sizes {windows}; only one is supported")
    window_size = windows[0] if windows else 0
    attention_kind = "standard" if window_size else "fastsam3d"
    block_kinds = [attention_kind if k == "attention" else "mlp" for k in kinds]
    if len(head_dims) > 1:
        raise ValueError(f"blocks have different head widths {sorted(head_dims)}")
    num_heads = embed_dim // head_dims.pop() if head_dims else 1
    first_mlp = f"image_encoder.blocks.{depth_ids[0]}.mlp.lin1.weight" if depth_ids else None
    mlp_ratio = _shape(state, first_mlp)[0] / embed_dim if first_mlp else 4.0

    cfg: ModelConfig = {
        **_BASE,
        "name": "inferred",
        "img_size": grid * patch_size,
        "patch_size": patch_size,
        "in_chans": patch[1],
        "embed_dim": embed_dim,
        "num_heads": num_heads,
        "block_kinds": block_kinds,
        "mlp_ratio": mlp_ratio,
        "window_size": window_size,
        "global_attn_indexes": global_ids if window_size else [],
        "use_rel_pos": use_rel_pos,
        "prompt_dim": _shape(state, "image_encoder.neck.0.weight")[0],
    }
    if not encoder_only:
        cfg.update(
            prompt_dim=_shape(state, "prompt_encoder.no_mask_embed.weight")[1],
            mask_in_chans=_shape(state, "prompt_encoder.mask_downscaling.3.weight")[0],
            num_point_embeddings=len(_indices(keys, r"prompt_encoder\.point_embeddings\.(\d+)\.")),
            decoder_depth=len(_indices(keys, r"mask_decoder\.transformer\.layers\.(\d+)\.")),
            decoder_mlp_dim=_shape(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
            num_multimask_outputs=_shape(state, "mask_decoder.mask_tokens.weight")[0] - 1,
            iou_head_depth=len(_indices(keys, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.")),
            iou_head_hidden_dim=_shape(state, "mask_decoder.iou_prediction_head.layers.0.weight")[0],
            decoder_dropout=0.0,
        )
    if overrides:
        cfg.update({k: v for k, v in overrides.items() if k in _BASE or k == "name"})
    return cfg


def count_parameters(module: nn.Module) -> int:
    """Number of learnable parameters."""
    return sum(p.numel() for p in module.parameters())

