"""Pictures people would rather look at: three-plane overlays of a mask (and uncertainty) on an image."""

from __future__ import annotations

import io as _io
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .preprocess import physical_to_index


def _display_grid(image: sitk.Image) -> Tuple[sitk.Image, Tuple[int, int, int]]:
    """An isotropic grid in LPS orientation covering the image (for undistorted slices): a one-voxel
    image carrying its origin, spacing and direction, and the grid's size. Only three slices of it
    are ever filled, so a thick-slice volume is not resampled whole to its finest spacing."""
    oriented = sitk.DICOMOrient(image, "LPS")
    spacing = min(oriented.GetSpacing())
    size = tuple(max(1, int(round(n * s / spacing))) for n, s in zip(oriented.GetSize(), oriented.GetSpacing()))
    grid = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin(oriented.GetOrigin())
    grid.SetDirection(oriented.GetDirection())
    return grid, size


def _slice_of(grid: sitk.Image, size: Sequence[int], axis: int, index: int) -> sitk.Image:
    """The grid's slice ``index`` across ``axis`` (0: x, 1: y, 2: z), as a reference image."""
    shape = list(size)
    shape[axis] = 1
    start = [0.0, 0.0, 0.0]
    start[axis] = float(index)
    reference = sitk.Image(shape, sitk.sitkUInt8)
    reference.SetSpacing(grid.GetSpacing())
    reference.SetDirection(grid.GetDirection())
    reference.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint(start))
    return reference


def overlay_png(
    image: sitk.Image,
    mask: Optional[sitk.Image] = None,
    points: Sequence[Tuple[Sequence[float], bool]] = (),
    center_lps: Optional[Sequence[float]] = None,
    heat: Optional[sitk.Image] = None,
    title: str = "",
) -> bytes:
    """Axial, coronal and sagittal slices through ``center_lps`` with the mask outlined and clicks marked.

    Arguments:
      image: the volume.
      mask: a binary mask on the image's grid (drawn as a filled red overlay with a contour).
      points: (LPS point, positive) clicks; drawn green (positive) or red (negative) when in a slice.
      center_lps: where the slices cross; default the first point, else the mask's centre, else the image's.
      heat: an optional map (e.g. uncertainty) drawn as a semi-transparent heat overlay.
      title: figure title.

    Returns:
      PNG bytes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, size = _display_grid(image)
    if center_lps is None:
        if points:
            center_lps = points[0][0]
        elif mask is not None and sitk.GetArrayViewFromImage(mask).any():
            zyx = np.argwhere(sitk.GetArrayViewFromImage(mask)).mean(axis=0)
            center_lps = mask.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist())
        else:
            center_lps = grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])
    center = np.clip(np.round(physical_to_index(grid, center_lps)).astype(int), 0, np.asarray(size) - 1)
    cx, cy, cz = (int(v) for v in center)

    # Display orientation (x -> L, y -> P, z -> S): patient right on the screen's left, anterior and
    # superior up. Each view is one slice of the grid, resampled from the volume alone.
    def cut(volume: sitk.Image, name: str, interpolator: int) -> np.ndarray:
        axis = {"axial": 2, "coronal": 1, "sagittal": 0}[name]
        reference = _slice_of(grid, size, axis, (cx, cy, cz)[axis])
        array = sitk.GetArrayFromImage(sitk.Resample(volume, reference, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32))
        return {"axial": lambda v: v[0], "coronal": lambda v: v[::-1, 0, :], "sagittal": lambda v: v[::-1, :, 0]}[name](array)

    names = ("axial", "coronal", "sagittal")
    grays = {name: cut(image, name, sitk.sitkLinear) for name in names}
    overlays = {name: cut(mask, name, sitk.sitkNearestNeighbor) > 0.5 for name in names} if mask is not None else None
    heats = {name: cut(heat, name, sitk.sitkLinear) for name in names} if heat is not None else None
    low, high = np.percentile(np.concatenate([g.ravel() for g in grays.values()]), [1, 99.5])
    heat_top = max(max(float(h.max()) for h in heats.values()), 1e-6) if heats is not None else 1.0

    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4), dpi=100)
    for axis, name in zip(axes, names):
        axis.imshow(grays[name], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        if heats is not None:
            axis.imshow(np.ma.masked_less(heats[name], 0.05), cmap="inferno", alpha=0.6, vmin=0, vmax=heat_top)
        if overlays is not None:
            shown = overlays[name].astype(np.float32)
            axis.imshow(np.ma.masked_less(shown, 0.5), cmap="autumn", alpha=0.35, interpolation="nearest")
            if shown.any() and not shown.all():
                axis.contour(shown, levels=[0.5], colors="red", linewidths=0.8)
        for point, positive in points:
            px, py, pz = physical_to_index(grid, point)
            nz = size[2]
            location = {
                "axial": (abs(pz - cz) < 1.5, px, py),
                "coronal": (abs(py - cy) < 1.5, px, nz - 1 - pz),
                "sagittal": (abs(px - cx) < 1.5, py, nz - 1 - pz),
            }[name]
            if location[0]:
                axis.plot(location[1], location[2], marker="o", markersize=7, markeredgecolor="white",
                          color="lime" if positive else "red")
        left, right, top, bottom = {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}[name]
        for text, x, y, align in ((left, 0.01, 0.5, "left"), (right, 0.99, 0.5, "right"), (top, 0.5, 0.99, "center"),
                                  (bottom, 0.5, 0.01, "center")):
            axis.text(x, y, text, transform=axis.transAxes, color="yellow", fontsize=9, ha=align,
                      va="top" if y > 0.9 else "bottom" if y < 0.1 else "center")
        axis.set_title(name)
        axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
