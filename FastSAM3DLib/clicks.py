"""The click simulator shared by training and evaluation (DESIGN.md §6).

A simulated user looks at the current prediction, finds where it is wrong and clicks there:

``"interior"``
    the error voxel farthest from the boundary of its error region: the maximum of the Euclidean
    distance transform of the false negatives and of the false positives (each mask padded by one
    voxel so the crop's faces count as boundary), positive if the larger maximum is a false
    negative. This is the standard "click the centre of the largest error" user.
``"random"``
    a voxel drawn uniformly from the whole error region, positive if it is a false negative.

Arrays are in model order (i, j, k) like the 128^3 crops. Every random choice comes from the
``numpy.random.Generator`` passed in, so a seed reproduces the clicks. :func:`next_click_lowres`
is the cheap variant used inside training: it simulates the user on the decoder's 32^3 grid and
maps the click to a matching voxel of the full-resolution crop.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

ClickMode = Literal["interior", "random"]
CLICK_MODES: Tuple[str, ...] = ("interior", "random")


class Click(NamedTuple):
    """One simulated click: a voxel index in model order and its polarity."""

    index: Tuple[int, int, int]
    positive: bool


def _check_masks(pred: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred and gt must be 3D arrays of one shape, got {pred.shape} and {gt.shape}")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def _max_distance(mask: np.ndarray, spacing: Optional[Sequence[float]] = None) -> Tuple[float, Optional[Tuple[int, int, int]]]:
    """Largest distance-transform value of ``mask`` (padded by one background voxel; in millimetres
    for a ``spacing`` along the array's axes) and where it is."""
    if not mask.any():
        return 0.0, None
    distance = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    flat = int(np.argmax(distance))
    return float(distance.flat[flat]), tuple(int(i) for i in np.unravel_index(flat, mask.shape))


def next_click(
    pred: np.ndarray,
    gt: np.ndarray,
    rng: np.random.Generator,
    mode: ClickMode = "interior",
    spacing: Optional[Sequence[float]] = None,
) -> Optional[Click]:
    """The next simulated click for a prediction.

    Arguments:
      pred: D x H x W bool, the current predicted mask (all False before the first click).
      gt: D x H x W bool, the target.
      rng: the generator for "random" clicks (and nothing else: "interior" is deterministic,
        ties broken by the first voxel in C order).
      mode: "interior" or "random" (see the module docstring).
      spacing: the voxel size along the arrays' three axes (mm), so that "interior" is the deepest
        in millimetres on an anisotropic grid (deepest in voxels it can lie near a thin side);
        None: isotropic (the model crops).

    Returns:
      the click, or None when the prediction has no error.

    Raises:
      ValueError: mismatched shapes or an unknown mode.
    """
    pred, gt = _check_masks(pred, gt)
    false_negative = gt & ~pred
    false_positive = pred & ~gt
    if mode == "interior":
        fn_distance, fn_index = _max_distance(false_negative, spacing)
        fp_distance, fp_index = _max_distance(false_positive, spacing)
        if fn_index is None and fp_index is None:
            return None
        if fp_index is None or (fn_index is not None and fn_distance >= fp_distance):
            return Click(fn_index, True)
        return Click(fp_index, False)
    if mode == "random":
        error = np.flatnonzero(false_negative | false_positive)
        if error.size == 0:
            return None
        flat = int(error[rng.integers(error.size)])
        index = tuple(int(i) for i in np.unravel_index(flat, gt.shape))
        return Click(index, bool(false_negative[index]))
    raise ValueError(f"unknown click mode {mode!r}: expected one of {', '.join(CLICK_MODES)}")


def first_click(gt: np.ndarray, rng: np.random.Generator, mode: ClickMode = "interior") -> Optional[Click]:
    """The first click on an empty prediction: the label's interior-most voxel, or a random label voxel."""
    gt = np.asarray(gt, dtype=bool)
    return next_click(np.zeros_like(gt), gt, rng, mode)


def next_click_lowres(
    pred_low: np.ndarray,
    gt_low: np.ndarray,
    gt_full: np.ndarray,
    rng: np.random.Generator,
    mode: ClickMode = "interior",
) -> Optional[Click]:
    """A click simulated on the decoder's coarse grid, returned as a full-resolution crop index.

    The error region is computed between ``pred_low`` and ``gt_low`` (e.g. 32^3, where a distance
    transform costs about a millisecond instead of a few hundred); the chosen coarse voxel is then
    mapped to a voxel of its ``factor``^3 block of ``gt_full`` with the click's polarity (inside
    the label for a positive click, outside for a negative one), drawn with ``rng``; if the block
    has none, its centre voxel.

    Arguments:
      pred_low, gt_low: L x L x L bool, the low-res prediction and target.
      gt_full: S x S x S bool, the full-resolution target (S a multiple of L).
      rng: the generator.
      mode: as in :func:`next_click`.

    Returns:
      the click in full-resolution model-order indices, or None when the low-res prediction has no error.
    """
    click = next_click(pred_low, gt_low, rng, mode)
    if click is None:
        return None
    factor = gt_full.shape[0] // gt_low.shape[0]
    start = np.asarray(click.index) * factor
    block = np.asarray(gt_full[tuple(slice(s, s + factor) for s in start)], dtype=bool)
    candidates = np.flatnonzero(block if click.positive else ~block)
    if candidates.size:
        offset = np.unravel_index(int(candidates[rng.integers(candidates.size)]), block.shape)
    else:
        offset = (factor // 2,) * 3
    return Click(tuple(int(s + o) for s, o in zip(start, offset)), click.positive)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two masks (1.0 when both are empty)."""
    pred, gt = _check_masks(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & gt).sum()) / total
