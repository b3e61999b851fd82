"""A quick development evaluation on Colin27 structures, run inside training or on its own.

Follows the protocol of DESIGN.md §6 on one crop per structure: a 128^3 crop at 1.5 mm centred on
the label's bounding box, z-normalised like the session does it; the first two clicks at the
interior-most error voxel, later ones uniform in the error region; every decode gets all clicks so
far and the previous low-res logits (all-zero at the first click, as the Session); Dice of the upsampled mask at full crop resolution after each
click. Colin27 is the only subject here, so "seen" structures were trained on (augmented crops of
this very image) and held-out ones were not: the held-out figures measure "segment anything"
across structures, not across subjects.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..clicks import dice, next_click
from ..modeling import Sam3D, select_by_iou
from ..preprocess import CropGrid, crop_tensor, resample_to_crop, upsample_logits
from .pool import label_bbox_lps

logger = logging.getLogger(__name__)

SEEN_EVAL = ("caudate_l", "putamen_r", "pallidum_l", "cerebellum", "brain")


@torch.no_grad()
def evaluate_structure(
    model: Sam3D,
    image: sitk.Image,
    label: sitk.Image,
    clicks: int = 5,
    seed: int = 0,
    interior_clicks: int = 2,
) -> List[float]:
    """Dice after each of ``clicks`` simulated clicks on one structure (see the module docstring)."""
    device = model.device
    center = np.mean(label_bbox_lps(label), axis=0)
    crop = CropGrid.around(center)
    x = crop_tensor(image, crop).to(device)
    gt = resample_to_crop(sitk.Cast(label, sitk.sitkFloat32), crop) >= 0.5
    rng = np.random.default_rng(seed)
    embedding = model.image_encoder(x)
    pred = np.zeros_like(gt)
    points: List[Sequence[int]] = []
    polarity: List[int] = []
    previous = torch.zeros((1, 1, *model.low_res_size), device=device)
    scores: List[float] = []
    for c in range(clicks):
        click = next_click(pred, gt, rng, "interior" if c < interior_clicks else "random")
        if click is None:
            scores.append(scores[-1] if scores else 1.0)
            continue
        points.append(click.index)
        polarity.append(int(click.positive))
        coords = torch.tensor([points], dtype=torch.float32, device=device)
        labels = torch.tensor([polarity], dtype=torch.float32, device=device)
        multimask = model.uses_multimask(labels, first=len(points) == 1)
        low, iou = model.decode(embedding, coords, labels, previous, multimask_output=multimask)
        if multimask:
            low, _ = select_by_iou(low, iou)
        previous = low.float()
        pred = (upsample_logits(previous)[0, 0] > 0).cpu().numpy()
        scores.append(dice(pred, gt))
    return scores


def evaluate_colin27(
    model: Sam3D, structures: Sequence[str], clicks: int = 5, seed: int = 0, colin=None
) -> Dict[str, List[float]]:
    """Dice per click for each named Colin27 structure (model switched to eval mode and back)."""
    from ..data.colin27 import load_colin27

    colin = load_colin27() if colin is None else colin
    was_training = model.training
    model.eval()
    try:
        return {name: evaluate_structure(model, colin.image, colin.labels[name], clicks, seed) for name in structures}
    finally:
        model.train(was_training)


def summarize(results: Dict[str, List[float]], groups: Dict[str, Sequence[str]]) -> Dict[str, Dict[str, float]]:
    """Mean Dice@1/@3/@5 (as far as clicked) per group of structures."""
    summary: Dict[str, Dict[str, float]] = {}
    for group, names in groups.items():
        rows = [results[n] for n in names if n in results]
        if not rows:
            continue
        depth = min(len(r) for r in rows)
        summary[group] = {f"dice@{k}": float(np.mean([r[k - 1] for r in rows])) for k in (1, 3, 5, 10) if k <= depth}
    return summary
