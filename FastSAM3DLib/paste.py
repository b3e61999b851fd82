"""Turning a crop's 32^3 decoder logits into a mask on the user's grid, touching only what can change.

The mask at a user voxel is ``trilinear(logits at its physical position) > 0``. A trilinear
interpolant lies between the minimum and the maximum of the logits that support it, so wherever all
the supporting logits share one sign the answer is known without interpolating. The user's voxels
covered by a crop are cut into small blocks; per click, a block whose support is all positive or
all non-positive is filled directly, and only the blocks along the zero level set are interpolated.
The block geometry is computed once per crop.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

from .preprocess import CropGrid, Region, crop_region_in_image, image_affine

BLOCK = 4  # user voxels per block side


class CropPaster:
    """Maps one crop's low-res logits onto a region of one user image.

    Arguments:
      crop: the model crop.
      image: the user's image (only its geometry is used).
      low_res_size: side of the decoder's logit grid (32).
    """

    def __init__(self, crop: CropGrid, image: sitk.Image, low_res_size: int = 32) -> None:
        self.crop = crop
        self.region: Region = crop_region_in_image(crop, image)
        self.low_res_size = low_res_size
        matrix, origin = image_affine(image)
        crop_inverse = np.linalg.inv(crop.matrix)
        # Continuous crop index (model order) = to_crop @ user index (x, y, z) + offset.
        self._to_crop = crop_inverse @ matrix
        self._offset = crop_inverse @ (origin - np.asarray(crop.origin)) + self._to_crop @ np.asarray(self.region.start)
        self._blocks = tuple(-(-n // BLOCK) for n in self.region.size)  # blocks per axis (x, y, z)
        self._prepare_support()

    # -- geometry ------------------------------------------------------------------------------

    def _crop_index(self, local: np.ndarray) -> np.ndarray:
        """... x 3 region-local user indices (x, y, z) -> ... x 3 crop indices."""
        return local @ self._to_crop.T + self._offset

    def _low_res_coordinate(self, crop_index: np.ndarray) -> np.ndarray:
        """Crop index (128 grid) -> low-res coordinate with align_corners=False."""
        scale = self.crop.size / self.low_res_size
        return (crop_index + 0.5) / scale - 0.5

    def _prepare_support(self) -> None:
        if self.region.empty:
            self._support_start = np.zeros((0, 3), dtype=np.int64)
            self._window = 1
            self._inside = np.zeros(0, dtype=bool)
            return
        nbx, nby, nbz = self._blocks
        bx, by, bz = np.meshgrid(np.arange(nbx), np.arange(nby), np.arange(nbz), indexing="ij")
        lower = np.stack([bx, by, bz], axis=-1).reshape(-1, 3) * BLOCK
        upper = np.minimum(lower + BLOCK - 1, np.asarray(self.region.size) - 1)
        corners = np.stack(
            [np.where(np.array(bits, dtype=bool), upper, lower) for bits in np.ndindex(2, 2, 2)], axis=1
        )  # blocks x 8 x 3
        crop_idx = self._crop_index(corners.astype(np.float64))
        coordinate = self._low_res_coordinate(crop_idx)
        low, high = coordinate.min(axis=1), coordinate.max(axis=1)
        last = self.low_res_size - 1
        start = np.clip(np.floor(low), 0, last).astype(np.int64)
        stop = np.clip(np.floor(high) + 1, 0, last).astype(np.int64)
        self._window = int(max(1, (stop - start).max() + 1))
        self._support_start = start
        half = 0.5
        self._inside = np.all((crop_idx.min(axis=1) >= -half) & (crop_idx.max(axis=1) <= self.crop.size - half), axis=1)

    # -- evaluation ----------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, local: np.ndarray) -> np.ndarray:
        """Trilinear logits at N x 3 region-local user indices; -inf outside the crop."""
        crop_idx = self._crop_index(local.astype(np.float64))
        normalized = (2.0 * crop_idx + 1.0) / self.crop.size - 1.0
        grid = torch.from_numpy(normalized[:, ::-1].copy()).float().reshape(1, 1, 1, -1, 3)
        values = F.grid_sample(
            logits.reshape(1, 1, *logits.shape[-3:]).float(), grid, mode="bilinear", padding_mode="border", align_corners=False
        ).reshape(-1).numpy()
        inside = np.all((crop_idx >= -0.5) & (crop_idx <= self.crop.size - 0.5), axis=1)
        return np.where(inside, values, -np.inf).astype(np.float32)

    def _block_voxels(self, block_ids: np.ndarray) -> np.ndarray:
        """All region-local voxel indices (x, y, z) of the given blocks: (len * BLOCK^3) x 3 (may exceed the region)."""
        nbx, nby, nbz = self._blocks
        bx, by, bz = np.unravel_index(block_ids, (nbx, nby, nbz))
        offsets = np.stack(np.meshgrid(*[np.arange(BLOCK)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
        lower = np.stack([bx, by, bz], axis=-1) * BLOCK
        return (lower[:, None, :] + offsets[None, :, :]).reshape(-1, 3)

    def mask(self, logits: torch.Tensor) -> np.ndarray:
        """The region's mask ``logits > 0``: uint8 array in (z, y, x) order of the region's shape.

        Arguments:
          logits: the crop's low-res logits, L x L x L (any leading singleton dims), model order.
        """
        size = self.region.size
        if self.region.empty:
            return np.zeros(tuple(reversed(size)), dtype=np.uint8)
        values = logits.detach().reshape(*logits.shape[-3:]).float().cpu().numpy()
        w = self._window
        padded = np.pad(values, [(0, w)] * 3, mode="edge")
        windows = sliding_window_view(padded, (w, w, w))[: values.shape[0], : values.shape[1], : values.shape[2]]
        window_min = windows.min(axis=(-3, -2, -1))
        window_max = windows.max(axis=(-3, -2, -1))
        s = self._support_start
        block_min = window_min[s[:, 0], s[:, 1], s[:, 2]]
        block_max = window_max[s[:, 0], s[:, 1], s[:, 2]]
        # Blocks reaching outside the crop are never filled wholesale: their outside voxels stay 0.
        positive = (block_min > 0) & self._inside
        mixed = (block_max > 0) & ~positive

        nbx, nby, nbz = self._blocks
        block_values = positive.reshape(nbx, nby, nbz).astype(np.uint8)
        full = np.repeat(np.repeat(np.repeat(block_values, BLOCK, 0), BLOCK, 1), BLOCK, 2)
        mixed_ids = np.flatnonzero(mixed)
        if mixed_ids.size:
            voxels = self._block_voxels(mixed_ids)
            full[voxels[:, 0], voxels[:, 1], voxels[:, 2]] = (
                self._sample(torch.from_numpy(values), voxels) > 0
            ).astype(np.uint8)
        full = full[: size[0], : size[1], : size[2]]
        return np.ascontiguousarray(full.transpose(2, 1, 0))

    def values(self, low_res: torch.Tensor) -> np.ndarray:
        """Any low-res field (logits, probabilities) sampled trilinearly at every region voxel.

        Returns float32 (z, y, x) of the region's shape; voxels outside the crop get -inf.
        """
        size = self.region.size
        field = low_res.detach().reshape(*low_res.shape[-3:]).float().cpu()
        xs, ys, zs = (np.arange(n) for n in size)
        grid = np.stack(np.meshgrid(xs, ys, zs, indexing="ij"), axis=-1).reshape(-1, 3)
        sampled = self._sample(field, grid).reshape(size)
        return np.ascontiguousarray(sampled.transpose(2, 1, 0))

    def local_index(self, user_index: Tuple[int, int, int]) -> Tuple[int, int, int]:
        """A user (x, y, z) index relative to the region start."""
        return tuple(int(u - s) for u, s in zip(user_index, self.region.start))
