"""Pictures people would rather look at: three-plane overlays of a mask (and uncertainty) on an image."""

from __future__ import annotations

import io as _io
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .preprocess import physical_to_index


def _display_volume(image: sitk.Image) -> sitk.Image:
    """An isotropic grid in LPS orientation covering the image (for undistorted slices)."""
    oriented = sitk.DICOMOrient(image, "LPS")
    spacing = min(oriented.GetSpacing())
    size = [int(round(n * s / spacing)) for n, s in zip(oriented.GetSize(), oriented.GetSpacing())]
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetSpacing([spacing] * 3)
    reference.SetOrigin(oriented.GetOrigin())
    reference.SetDirection(oriented.GetDirection())
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

    reference = _display_volume(image)

    def resample(volume: sitk.Image, interpolator: int) -> np.ndarray:
        out = sitk.Resample(volume, reference, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)  # (z, y, x) with x->L, y->P, z->S

    gray = resample(image, sitk.sitkLinear)
    overlay = resample(mask, sitk.sitkNearestNeighbor) > 0.5 if mask is not None else None
    heat_map = resample(heat, sitk.sitkLinear) if heat is not None else None
    if center_lps is None:
        if points:
            center_lps = points[0][0]
        elif overlay is not None and overlay.any():
            zyx = np.argwhere(overlay).mean(axis=0)
            center_lps = reference.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist())
        else:
            center_lps = reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()])
    cx, cy, cz = np.clip(np.round(physical_to_index(reference, center_lps)).astype(int), 0, np.asarray(reference.GetSize()) - 1)
    low, high = np.percentile(gray, [1, 99.5])

    # Display orientation (x -> L, y -> P, z -> S): patient right on the screen's left, anterior and superior up.
    views = [
        ("axial", lambda v: v[cz, :, :]),
        ("coronal", lambda v: v[::-1, cy, :]),
        ("sagittal", lambda v: v[::-1, :, cx]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4), dpi=100)
    for axis, (name, cut) in zip(axes, views):
        axis.imshow(cut(gray), cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        if heat_map is not None:
            axis.imshow(np.ma.masked_less(cut(heat_map), 0.05), cmap="inferno", alpha=0.6, vmin=0, vmax=max(float(heat_map.max()), 1e-6))
        if overlay is not None:
            shown = cut(overlay.astype(np.float32))
            axis.imshow(np.ma.masked_less(shown, 0.5), cmap="autumn", alpha=0.35, interpolation="nearest")
            if shown.any() and not shown.all():
                axis.contour(shown, levels=[0.5], colors="red", linewidths=0.8)
        for point, positive in points:
            px, py, pz = physical_to_index(reference, point)
            nz = reference.GetSize()[2]
            location = {
                "axial": (abs(pz - cz) < 1.5, px, py),
                "coronal": (abs(py - cy) < 1.5, px, nz - 1 - pz),
                "sagittal": (abs(px - cx) < 1.5, py, nz - 1 - pz),
            }[name]
            if location[0]:
                axis.plot(location[1], location[2], marker="o", markersize=7, markeredgecolor="white",
                          color="lime" if positive else "red")
        axis.set_title(name)
        axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
