"""Deterministic, seeded "arbitrary" weights for exactness tests.

The reference numbers in ``Testing/data/public_reference.json`` were produced by the public
FastSAM3D/SAM-Med3D modules loaded with the state dict this function makes from their own key
list; our tests make the same state dict from our key list and compare outputs. Every tensor
depends only on its key, its shape and the seed, so the two key lists need not be in the same
order.
"""

from __future__ import annotations

import zlib
from typing import Dict, Iterable, Mapping, Tuple

import torch


def reference_tensor(key: str, shape: Tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """One tensor of the reference weights (float32, CPU)."""
    generator = torch.Generator().manual_seed((zlib.crc32(key.encode()) ^ seed) & 0x7FFFFFFF)
    values = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    if key.endswith("positional_encoding_gaussian_matrix"):
        return values
    if len(shape) == 1 and key.endswith("weight"):
        # Only normalisation layers have 1-D weights: keep them near 1 so activations stay sane.
        return 1.0 + 0.1 * values
    if len(shape) >= 2 and not key.endswith(("pos_embed", "rel_pos_d", "rel_pos_h", "rel_pos_w")):
        fan = 1
        for size in shape[1:]:
            fan *= int(size)
        if key.endswith("weight"):
            return values / fan**0.5
    return 0.05 * values


def reference_state_dict(
    shapes: Mapping[str, Tuple[int, ...]] | Iterable[Tuple[str, Tuple[int, ...]]], seed: int = 0
) -> Dict[str, torch.Tensor]:
    """Reference weights for every ``key -> shape`` given."""
    items = shapes.items() if isinstance(shapes, Mapping) else shapes
    return {key: reference_tensor(key, tuple(shape), seed) for key, shape in items}


def reference_image(seed: int = 0, size: int = 128) -> torch.Tensor:
    """A (1, 1, size, size, size) float32 test volume: smooth structure plus noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, 8, 8, 8), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=False)
    noise = torch.randn((1, 1, size, size, size), generator=generator)
    return smooth + 0.3 * noise
