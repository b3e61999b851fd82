"""The README picture: a three-plane overlay rendered headless from MRML nodes (``slicer-core``).

``python Testing/tests/test_slicer_screenshot.py`` rewrites ``Resources/Screenshots/slicer_overlay.png``;
the test renders the same picture into a temporary folder and checks it. Everything drawn comes from
the MRML scene: the Colin27 volume node (read by Slicer's NIfTI reader), a segmentation node whose
segments are read back with Slicer's labelmap export, and the click position in RAS. The segmentation
holds the AAL left putamen (the click target, imported with Slicer's labelmap import) and, when this
install has bundled model weights, FastSAM3D's segment from one click written by ``FastSAM3DLogic``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
OUTPUT = REPO / "Resources" / "Screenshots" / "slicer_overlay.png"


def _array(imageData):
    from vtk.util import numpy_support

    dims = imageData.GetDimensions()
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(dims[::-1])


def build_scene():
    """Colin27 + a segmentation with the AAL left putamen (and FastSAM3D's result if a model is bundled)."""
    import SimpleITK as sitk

    import slicer

    sys.path.insert(0, str(REPO / "FastSAM3D"))
    import FastSAM3DLogic as FL
    from FastSAM3DLib.data import interior_point, read_aal_names

    FL.ensureSegmentationConverterRules()
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Colin27 T1")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(CH2))
    assert storage.ReadData(volume)

    names = {name: value for value, name in read_aal_names(CH2.parent / "aal.nii.txt").items()}
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AAL")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(CH2.parent / "aal.nii.gz"))
    assert storage.ReadData(labels)
    aal = _array(labels.GetImageData())
    aal[aal != names["Putamen_L"]] = 0
    aal[aal > 0] = 1
    labels.GetImageData().Modified()

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, segmentation)
    reference = segmentation.GetSegmentation().GetNthSegmentID(0)
    segmentation.GetSegmentation().GetSegment(reference).SetName("Left putamen (AAL atlas)")

    label = sitk.Cast(sitk.ReadImage(str(CH2.parent / "aal.nii.gz")) == names["Putamen_L"], sitk.sitkUInt8)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(label)
    box = stats.GetBoundingBox(1)  # the distance transform only needs the label's neighbourhood
    start = [max(0, b - 2) for b in box[:3]]
    size = [min(label.GetSize()[a] - start[a], box[3 + a] + 4) for a in range(3)]
    _, lps = interior_point(sitk.RegionOfInterest(label, size, start))
    clickRAS = np.array([-lps[0], -lps[1], lps[2]])

    from FastSAM3DLib import bundled_model_path, load_model

    model_segment = None
    if bundled_model_path() is not None:
        logic = FL.FastSAM3DLogic(model=load_model(None, device="cpu"), device="cpu")
        model_segment = segmentation.GetSegmentation().AddEmptySegment("fastsam3d", "FastSAM3D, 1 click")
        logic.segmentFromPoints(volume, segmentation, model_segment, [clickRAS], [1])
    return scene, volume, segmentation, reference, model_segment, clickRAS


def segment_on_volume_grid(segmentation, segmentId, volume):
    """A segment exported by Slicer onto the volume's grid."""
    import slicer

    scene = segmentation.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, [segmentId], labelmap, volume)
        return _array(labelmap.GetImageData()) > 0
    finally:
        scene.RemoveNode(labelmap)


def render(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import vtk

    scene, volume, segmentation, reference, model_segment, clickRAS = build_scene()
    image = _array(volume.GetImageData()).astype(np.float32)
    matrix = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(matrix)
    ijk = np.round(np.array(matrix.MultiplyPoint((*clickRAS, 1.0)))[:3]).astype(int)
    layers = [(segment_on_volume_grid(segmentation, reference, volume), (0.95, 0.75, 0.1), "AAL left putamen (click target)")]
    if model_segment is not None:
        layers.insert(0, (segment_on_volume_grid(segmentation, model_segment, volume), (0.2, 0.85, 0.3), "FastSAM3D, 1 click"))

    low, high = np.percentile(image[image > 0], (1, 99.5))
    i, j, k = ijk
    # Slicer's display convention: patient right on the screen's left (axial, coronal), anterior up.
    views = [
        ("Axial", lambda a: a[k, :, :][::-1, ::-1], (i, j)),
        ("Coronal", lambda a: a[:, j, :][::-1, ::-1], (i, k)),
        ("Sagittal", lambda a: a[:, :, i][::-1, :], (j, k)),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(10.5, 3.9), dpi=88, facecolor="black")
    for axis, (title, cut, _) in zip(axes, views):
        axis.imshow(cut(image), cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        for mask, color, _name in layers:
            plane = cut(mask.astype(np.float32))
            rgba = np.zeros(plane.shape + (4,))
            rgba[..., :3] = color
            rgba[..., 3] = 0.45 * plane
            axis.imshow(rgba, interpolation="nearest")
            axis.contour(plane, levels=[0.5], colors=[color], linewidths=1.0)
        axis.set_title(title, color="white", fontsize=10)
        axis.axis("off")
    # The click, at its voxel in each plane (same flips as the images).
    shape = image.shape
    axes[0].plot(shape[2] - 1 - i, shape[1] - 1 - j, "o", ms=5, mfc="white", mec="black")
    axes[1].plot(shape[2] - 1 - i, shape[0] - 1 - k, "o", ms=5, mfc="white", mec="black")
    axes[2].plot(j, shape[0] - 1 - k, "o", ms=5, mfc="white", mec="black")
    for axis in axes[:2]:
        axis.text(0.02, 0.5, "R", color="white", transform=axis.transAxes, fontsize=9)
        axis.text(0.95, 0.5, "L", color="white", transform=axis.transAxes, fontsize=9)
    axes[2].text(0.02, 0.5, "P", color="white", transform=axes[2].transAxes, fontsize=9)
    axes[2].text(0.95, 0.5, "A", color="white", transform=axes[2].transAxes, fontsize=9)
    legend = " | ".join(f"{name}" for _m, _c, name in layers) + " | white dot: the click"
    figure.suptitle(f"Colin27 T1 in MRML (slicer-core), rendered headless: {legend}", color="white", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, facecolor="black")
    plt.close(figure)
    return path


@pytest.mark.skipif(not CH2.exists(), reason="Debian mricron-data (Colin27) is not installed")
def test_render_overlay(tmp_path):
    pytest.importorskip("slicer")
    from PIL import Image

    out = render(tmp_path / "overlay.png")
    assert out.stat().st_size < 300_000
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    yellowish = (pixels[..., 0] > 150) & (pixels[..., 1] > 110) & (pixels[..., 2] < 90)
    assert yellowish.sum() > 100  # the segment overlay is visible


if __name__ == "__main__":
    print(render(OUTPUT))
