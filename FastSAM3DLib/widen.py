"""A wider image encoder that computes exactly what a narrower one computes (Net2Net-style copies).

The benchmark's targets are stated for the full-size FastSAM3D student (width 768), but the only
trained weights here are our width-384 model. Timing the full-size architecture with random weights
gives the right network cost but noise masks, which makes every paste and later click a worst case.
:func:`widen_model` builds the full-size architecture whose encoder reproduces a trained narrower
encoder, so the full-size arithmetic runs on realistic masks.

Every width-C vector of the residual stream is stored ``f`` times side by side (width fC). A
LayerNorm sees the same mean and variance, so it returns the copies of its old output; a linear
layer reading copies divides its weights by ``f``; a layer writing into the stream repeats its
rows. Each attention head keeps its number and gets ``f`` copies of its old channels (head width
fd): q is scaled by ``f**-0.5`` so that ``q.k / sqrt(fd)`` equals the old ``q.k / sqrt(d)``, and the
relative-position tables by ``f**-0.5`` too so that ``q.R`` is unchanged. The MLP's hidden units are
repeated like the stream. The prompt encoder and mask decoder are copied as they are.
"""

from __future__ import annotations

import torch

from .build import build_model
from .modeling import Sam3D


def _copies(width: int, factor: int) -> torch.Tensor:
    """Old index of each new channel of a stream stored ``factor`` times side by side: (factor*width,)."""
    return torch.arange(width * factor) % width


def _head_copies(heads: int, head_dim: int, factor: int) -> torch.Tensor:
    """Old index of each new channel when each head's head_dim channels are stored ``factor`` times."""
    new = torch.arange(heads * head_dim * factor)
    return (new // (head_dim * factor)) * head_dim + new % head_dim


def _linear(weight: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, factor: int) -> torch.Tensor:
    """A weight (out x in) with rows and columns picked by old index; columns read ``factor`` copies."""
    return weight[rows][:, columns] / factor


def widen_model(model: Sam3D, factor: int = 2) -> Sam3D:
    """The same model with an image encoder ``factor`` times wider (same depth, heads and outputs).

    Arguments:
      model: a model whose encoder attends globally (a FastSAM3D student, not a windowed teacher).
      factor: the width multiplier (a whole number >= 1).

    Returns:
      a new model in eval mode, on the source's device: the source's architecture with
      ``embed_dim * factor``, ``"widened_from"`` naming the source; its encoder output equals the
      source's up to rounding.
    """
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"the width factor must be a whole number >= 1; got {factor}")
    config = dict(model.config)
    if config.get("window_size"):
        raise ValueError("widening is written for globally attending encoders (FastSAM3D students), not windowed teachers")
    width, heads = config["embed_dim"], config["num_heads"]
    head_dim = width // heads
    hidden = int(width * config["mlp_ratio"])
    architecture = {k: v for k, v in config.items() if k not in ("name", "source", "sha256", "widened_from")}
    wide = build_model({**architecture, "embed_dim": width * factor})
    source = config.get("source") or config.get("name", "custom")
    wide.config = {**architecture, "embed_dim": width * factor, "name": f"{config.get('name', 'custom')} widened x{factor}",
                   "widened_from": str(source)}

    stream, mlp_hidden = _copies(width, factor), _copies(hidden, factor)
    head_channels = _head_copies(heads, head_dim, factor)
    table_columns = _copies(head_dim, factor)
    qkv_rows = torch.cat([part * width + head_channels for part in range(3)])
    qkv_scale = torch.ones(len(qkv_rows))
    qkv_scale[: width * factor] = factor**-0.5  # the q rows
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().float()
        part = key.split(".")
        if part[0] != "image_encoder" or (part[1] == "neck" and part[2] != "0"):
            state[key] = value  # prompt encoder, decoder, and the neck after its first convolution
        elif key == "image_encoder.pos_embed":
            state[key] = value[..., stream]
        elif key.startswith("image_encoder.patch_embed.") or part[3] in ("norm1", "norm2"):
            state[key] = value[stream]
        elif key == "image_encoder.neck.0.weight":
            state[key] = value[:, stream] / factor
        elif part[3:5] == ["attn", "qkv"]:
            scale = qkv_scale if part[5] == "bias" else qkv_scale[:, None]
            state[key] = (value[qkv_rows] if part[5] == "bias" else _linear(value, qkv_rows, stream, factor)) * scale
        elif part[3:5] == ["attn", "proj"]:
            state[key] = value[stream] if part[5] == "bias" else _linear(value, stream, head_channels, factor)
        elif part[3] == "attn" and part[4].startswith("rel_pos_"):
            state[key] = value[:, table_columns] * factor**-0.5
        elif part[3:5] == ["mlp", "lin1"]:
            state[key] = value[mlp_hidden] if part[5] == "bias" else _linear(value, mlp_hidden, stream, factor)
        elif part[3:5] == ["mlp", "lin2"]:
            state[key] = value[stream] if part[5] == "bias" else _linear(value, stream, mlp_hidden, factor)
        else:
            raise ValueError(f"widen_model does not know how to widen {key}")
    wide.load_state_dict(state)
    return wide.to(model.device).eval()
