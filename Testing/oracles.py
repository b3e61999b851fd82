"""A stand-in mask decoder with a known answer, for tests of geometry and of the evaluation protocol.

With the oracle in place of the mask decoder, the model's logits are those of a sphere around the
first positive click in the crop's own grid, so the correct mask in any user geometry is known.
The rest of the model (tiny configuration, fixed seed) and the Session around it are the real ones.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import SimpleITK as sitk
import torch

from FastSAM3DLib import build_model
from FastSAM3DLib.modeling import Sam3D
from FastSAM3DLib.preprocess import Region


class SphereOracle(torch.nn.Module):
    """Stands in for the mask decoder: the logits of a sphere of ``radius_mm`` around ``point``
    (crop voxel indices, set before each decode), on the crop's low-res grid. Counts its calls."""

    def __init__(self, radius_mm: float, low_res: int = 32, crop_size: int = 128, spacing: float = 1.5) -> None:
        super().__init__()
        self.radius_cells = radius_mm / (spacing * crop_size / low_res)
        self.low_res, self.scale = low_res, crop_size / low_res
        self.point = None
        self.calls = 0

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output=False):
        self.calls += 1
        center = (self.point + 0.5) / self.scale - 0.5
        grid = torch.stack(torch.meshgrid(*[torch.arange(self.low_res, dtype=torch.float32)] * 3, indexing="ij"), -1)
        logits = self.radius_cells - (grid - center).norm(dim=-1)
        batch = sparse_prompt_embeddings.shape[0]
        return logits.expand(batch, 1, -1, -1, -1).clone(), torch.ones(batch, 1)


def sphere_oracle_model(radius_mm: float) -> Tuple[Sam3D, SphereOracle]:
    """The tiny model with its mask decoder replaced by a :class:`SphereOracle` centred on the first
    positive click of each decode (the first click of any kind if there is no positive one)."""
    torch.manual_seed(0)
    model = build_model("tiny")
    oracle = SphereOracle(radius_mm)
    original = model.decode

    def decode(embedding, coords, labels, mask_logits=None, multimask_output=False):
        positives = coords[0][labels[0] == 1]
        oracle.point = positives[0] if len(positives) else coords[0, 0]
        return original(embedding, coords, labels, mask_logits, multimask_output)

    model.mask_decoder = oracle
    model.decode = decode
    return model, oracle


def region_of(mask: sitk.Image, margin: int = 1) -> Tuple[Region, np.ndarray]:
    """What ``Session.predict_region`` returns, for an engine stand-in that computes a full-size mask:
    the box around its non-zero voxels widened by ``margin`` (clipped to the image; empty if none),
    and the (z, y, x) array inside it."""
    array = sitk.GetArrayFromImage(mask)
    hits = np.nonzero(array)
    if not hits[0].size:
        return Region((0, 0, 0), (0, 0, 0)), np.zeros((0, 0, 0), np.uint8)
    size = mask.GetSize()
    start = tuple(max(0, int(hits[2 - a].min()) - margin) for a in range(3))
    stop = tuple(min(size[a], int(hits[2 - a].max()) + 1 + margin) for a in range(3))
    region = Region(start, stop)
    return region, np.ascontiguousarray(array[region.slices()])
