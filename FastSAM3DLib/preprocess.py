"""Geometry and intensity preprocessing: from a user's image to 128^3 model crops and back.

The public models were trained on volumes resampled to 1.5 mm, turned to the canonical RAS+
orientation (torchio's ``ToCanonical``), cropped or padded to 128^3 around the target and
z-normalised over the voxels > 0. A crop here is exactly that: a 128^3 grid of 1.5 mm voxels whose
index axes point to patient Right, Anterior and Superior, placed around the prompts in physical
space. Arrays in "model order" are indexed (i, j, k) along those axes — the transpose of
SimpleITK's ``GetArrayFromImage`` order.

All physical coordinates are LPS millimetres, as ITK/SimpleITK use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .crops import CANONICAL_DIRECTION, CROP_SIZE, CROP_SPACING, IntensitySettings, normalize_crop, padding_value


def image_affine(image: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """(M, origin) with ``physical = M @ index + origin`` for SimpleITK (x, y, z) indices."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    return direction * spacing[None, :], np.asarray(image.GetOrigin(), dtype=np.float64)


@dataclass(frozen=True)
class CropGrid:
    """A size^3 grid of ``spacing`` mm voxels in canonical orientation; ``origin`` is voxel (0,0,0)'s centre (LPS)."""

    origin: Tuple[float, float, float]
    size: int = CROP_SIZE
    spacing: float = CROP_SPACING

    @classmethod
    def around(cls, center_lps: Sequence[float], size: int = CROP_SIZE, spacing: float = CROP_SPACING) -> "CropGrid":
        """The crop whose voxel (size/2, size/2, size/2) lies at ``center_lps``."""
        center = np.asarray(center_lps, dtype=np.float64)
        origin = center - CANONICAL_DIRECTION @ np.full(3, spacing * (size // 2))
        return cls(tuple(float(v) for v in origin), size, spacing)

    @property
    def matrix(self) -> np.ndarray:
        return CANONICAL_DIRECTION * self.spacing

    def to_index(self, points_lps: np.ndarray) -> np.ndarray:
        """N x 3 LPS points -> N x 3 continuous crop indices (model order)."""
        points = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
        # The inverse of CANONICAL_DIRECTION * spacing (a diagonal of +-1) is CANONICAL_DIRECTION / spacing.
        return (points - np.asarray(self.origin)) @ (CANONICAL_DIRECTION / self.spacing)

    def to_physical(self, indices: np.ndarray) -> np.ndarray:
        """N x 3 crop indices (model order) -> N x 3 LPS points."""
        return np.atleast_2d(np.asarray(indices, dtype=np.float64)) @ self.matrix.T + np.asarray(self.origin)

    def contains(self, point_lps: Sequence[float], margin: float = 0.0) -> bool:
        """Whether the point lies inside the crop, at least ``margin`` voxels from its faces."""
        index = self.to_index(np.asarray(point_lps))[0]
        return bool(np.all(index >= margin - 0.5) and np.all(index <= self.size - 0.5 - margin))

    def reference_image(self) -> sitk.Image:
        """An empty SimpleITK image with this grid (for ``sitk.Resample``)."""
        reference = sitk.Image([self.size] * 3, sitk.sitkUInt8)
        reference.SetSpacing([self.spacing] * 3)
        reference.SetOrigin(self.origin)
        reference.SetDirection(CANONICAL_DIRECTION.flatten().tolist())
        return reference


def resample_to_crop(
    image: sitk.Image, crop: CropGrid, interpolator: int = sitk.sitkLinear, default: float = 0.0
) -> np.ndarray:
    """The image on the crop grid: size^3 float32 array in model order (outside the image: ``default``)."""
    resampled = sitk.Resample(image, crop.reference_image(), sitk.Transform(), interpolator, default, sitk.sitkFloat32)
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(resampled).transpose(2, 1, 0))


def image_padding_value(image: sitk.Image, settings: IntensitySettings = IntensitySettings()) -> float:
    """:func:`~FastSAM3DLib.crops.padding_value` of an image (one pass over it for its range)."""
    if settings.mode == "ct":
        return padding_value(0.0, 0.0, settings)
    statistics = sitk.MinimumMaximumImageFilter()
    statistics.Execute(image)
    return padding_value(statistics.GetMinimum(), statistics.GetMaximum(), settings)


def crop_tensor(
    image: sitk.Image, crop: CropGrid, settings: IntensitySettings = IntensitySettings()
) -> torch.Tensor:
    """The normalised model input for a crop, padded as the session pads: 1 x 1 x size^3 float32."""
    array = normalize_crop(resample_to_crop(image, crop, default=image_padding_value(image, settings)), settings)
    return torch.from_numpy(array)[None, None]


@dataclass(frozen=True)
class Region:
    """A box of voxels of the user's image: ``start`` (inclusive) and ``stop`` (exclusive), (x, y, z)."""

    start: Tuple[int, int, int]
    stop: Tuple[int, int, int]

    @property
    def size(self) -> Tuple[int, int, int]:
        return tuple(int(b - a) for a, b in zip(self.start, self.stop))

    @property
    def empty(self) -> bool:
        return any(b <= a for a, b in zip(self.start, self.stop))

    def slices(self) -> Tuple[slice, slice, slice]:
        """Numpy slices into a ``GetArrayFromImage`` (z, y, x) array."""
        return tuple(slice(a, b) for a, b in zip(reversed(self.start), reversed(self.stop)))

    def intersection(self, other: "Region") -> "Region":
        """The voxels in both boxes (empty if they do not overlap)."""
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(max(lo, min(a, b)) for lo, a, b in zip(start, self.stop, other.stop))
        return Region(start, stop)

    def relative_to(self, origin: Sequence[int]) -> "Region":
        """This box with ``origin`` as (0, 0, 0): image indices -> indices within a region starting there."""
        return Region(tuple(a - o for a, o in zip(self.start, origin)), tuple(b - o for b, o in zip(self.stop, origin)))

    def offset_by(self, origin: Sequence[int]) -> "Region":
        """The inverse of :meth:`relative_to`: indices within a region starting at ``origin`` -> image indices."""
        return Region(tuple(a + o for a, o in zip(self.start, origin)), tuple(b + o for b, o in zip(self.stop, origin)))

    def union(self, other: "Region") -> "Region":
        if self.empty:
            return other
        if other.empty:
            return self
        return Region(
            tuple(min(a, b) for a, b in zip(self.start, other.start)),
            tuple(max(a, b) for a, b in zip(self.stop, other.stop)),
        )


def crop_region_in_image(crop: CropGrid, image: sitk.Image) -> Region:
    """The voxels of ``image`` whose centres may fall inside the crop (clipped to the image)."""
    corners = np.array([[a, b, c] for a in (-0.5, crop.size - 0.5) for b in (-0.5, crop.size - 0.5) for c in (-0.5, crop.size - 0.5)])
    physical = crop.to_physical(corners)
    matrix, origin = image_affine(image)
    indices = (physical - origin) @ np.linalg.inv(matrix).T
    size = np.asarray(image.GetSize())
    start = np.clip(np.floor(indices.min(axis=0)).astype(int), 0, size)
    stop = np.clip(np.ceil(indices.max(axis=0)).astype(int) + 1, 0, size)
    return Region(tuple(int(v) for v in start), tuple(int(v) for v in stop))


def sample_crop_logits(
    low_res_logits: torch.Tensor, crop: CropGrid, image: sitk.Image, region: Region, outside: float = -1e4
) -> np.ndarray:
    """Crop logits sampled at the centres of a region of the user's image.

    The decoder's 32^3 logits cover the crop like its 128^3 trilinear upsampling does
    (``align_corners=False``); sampling them trilinearly at each user voxel's physical position
    respects the user's spacing, origin and direction (oblique, anisotropic, flipped) exactly.

    Arguments:
      low_res_logits: 1 x 1 x L x L x L (or L x L x L) logits in model order.
      crop: the crop they belong to.
      image: the user's image (only its geometry is used).
      region: which of its voxels to compute.
      outside: the value for voxels outside the crop.

    Returns:
      float32 array in ``GetArrayFromImage`` order (z, y, x) of the region's shape.
    """
    if region.empty:
        return np.zeros(tuple(reversed(region.size)), dtype=np.float32)
    matrix, origin = image_affine(image)
    to_crop = np.linalg.inv(crop.matrix) @ matrix
    offset = np.linalg.inv(crop.matrix) @ (origin - np.asarray(crop.origin))
    axes = [np.arange(a, b, dtype=np.float64) for a, b in zip(region.start, region.stop)]
    # Continuous crop index of every region voxel: to_crop @ (x, y, z) + offset, built by broadcasting.
    xs, ys, zs = axes
    index = (
        to_crop[:, 0][None, None, None, :] * xs[None, None, :, None]
        + to_crop[:, 1][None, None, None, :] * ys[None, :, None, None]
        + to_crop[:, 2][None, None, None, :] * zs[:, None, None, None]
        + offset
    )
    # grid_sample wants (x, y, z) = (last, middle, first) axis of the input tensor, normalised with align_corners=False.
    normalized = (2.0 * index + 1.0) / crop.size - 1.0
    grid = torch.from_numpy(normalized[..., ::-1].copy()).float()[None]
    logits = low_res_logits.reshape(1, 1, *low_res_logits.shape[-3:]).float()
    sampled = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    inside = np.all((index >= -0.5) & (index <= crop.size - 0.5), axis=-1)
    return np.where(inside, sampled.numpy(), np.float32(outside)).astype(np.float32)


def upsample_logits(low_res_logits: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """32^3 decoder logits -> size^3, trilinear with ``align_corners=False`` (as in training)."""
    return F.interpolate(low_res_logits.float(), size=(size,) * 3, mode="trilinear", align_corners=False)


def physical_to_index(image: sitk.Image, point_lps: Sequence[float]) -> np.ndarray:
    """Continuous (x, y, z) index of an LPS point in the image."""
    matrix, origin = image_affine(image)
    return np.linalg.solve(matrix, np.asarray(point_lps, dtype=np.float64) - origin)


def index_to_physical(image: sitk.Image, index: Sequence[float]) -> np.ndarray:
    """LPS point of an (x, y, z) (possibly continuous) index."""
    matrix, origin = image_affine(image)
    return matrix @ np.asarray(index, dtype=np.float64) + origin


def inside_image(image: sitk.Image, point_lps: Sequence[float], tolerance: float = 0.5) -> bool:
    """Whether the point lies within the image's voxels (half a voxel beyond the edge centres)."""
    index = physical_to_index(image, point_lps)
    size = np.asarray(image.GetSize())
    return bool(np.all(index >= -tolerance) and np.all(index <= size - 1 + tolerance))


def box_center_and_extent(corner_a: Sequence[float], corner_b: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Centre and absolute per-axis extent (LPS mm) of a box given by two opposite corners."""
    a, b = np.asarray(corner_a, dtype=np.float64), np.asarray(corner_b, dtype=np.float64)
    return (a + b) / 2.0, np.abs(b - a)


def region_of_mask(mask: np.ndarray) -> Optional[Region]:
    """Bounding region (x, y, z) of the non-zero voxels of a (z, y, x) array, or None."""
    nonzero = np.nonzero(mask)
    if not nonzero[0].size:
        return None
    start = tuple(int(axis.min()) for axis in reversed(nonzero))
    stop = tuple(int(axis.max()) + 1 for axis in reversed(nonzero))
    return Region(start, stop)
