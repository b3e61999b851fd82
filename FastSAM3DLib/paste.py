"""Turning a crop's 32^3 decoder logits into a mask on the user's grid, touching only what can change.

The mask at a user voxel is ``trilinear(logits at its physical position) > 0`` (the decoder's
low-res logits upsampled with ``align_corners=False`` and border clamping, as in training). A
trilinear interpolant lies between the minimum and the maximum of the logits that support it, so
wherever all the supporting logits share one sign the answer is known without interpolating.

Two paths compute the same thing:

Axis-aligned grids (the user's axes parallel to the crop's, in any order and direction: every
image whose direction is a signed permutation, which includes Colin27 and most scans)
    Trilinear interpolation is separable: each user axis has a 1D table (which low-res cell a
    voxel falls in and its weight), computed once per crop. The user voxels of one low-res cell
    form a box. Per call, the cells are classified (all 8 corners positive, all non-positive, or
    mixed) and only the cells whose class changed since the previous call, or that are mixed,
    are written into a cached mask: a later click costs work in proportion to the band along the
    zero level set, not to the region. The first call fills the region with each voxel's cell
    class (one byte per voxel) and interpolates only the mixed cells. ``values`` runs the same
    arithmetic over every voxel as three 1D passes, so ``values(logits) > 0`` equals
    ``mask(logits)`` bit for bit (logits are read with infinities clamped and denormals flushed
    to zero, the values for which a product with a weight could change sign or become NaN).
Any other grid (oblique)
    The user's voxels are cut into 4^3 blocks whose support windows are classified the same
    way, and the voxels of mixed blocks are sampled with ``grid_sample``.

With a :class:`BoundaryRefinement` the answer near the boundary also reads the image: a voxel whose
interpolated logit is within ``band`` of 0 is decided by that logit plus a weighted intensity
log-likelihood ratio; the cells are then classified against ``band`` and ``-band`` instead of 0, so
the incremental update and the whole-region pass still compute the same thing.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

from .preprocess import CropGrid, Region, crop_region_in_image, image_affine

BLOCK = 4  # user voxels per block side (oblique path)
_CELL_BUDGET = 1 << 21  # voxels evaluated per chunk of cells (bounds temporary memory)
_FULL_FRACTION = 0.3  # above this fraction of the region to update, evaluate the whole region
_NEG, _POS, _MIXED = 0, 1, 2


@dataclass(frozen=True)
class BoundaryRefinement:
    """Where the model is unsure of its boundary, the image decides.

    The decoder's logits lie on a lattice four crop voxels apart (6 mm at the usual 1.5 mm crop
    spacing), so the boundary it draws is only as sharp as that lattice. Within ``band`` of its zero
    level set (|logit| < 4: a probability between 2 % and 98 %) each voxel's logit gets ``alpha``
    times the log-likelihood ratio of its intensity under two histograms estimated from the same
    prediction: the object's (logit > band) and its surroundings' (-3 band < logit < -band). Farther
    out the model decides alone, and where the object and its surroundings share their intensities
    the ratio, and the change, are about 0. The intensities are the user's image on its own grid.

    Attributes:
      alpha: weight of the log-likelihood ratio, in logits per nat.
      band: the |logit| below which a voxel reads its intensity (> 0; no refinement is ``None``).
      bins: intensity histogram bins (between the 0.5th and 99.5th percentiles of the region).
      samples: about this many voxels, on a regular lattice over the object and its surroundings
        (over the whole region on oblique grids), estimate the histograms (bounds the work per click).
    """

    alpha: float = 1.0
    band: float = 4.0
    bins: int = 32
    samples: int = 1 << 17

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and self.band > 0 and 2 <= self.bins <= 256 and self.samples > 0):
            raise ValueError(f"BoundaryRefinement needs alpha >= 0, band > 0, 2 <= bins <= 256 and samples > 0; got {self}")


class _AxisTable:
    """How one axis of the region's (z, y, x) array samples one axis of the low-res field.

    Attributes:
      field_axis: the low-res field axis (model order 0, 1, 2) this array axis runs along.
      cell: per voxel, the low-res cell (lattice interval ``cell .. cell+1``) it interpolates in.
      w0, w1: per voxel, float32 weights of the lattice points ``cell`` and ``cell + 1``.
      valid: per voxel, whether its centre lies inside the crop along this axis.
      has: per cell of the edge-padded field (L + 1 of them), whether any valid voxel falls in it.
      voxel_cell: per voxel, its cell of the edge-padded field (L + 1 for a voxel outside the crop).
      runs: (L+1) x R voxel indices of each padded cell, R the longest run (shorter runs repeat
        their last voxel).
      run_w0, run_w1: R x (L+1) weights of the run voxels.
      run_offset: R x (L+1), the run voxels times this axis's stride in the flattened region array.
    """

    def __init__(self, field_axis: int, scale: float, offset: float, n: int, crop_size: int, low_res: int, stride: int) -> None:
        self.field_axis = field_axis
        t = np.arange(n, dtype=np.float64)
        crop_index = scale * t + offset
        self.valid = (crop_index >= -0.5) & (crop_index <= crop_size - 0.5)
        factor = crop_size / low_res
        coordinate = np.clip((crop_index + 0.5) / factor - 0.5, 0.0, low_res - 1.0)
        cell = np.clip(np.floor(coordinate), 0, low_res - 2).astype(np.int64)
        self.cell = cell
        self.w1 = (coordinate - cell).astype(np.float32)
        self.w0 = (np.float32(1.0) - self.w1).astype(np.float32)
        # Cells of the edge-padded field (one layer each side): pseudo-cell k spans padded lattice
        # points k and k + 1. Voxels beyond the outermost lattice points (border clamping) get
        # cells of their own, so no run is longer than one cell's worth of voxels.
        pseudo = np.where(coordinate <= 0.0, 0, np.where(coordinate >= low_res - 1.0, low_res, cell + 1))
        cells = low_res + 1
        counts = np.bincount(pseudo[self.valid], minlength=cells)
        self.has = counts > 0
        self.voxel_cell = np.where(self.valid, pseudo, cells)
        width = max(int(counts.max()) if counts.size else 1, 1)
        # Runs shorter than the longest repeat their last voxel: the repeat recomputes and rewrites
        # that voxel's own value, so padding needs no sentinel and no masking.
        self.runs = np.zeros((cells, width), dtype=np.int64)
        for c in np.flatnonzero(self.has):  # once per crop, a few dozen cells
            voxels = np.flatnonzero(self.valid & (pseudo == c))
            self.runs[c, : len(voxels)] = voxels
            self.runs[c, len(voxels) :] = voxels[-1]
        # Transposed (R x cells) so that gathering the columns of K cells gives contiguous R x K arrays.
        self.run_w0 = np.ascontiguousarray(self.w0[self.runs].T)
        self.run_w1 = np.ascontiguousarray(self.w1[self.runs].T)
        self.run_offset = np.ascontiguousarray((self.runs * stride).T)


class CropPaster:
    """Maps one crop's low-res logits onto a region of one user image.

    Arguments:
      crop: the model crop.
      image: the user's image (its geometry; its intensities too with a refinement).
      low_res_size: side of the decoder's logit grid (32).
      refinement: decide the voxels near the boundary with the image as well (None: the logits alone).

    ``mask`` / ``update`` keep the previous answer to update it incrementally (``update`` also says
    where it changed); calls are serialised by a lock, and any sequence of logits (several objects
    sharing one crop) gives exact answers.
    """

    def __init__(self, crop: CropGrid, image: sitk.Image, low_res_size: int = 32,
                 refinement: Optional[BoundaryRefinement] = None) -> None:
        self.crop = crop
        self.region: Region = crop_region_in_image(crop, image)
        self.low_res_size = low_res_size
        self.refinement = refinement if refinement is not None and not self.region.empty else None
        # Per region voxel ((z, y, x) order), its intensity's histogram bin.
        self._bins: Optional[np.ndarray] = self._intensity_bins(image) if self.refinement is not None else None
        matrix, origin = image_affine(image)
        crop_inverse = np.linalg.inv(crop.matrix)
        # Continuous crop index (model order) = to_crop @ user index (x, y, z) + offset.
        self._to_crop = crop_inverse @ matrix
        self._offset = crop_inverse @ (origin - np.asarray(crop.origin)) + self._to_crop @ np.asarray(self.region.start)
        self._lock = threading.Lock()
        self.owner: object = None  # whose logits the kept mask holds (the session's bookkeeping)
        self._last_logits: Optional[torch.Tensor] = None
        self._axes: Optional[List[_AxisTable]] = self._axis_tables()
        self._cached_mask: Optional[np.ndarray] = None  # flat (z, y, x) uint8 of the last answer
        self._cached_state: Optional[np.ndarray] = None  # cell classes of the last answer (separable path)
        if self._axes is None:
            self._blocks = tuple(-(-n // BLOCK) for n in self.region.size)  # blocks per axis (x, y, z)
            self._prepare_support()

    @property
    def axis_aligned(self) -> bool:
        """Whether the separable (incremental) path is used."""
        return self._axes is not None

    # -- geometry ------------------------------------------------------------------------------

    def _axis_tables(self) -> Optional[List[_AxisTable]]:
        """Per-axis tables for the (z, y, x) array axes when the grid is axis-aligned, else None."""
        if self.region.empty:
            return None
        a = self._to_crop
        magnitude = np.abs(a)
        field_axes = magnitude.argmax(axis=0)  # for user axis x, y, z: the crop axis it moves along
        if sorted(field_axes.tolist()) != [0, 1, 2]:
            return None
        off_axis = magnitude.copy()
        off_axis[field_axes, np.arange(3)] = 0.0
        if off_axis.max() > 1e-9 * magnitude.max():
            return None
        tables = []
        nx, ny, _ = self.region.size
        for user_axis, stride in ((2, nx * ny), (1, nx), (0, 1)):  # array order z, y, x
            f = int(field_axes[user_axis])
            tables.append(
                _AxisTable(
                    f,
                    float(a[f, user_axis]),
                    float(self._offset[f]),
                    self.region.size[user_axis],
                    self.crop.size,
                    self.low_res_size,
                    stride,
                )
            )
        return tables

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

    # -- shared helpers --------------------------------------------------------------------------

    def _intensity_bins(self, image: sitk.Image) -> np.ndarray:
        """The region's voxels' intensity bins, uint8 (z, y, x), between the region's 0.5th and 99.5th percentiles."""
        array = sitk.GetArrayViewFromImage(image)[self.region.slices()]
        step = max(1, math.ceil((array.size / 2e5) ** (1 / 3)))  # percentiles of about 200,000 voxels
        sample = array[::step, ::step, ::step]
        low, high = np.percentile(sample, [0.5, 99.5])
        if high <= low:  # e.g. a zero background around a small object: the full range instead
            low, high = float(sample.min()), float(sample.max())
        bins = self.refinement.bins
        index = array.astype(np.float32)  # a copy, worked on in place
        index -= np.float32(low)
        index *= np.float32(bins / (high - low) if high > low else 0.0)
        np.clip(index, 0, bins - 1, out=index)
        return index.astype(np.uint8)

    def _correction(self, logits_at: np.ndarray, bins_at: np.ndarray) -> Optional[np.ndarray]:
        """Per intensity bin, ``alpha`` times the log-likelihood ratio of object and surroundings,
        from sampled logits and their voxels' bins; None without a refinement."""
        refinement = self.refinement
        if refinement is None:
            return None
        band = refinement.band
        smooth = np.array([0.25, 0.5, 0.25])
        counts = [np.convolve(np.bincount(samples, minlength=refinement.bins).astype(np.float64), smooth, mode="same")
                  for samples in (bins_at[logits_at > band], bins_at[(logits_at < -band) & (logits_at > -3 * band)])]
        inside, around = counts
        if inside.sum() == 0 or around.sum() == 0:
            return np.zeros(refinement.bins, dtype=np.float32)
        ratio = np.log((inside + 0.5) / inside.sum()) - np.log((around + 0.5) / around.sum())
        # Shrunk toward 0 where a bin holds few samples: an intensity seen rarely on either side says little.
        evidence = inside + around
        return (refinement.alpha * ratio * evidence / (evidence + 10.0)).astype(np.float32)

    def _refine(self, values: np.ndarray, bins: np.ndarray, correction: Optional[np.ndarray]) -> None:
        """In place: the voxels with |value| < band get their bin's correction."""
        if correction is None:
            return
        near = np.abs(values) < self.refinement.band
        values[near] += correction[bins[near]]

    def _threshold(self) -> float:
        """Cells whose corners all lie above this (or all at or below minus it) need no interpolation.

        With a refinement, a little beyond ``band``: an interpolated value of corners all at -band
        may round to just above it, inside the band, where the voxel-wise answer reads its intensity.
        """
        return self.refinement.band * (1 + 1e-5) if self.refinement is not None else 0.0

    @staticmethod
    def _field(low_res: torch.Tensor) -> np.ndarray:
        field = np.clip(low_res.detach().reshape(*low_res.shape[-3:]).float().cpu().numpy(), -1e30, 1e30)
        field[np.abs(field) < np.finfo(np.float32).tiny] = 0.0
        return field

    def _oriented(self, field: np.ndarray) -> np.ndarray:
        """The low-res field with its axes in the region array's (z, y, x) order."""
        return np.ascontiguousarray(field.transpose([t.field_axis for t in self._axes]))

    # -- axis-aligned path -------------------------------------------------------------------------

    @staticmethod
    def _corner_range(padded: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Per cell of a field, the lowest and the highest of its 8 corners."""
        low = high = None
        n0, n1, n2 = (n - 1 for n in padded.shape)
        for dz, dy, dx in np.ndindex(2, 2, 2):
            view = padded[dz : dz + n0, dy : dy + n1, dx : dx + n2]
            low = view.copy() if low is None else np.minimum(low, view, out=low)
            high = view.copy() if high is None else np.maximum(high, view, out=high)
        return low, high

    @staticmethod
    def _cell_states(low: np.ndarray, high: np.ndarray, threshold: float) -> np.ndarray:
        """_POS where all 8 corners > threshold, _NEG where all <= -threshold, _MIXED otherwise."""
        states = np.full(low.shape, _MIXED, dtype=np.uint8)
        states[low > threshold] = _POS
        states[high <= -threshold] = _NEG
        return states

    def _write_cells(self, padded: np.ndarray, cells: np.ndarray, out_flat: np.ndarray, correction: Optional[np.ndarray]) -> Region:
        """Write ``trilinear > 0`` (refined, with a correction) at every voxel of the given cells of
        the edge-padded field (K x 3, array order); returns the region-local box of the voxels whose
        value changed.

        The K cells are the last, contiguous axis of every temporary, and the short loops over a
        run's voxels keep each NumPy call a plain contiguous loop (broadcasting over small middle
        axes is several times slower). The arithmetic is values()'s, in the same order: along z,
        then y, then x.
        """
        tz, ty, tx = self._axes
        rz, ry, rx = tz.run_w0.shape[0], ty.run_w0.shape[0], tx.run_w0.shape[0]
        step = max(1, _CELL_BUDGET // (rz * ry * rx))
        changed = Region((0, 0, 0), (0, 0, 0))
        for begin in range(0, len(cells), step):
            a, b, c = cells[begin : begin + step].T
            k = len(a)
            corners = np.stack([padded[a + dz, b + dy, c + dx] for dz, dy, dx in np.ndindex(2, 2, 2)]).reshape(2, 2, 2, k)
            low, high = corners[0], corners[1]  # dy x dx x K at the cell's lower / upper z lattice point
            wz0, wz1, wy0, wy1 = tz.run_w0[:, a], tz.run_w1[:, a], ty.run_w0[:, b], ty.run_w1[:, b]
            hz = np.empty((rz, 2, 2, k), dtype=np.float32)
            for i in range(rz):
                np.add(low * wz0[i], high * wz1[i], out=hz[i])
            hy = np.empty((2, rz, ry, k), dtype=np.float32)  # dx x rz x ry x K
            for j in range(ry):
                for dx in (0, 1):
                    np.add(hz[:, 0, dx] * wy0[j], hz[:, 1, dx] * wy1[j], out=hy[dx, :, j])
            inside = np.empty((rx, rz, ry, k), dtype=np.float32)
            upper = np.empty((rz, ry, k), dtype=np.float32)
            wx0, wx1 = tx.run_w0[:, c], tx.run_w1[:, c]
            zy = tz.run_offset[:, None, a] + ty.run_offset[None, :, b]  # rz x ry x K
            flat = np.empty((rx, rz, ry, k), dtype=np.int64)
            xoff = tx.run_offset[:, c]
            for i in range(rx):
                np.multiply(hy[0], wx0[i], out=inside[i])
                np.multiply(hy[1], wx1[i], out=upper)
                inside[i] += upper
                np.add(zy, xoff[i], out=flat[i])
            if correction is not None:
                self._refine(inside, self._bins.reshape(-1)[flat], correction)
            flat, answer = flat.reshape(-1), (inside > 0).reshape(-1)
            moved = flat[out_flat[flat] != answer]
            out_flat[flat] = answer
            if moved.size:
                xyz = np.unravel_index(moved, tuple(len(t.cell) for t in self._axes))[::-1]
                changed = changed.union(Region(tuple(int(i.min()) for i in xyz), tuple(int(i.max()) + 1 for i in xyz)))
        return changed

    def _separable_correction(self, field: np.ndarray, high: np.ndarray) -> Optional[np.ndarray]:
        """The refinement's per-bin correction, from a lattice of voxels over the cells whose
        highest corner exceeds -3 band (the object and its surroundings); None without a refinement."""
        if self.refinement is None:
            return None
        near = np.nonzero(high > -3 * self.refinement.band)
        spans = []
        for axis, table in enumerate(self._axes):
            cells = np.arange(near[axis].min(), near[axis].max() + 1) if len(near[0]) else np.zeros(0, dtype=np.int64)
            voxels = table.runs[cells[table.has[cells]]]
            spans.append((int(voxels.min()), int(voxels.max()) + 1) if voxels.size else (0, 0))
        step = max(1, math.ceil((math.prod(b - a for a, b in spans) / self.refinement.samples) ** (1 / 3)))
        picks = [np.arange(a, b, step) for a, b in spans]
        return self._correction(self._interpolate(field, picks), self._bins[np.ix_(*picks)])

    def _update_separable(self, logits: torch.Tensor) -> Region:
        field = self._oriented(self._field(logits))
        padded = np.pad(field, 1, mode="edge")
        low, high = self._corner_range(padded)
        states = self._cell_states(low, high, self._threshold())
        correction = self._separable_correction(field, high)
        tz, ty, tx = self._axes
        shape = tuple(len(t.cell) for t in self._axes)
        size = int(np.prod(shape))
        present = tz.has[:, None, None] & ty.has[None, :, None] & tx.has[None, None, :]
        first = self._cached_mask is None
        if first:
            update = present & (states == _MIXED)
        else:
            update = present & ((states != self._cached_state) | (states == _MIXED))
        cells = np.argwhere(update)
        per_cell = tz.run_w0.shape[0] * ty.run_w0.shape[0] * tx.run_w0.shape[0]
        if len(cells) * per_cell > _FULL_FRACTION * size:
            # Most of the region changes (noisy logits): three 1D passes over everything are
            # cheaper than the cell-wise update, and equal to it.
            if first:
                self._cached_mask = np.empty(size, dtype=np.uint8)
            values = self._interpolate(field)
            self._refine(values, self._bins, correction)
            np.greater(values, 0, out=self._cached_mask.reshape(shape), casting="unsafe")
            changed = self._whole
        elif first:
            # Start from the answer of the cells whose corners all agree (a gather of one byte per
            # voxel), then interpolate the mixed cells along the zero level set.
            self._cached_mask = self._fill_cells(states == _POS)
            self._write_cells(padded, cells, self._cached_mask, correction)
            changed = self._whole
        elif len(cells):
            changed = self._write_cells(padded, cells, self._cached_mask, correction)
        else:
            changed = Region((0, 0, 0), (0, 0, 0))
        self._cached_state = states
        return changed

    def _fill_cells(self, cell_values: np.ndarray) -> np.ndarray:
        """Flat (z, y, x) uint8 array of the region with each voxel set to its padded cell's value
        (0 outside the crop)."""
        tz, ty, tx = self._axes
        values = np.pad(cell_values.astype(np.uint8), (0, 1))  # + the outside cell (index L + 1), 0
        rows = values[tz.voxel_cell][:, ty.voxel_cell]  # nz x ny x cells
        return np.take(rows, tx.voxel_cell, axis=2).reshape(-1)

    def _interpolate(self, field: np.ndarray, picks: Optional[List[np.ndarray]] = None) -> np.ndarray:
        """Trilinear values of an oriented field at every region voxel, or at the voxels of the
        lattice ``picks`` (per array axis z, y, x, the voxel indices); -inf outside the crop."""
        (cz, wz0, wz1, vz), (cy, wy0, wy1, vy), (cx, wx0, wx1, vx) = (
            (t.cell, t.w0, t.w1, t.valid) if picks is None else (t.cell[p], t.w0[p], t.w1[p], t.valid[p])
            for t, p in zip(self._axes, picks or [None] * 3)
        )
        g = field[cz] * wz0[:, None, None] + field[cz + 1] * wz1[:, None, None]  # nz x L x L
        g = g[:, cy] * wy0[None, :, None] + g[:, cy + 1] * wy1[None, :, None]  # nz x ny x L
        out = np.take(g, cx, axis=2)
        out *= wx0
        upper = np.take(g, cx + 1, axis=2)
        upper *= wx1
        out += upper
        out[~vz] = -np.inf
        out[:, ~vy] = -np.inf
        out[:, :, ~vx] = -np.inf
        return out

    # -- oblique path ------------------------------------------------------------------------------

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

    def _mask_blocks(self, logits: torch.Tensor) -> np.ndarray:
        size = self.region.size
        values = self._field(logits)
        w = self._window
        padded = np.pad(values, [(0, w)] * 3, mode="edge")
        windows = sliding_window_view(padded, (w, w, w))[: values.shape[0], : values.shape[1], : values.shape[2]]
        window_min = windows.min(axis=(-3, -2, -1))
        window_max = windows.max(axis=(-3, -2, -1))
        s = self._support_start
        block_min = window_min[s[:, 0], s[:, 1], s[:, 2]]
        block_max = window_max[s[:, 0], s[:, 1], s[:, 2]]
        # Blocks reaching outside the crop are never filled wholesale: their outside voxels stay 0.
        threshold = self._threshold()
        positive = (block_min > threshold) & self._inside
        mixed = (block_max > -threshold) & ~positive

        nbx, nby, nbz = self._blocks
        block_values = positive.reshape(nbx, nby, nbz).astype(np.uint8)
        full = np.repeat(np.repeat(np.repeat(block_values, BLOCK, 0), BLOCK, 1), BLOCK, 2)
        mixed_ids = np.flatnonzero(mixed)
        if mixed_ids.size:
            voxels = self._block_voxels(mixed_ids)
            sampled = self._sample(torch.from_numpy(values), voxels)
            if self.refinement is not None:
                clipped = np.minimum(voxels, np.asarray(size) - 1)  # blocks overhang the region; that part is cut below
                self._refine(sampled, self._bins[clipped[:, 2], clipped[:, 1], clipped[:, 0]], self._oblique_correction(values))
            full[voxels[:, 0], voxels[:, 1], voxels[:, 2]] = (sampled > 0).astype(np.uint8)
        full = full[: size[0], : size[1], : size[2]]
        return np.ascontiguousarray(full.transpose(2, 1, 0))

    def _oblique_correction(self, field: np.ndarray) -> Optional[np.ndarray]:
        """The refinement's per-bin correction from a regular lattice of the region's voxels."""
        if self.refinement is None:
            return None
        step = max(1, math.ceil((math.prod(self.region.size) / self.refinement.samples) ** (1 / 3)))
        axes = [np.arange(0, n, step) for n in self.region.size]
        local = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        values = self._sample(torch.from_numpy(field), local)
        return self._correction(values, self._bins[local[:, 2], local[:, 1], local[:, 0]])

    def _values_oblique(self, low_res: torch.Tensor) -> np.ndarray:
        size = self.region.size
        field = low_res.detach().reshape(1, 1, *low_res.shape[-3:]).float().cpu()
        xs, ys, zs = (np.arange(n, dtype=np.float64) for n in size)
        a, offset = self._to_crop, self._offset
        out = np.empty(tuple(reversed(size)), dtype=np.float32)
        for z in range(0, size[2], 16):  # slabs bound the temporary grid's memory
            zz = zs[z : z + 16]
            index = (
                a[:, 0][None, None, None, :] * xs[None, None, :, None]
                + a[:, 1][None, None, None, :] * ys[None, :, None, None]
                + a[:, 2][None, None, None, :] * zz[:, None, None, None]
                + offset
            )  # slab x ny x nx x 3
            grid = torch.from_numpy(((2.0 * index + 1.0) / self.crop.size - 1.0)[..., ::-1].astype(np.float32))
            sampled = F.grid_sample(field, grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
            inside = np.all((index >= -0.5) & (index <= self.crop.size - 0.5), axis=-1)
            out[z : z + 16] = np.where(inside, sampled.numpy(), -np.inf)
        return out

    # -- public ------------------------------------------------------------------------------------

    def mask(self, logits: torch.Tensor) -> np.ndarray:
        """The region's mask ``logits > 0``: uint8 array in (z, y, x) order of the region's shape.

        Arguments:
          logits: the crop's low-res logits, L x L x L (any leading singleton dims), model order.
        """
        with self._lock:
            self._update(logits)
            return self._cached_array().copy()

    def update(self, logits: torch.Tensor) -> Region:
        """Bring the kept mask to ``logits > 0``; returns the region-local box (x, y, z voxel
        indices relative to ``region.start``) outside which no voxel changed since the previous
        ``mask``/``update`` call: the whole region on the first call and on the oblique path,
        else the cells along the zero level set that were rewritten (the very same tensor object
        as the previous call counts as unchanged). Read it with :meth:`read`.
        """
        with self._lock:
            return self._update(logits)

    def read(self, box: Optional[Region] = None) -> np.ndarray:
        """A copy of the kept mask in a region-local box (default: all of it), (z, y, x) order."""
        with self._lock:
            array = self._cached_array()
            return array[box.slices()].copy() if box is not None else array.copy()

    @property
    def _whole(self) -> Region:
        return Region((0, 0, 0), self.region.size)

    def _cached_array(self) -> np.ndarray:
        shape = tuple(reversed(self.region.size))
        if self._cached_mask is None:
            return np.zeros(shape, dtype=np.uint8)
        return self._cached_mask.reshape(shape)

    def _update(self, logits: torch.Tensor) -> Region:
        if self.region.empty:
            return self._whole
        if logits is self._last_logits:  # the very same tensor again (e.g. a repeated call): nothing to do
            return Region((0, 0, 0), (0, 0, 0))
        if self._axes is not None:
            changed = self._update_separable(logits)
        else:
            self._cached_mask = self._mask_blocks(logits).reshape(-1)
            changed = self._whole
        self._last_logits = logits
        return changed

    def values(self, low_res: torch.Tensor) -> np.ndarray:
        """Any low-res field (logits, probabilities) sampled trilinearly at every region voxel.

        Returns float32 (z, y, x) of the region's shape; voxels outside the crop get -inf.
        """
        if self.region.empty:
            return np.zeros(tuple(reversed(self.region.size)), dtype=np.float32)
        if self._axes is not None:
            return self._interpolate(self._oriented(self._field(low_res)))
        return self._values_oblique(low_res)

    def decision_values(self, low_res: torch.Tensor) -> np.ndarray:
        """What the mask thresholds at 0: :meth:`values`, plus the refinement's correction near the
        boundary when there is one (``mask(logits) == (decision_values(logits) > 0)``)."""
        values = self.values(low_res)
        if self.refinement is None or self.region.empty:
            return values
        field = self._field(low_res)
        if self._axes is not None:
            oriented = self._oriented(field)
            correction = self._separable_correction(oriented, self._corner_range(np.pad(oriented, 1, mode="edge"))[1])
        else:
            correction = self._oblique_correction(field)
        self._refine(values, self._bins, correction)
        return values

    def local_index(self, user_index: Tuple[int, int, int]) -> Tuple[int, int, int]:
        """A user (x, y, z) index relative to the region start."""
        return tuple(int(u - s) for u, s in zip(user_index, self.region.start))
