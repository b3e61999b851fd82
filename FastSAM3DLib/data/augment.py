"""Training augmentation of one crop and its binary label, with NumPy and SciPy only.

``augment`` applies, each with its own probability: flips; one resampling that combines a
rotation/scaling about the crop centre with an optional smooth elastic displacement; then on the
image only a gamma curve, a multiplicative bias field, a contrast scale and shift, a loss of
resolution (downsample then upsample) and Gaussian noise. Intensity changes are relative to the
crop's own range and spread, so they suit raw MR, CT in HU and z-normalised crops alike.

It needs no MONAI: one code path, driven by the caller's ``numpy.random.Generator`` so a seed
reproduces a sample, costing about 0.1-0.5 s per 128^3 crop on one core.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage

from ..crops import (
    ELASTIC_MAX_VOX,
    P_AFFINE,
    P_BIAS,
    P_ELASTIC,
    P_FLIP,
    P_GAMMA,
    P_LOW_RESOLUTION,
    P_NOISE,
    P_SCALE_SHIFT,
    random_affine,
)
from .phantoms import smooth_noise


def _spatial(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, elastic: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Resample image (linear) and label (linear, then >= 0.5) under a random affine map about the
    centre, plus a smooth displacement of up to ``ELASTIC_MAX_VOX`` voxels when ``elastic``."""
    matrix = random_affine(rng)
    center = (np.asarray(image.shape) - 1) / 2.0
    offset = center - matrix @ center
    label_f = label.astype(np.float32)
    if not elastic:
        out_image = ndimage.affine_transform(image, matrix, offset, order=1, mode="nearest")
        out_label = ndimage.affine_transform(label_f, matrix, offset, order=1, mode="constant", cval=0.0)
        return out_image, out_label >= 0.5
    grid = [  # broadcastable voxel indices along each axis
        np.arange(n, dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)]) for axis, n in enumerate(image.shape)
    ]
    magnitude = np.float32(rng.uniform(1.0, ELASTIC_MAX_VOX))
    correlation = rng.uniform(16.0, 32.0)
    coords = np.empty((3,) + image.shape, dtype=np.float32)
    for a in range(3):
        coords[a] = sum(np.float32(matrix[a, b]) * grid[b] for b in range(3)) + np.float32(offset[a])
        coords[a] += magnitude * smooth_noise(rng, image.shape, correlation)
    out_image = ndimage.map_coordinates(image, coords, order=1, mode="nearest")
    out_label = ndimage.map_coordinates(label_f, coords, order=1, mode="constant", cval=0.0)
    return out_image, out_label >= 0.5


def _low_resolution(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Downsample by 1.5-3x (all axes, or one axis as thick slices) and upsample back, linearly."""
    factor = np.ones(3)
    if rng.random() < 0.5:
        factor[:] = rng.uniform(1.5, 3.0)
    else:
        factor[int(rng.integers(0, 3))] = rng.uniform(2.0, 4.0)
    small = ndimage.zoom(image, 1.0 / factor, order=1, mode="nearest", grid_mode=True)
    return ndimage.zoom(small, np.asarray(image.shape) / np.asarray(small.shape), order=1, mode="nearest", grid_mode=True)


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Randomly augment one crop and its label.

    Arguments:
      image: (D, H, W) array, any real dtype and intensity range (e.g. 128^3).
      label: (D, H, W) array, non-zero = foreground.
      rng: the only source of randomness.

    Returns:
      (image, label): float32 (D, H, W) image and uint8 (D, H, W) label with values 0/1. The label
      can come back empty if the transform moves a small object out of the crop.

    Raises:
      ValueError: the arrays are not 3D or differ in shape.
    """
    if image.ndim != 3 or image.shape != label.shape:
        raise ValueError(f"expected image and label of one 3D shape, got {image.shape} and {label.shape}")
    out = np.asarray(image, dtype=np.float32)
    mask = np.asarray(label) > 0

    flips = tuple(axis for axis in range(3) if rng.random() < P_FLIP)
    if flips:
        out, mask = np.flip(out, flips), np.flip(mask, flips)
    elastic = rng.random() < P_ELASTIC
    if elastic or rng.random() < P_AFFINE:
        out, mask = _spatial(np.ascontiguousarray(out), mask, rng, elastic)
    out = np.array(out, dtype=np.float32)  # a private, contiguous copy from here on

    low, high = float(out.min()), float(out.max())
    spread = float(out.std()) or 1.0
    if rng.random() < P_GAMMA and high > low:
        gamma = np.float32(np.exp(rng.uniform(-0.4, 0.4)))
        out = np.float32(low) + np.float32(high - low) * ((out - np.float32(low)) / np.float32(high - low)) ** gamma
    if rng.random() < P_BIAS:
        bias = np.exp(np.float32(rng.uniform(0.05, 0.3)) * smooth_noise(rng, out.shape, rng.uniform(48.0, 96.0)))
        out = np.float32(low) + (out - np.float32(low)) * bias
    if rng.random() < P_SCALE_SHIFT:
        out = out * np.float32(rng.uniform(0.9, 1.1)) + np.float32(rng.uniform(-0.1, 0.1) * spread)
    if rng.random() < P_LOW_RESOLUTION:
        out = _low_resolution(out, rng)
    if rng.random() < P_NOISE:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 0.1) * spread)
    return out.astype(np.float32, copy=False), mask.astype(np.uint8)
