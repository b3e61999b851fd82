"""``FastSAM3D/FastSAM3DLogic.py`` on real MRML (``slicer-core``): volumes, segmentations, transforms.

What is real here: the MRML scene, volume nodes read by Slicer's own NIfTI reader
(``vtkMRMLVolumeArchetypeStorageNode``), segmentation nodes and their binary-labelmap layers,
linear transform nodes, markups, Slicer's labelmap export (used to check results independently of
the code under test) and Slicer's C++ Segment Editor logic (``vtkSlicerSegmentEditorLogic``).

What stands in for something else, and why:

* ``BallSession`` replaces the *engine* (not Slicer) in the geometry tests: it "segments" a ball of
  known radius around each include click, in the physical frame it is given. A right answer is then
  known exactly, so these tests check the MRML plumbing (RAS/LPS, IJKToRAS, parent transforms,
  reference geometries, other segments untouched, undo) independently of model quality. The real
  ``FastSAM3DLib.Session`` with a tiny random model is used in the bookkeeping tests below, and the
  bundled model (when an install has one) in the putamen test.
* ``EditorShim`` stands in for ``qSlicerSegmentEditorScriptedEffect``, the Qt wrapper a Segment Editor
  effect talks to, which exists only in the Slicer application. Each of its four methods forwards to
  the real ``vtkSlicerSegmentEditorLogic`` that the application's wrapper uses, so masking, overwrite
  rules and undo are Slicer's own.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
import vtk  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "FastSAM3D"))

import FastSAM3DLogic as FL  # noqa: E402
from FastSAM3DLib.errors import FastSAM3DInputError, ImageError, PromptError  # noqa: E402
from oracles import region_of  # noqa: E402

FL.ensureSegmentationConverterRules()

CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
needs_colin = pytest.mark.skipif(not CH2.exists(), reason="Debian mricron-data (Colin27) is not installed")
RADIUS = 6.3  # mm; not the square root of an integer, so no voxel centre sits exactly on the sphere


# ------------------------------------------------------------------------------------------------
# Stand-ins (see the module docstring)
# ------------------------------------------------------------------------------------------------


class BallSession:
    """Engine stand-in: a ball of RADIUS mm around each include click minus balls around excludes."""

    created = 0

    def __init__(self, model=None):
        type(self).created += 1
        self.progress = {"stage": "ready", "fraction": 1.0}
        self.last_timings = {"total_s": 0.0}
        self.calls = []
        self.fail = False

    def set_image(self, image, wait=False, name=None):
        self.image = image
        self.objects = {0: []}
        self.next = 1
        self.calls.append(("set_image",))

    def new_object(self):
        self.next += 1
        self.objects[self.next - 1] = []
        return self.next - 1

    def reset(self, object=0):
        self.objects[object] = []
        self.calls.append(("reset", object))

    def add_point(self, point, positive=True, object=0):
        self.objects[object].append((np.asarray(point, float), positive))
        self.calls.append(("add_point", object))

    def undo(self, object=0):
        self.calls.append(("undo", object))
        return bool(self.objects[object]) and self.objects[object].pop() is not None

    def add_box(self, a, b, object=0):
        center = (np.asarray(a, float) + np.asarray(b, float)) / 2
        self.objects[object].append((center, True))
        self.calls.append(("add_box", object))

    def predict(self, object=0):
        if self.fail:
            raise RuntimeError("engine failure (simulated)")
        image = self.image
        size = np.array(image.GetSize())
        mask = np.zeros(size[::-1], np.uint8)
        spacing = np.array(image.GetSpacing())
        direction = np.array(image.GetDirection()).reshape(3, 3)
        origin = np.array(image.GetOrigin())
        for point, positive in self.objects[object]:
            center = np.array(image.TransformPhysicalPointToContinuousIndex(tuple(point)))
            reach = int(np.ceil(RADIUS / spacing.min())) + 1
            lo = np.clip(np.floor(center).astype(int) - reach, 0, size - 1)
            hi = np.clip(np.ceil(center).astype(int) + reach, 0, size - 1)
            grid = np.stack(np.meshgrid(*[np.arange(l, h + 1) for l, h in zip(lo, hi)], indexing="ij"), -1)
            physical = (grid * spacing) @ direction.T + origin
            inside = np.linalg.norm(physical - point, axis=-1) <= RADIUS  # (i, j, k) order
            view = mask[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
            inside = inside.transpose(2, 1, 0)
            if positive:
                view[inside] = 1
            else:
                view[inside] = 0
        out = sitk.GetImageFromArray(mask)
        out.CopyInformation(image)
        return out

    def predict_region(self, object=0):
        return region_of(self.predict(object))

    def candidates(self, object=0):
        return [], None  # a model without candidate masks

    def uncertainty(self, n=16, method="mc-dropout", object=0):
        mask = sitk.Cast(self.predict(object), sitk.sitkFloat32)
        return mask, mask * 0.5


class EditorShim:
    """Stands in for qSlicerSegmentEditorScriptedEffect (application-only Qt class), forwarding to
    the real vtkSlicerSegmentEditorLogic."""

    def __init__(self, scene, segmentationNode, volumeNode, segmentId):
        scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
        self.node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.node.SetAndObserveSegmentationNode(segmentationNode)
        self.node.SetAndObserveSourceVolumeNode(volumeNode)
        self.node.SetSelectedSegmentID(segmentId)
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(self.node)
        history = slicer.vtkSegmentationHistory()
        history.SetSegmentation(segmentationNode.GetSegmentation())
        self.logic.SetSegmentationHistory(history)
        self.history = history
        self.calls = []

    def parameterSetNode(self):
        return self.node

    def confirmCurrentSegmentVisible(self):
        self.calls.append("confirmCurrentSegmentVisible")
        return self.logic.IsSelectedSegmentVisible()

    def saveStateForUndo(self):
        self.calls.append("saveStateForUndo")
        self.logic.SaveStateForUndo()

    def defaultModifierLabelmap(self):
        self.calls.append("defaultModifierLabelmap")
        self.logic.ResetModifierLabelmapToDefault()
        return self.logic.GetModifierLabelmap()

    def modifySelectedSegmentByLabelmap(self, modifier, mode):
        self.calls.append("modifySelectedSegmentByLabelmap")
        self.logic.ModifySegmentByLabelmap(self.node.GetSegmentationNode(), self.node.GetSelectedSegmentID(),
                                          modifier, mode, True, False)


# ------------------------------------------------------------------------------------------------
# Scene helpers (independent of the code under test)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ch2_node_data():
    """Colin27 read once by Slicer's own reader: (image data, IJKToRAS matrix)."""
    if not CH2.exists():
        pytest.skip("Debian mricron-data (Colin27) is not installed")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ch2")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(CH2))
    assert storage.ReadData(node)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    data = vtk.vtkImageData()
    data.DeepCopy(node.GetImageData())
    return data, matrix


@pytest.fixture(scope="module")
def putamen():
    """Interior-most voxel of AAL Putamen_L: (index xyz, LPS mm) plus the label image (uint8 0/1)."""
    if not CH2.exists():
        pytest.skip("Debian mricron-data (Colin27) is not installed")
    from FastSAM3DLib.data import interior_point, read_aal_names

    names = {name: value for value, name in read_aal_names(CH2.parent / "aal.nii.txt").items()}
    aal = sitk.ReadImage(str(CH2.parent / "aal.nii.gz"))
    label = sitk.Cast(aal == names["Putamen_L"], sitk.sitkUInt8)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(label)
    box = stats.GetBoundingBox(1)  # the distance transform only needs the label's neighbourhood
    start = [max(0, b - 2) for b in box[:3]]
    size = [min(label.GetSize()[a] - start[a], box[3 + a] + 4) for a in range(3)]
    index, lps = interior_point(sitk.RegionOfInterest(label, size, start))
    return tuple(i + s for i, s in zip(index, start)), np.array(lps), label


def new_scene(ch2_node_data):
    """A scene with the Colin27 volume and a segmentation holding 'target' (empty) and 'other' (filled)."""
    data, matrix = ch2_node_data
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ch2")
    copy = vtk.vtkImageData()
    copy.DeepCopy(data)
    volume.SetAndObserveImageData(copy)
    volume.SetIJKToRASMatrix(matrix)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("target")
    other = segmentation.GetSegmentation().AddEmptySegment("other")
    fill_block(segmentation, other, volume, (slice(60, 80), slice(100, 140), slice(60, 75)))
    return scene, volume, segmentation, target, other


def fill_block(segmentation, segmentId, volume, kji):
    """Put a block of voxels (k, j, i slices of the volume grid) into a segment with Slicer's API."""
    image = slicer.vtkOrientedImageData()
    dims = volume.GetImageData().GetDimensions()
    image.SetDimensions(dims)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    from vtk.util import numpy_support

    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    array[...] = 0
    array[kji] = 1
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentation, segmentId, 0)


def exported_world_voxels(segmentation, segmentId):
    """World RAS centres of a segment's voxels, via Slicer's labelmap export (not the code under test)."""
    scene = segmentation.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, [segmentId], labelmap)
        data = labelmap.GetImageData()
        if data is None or data.GetNumberOfPoints() == 0:
            return np.zeros((0, 3))
        from vtk.util import numpy_support

        dims = data.GetDimensions()
        array = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()).reshape(dims[::-1])
        k, j, i = np.nonzero(array)
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetIJKToRASMatrix(matrix)
        ijk = np.stack([i, j, k, np.ones_like(i)]).astype(float)
        local = (np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]) @ ijk)[:3].T
        toWorld = vtk.vtkMatrix4x4()  # the tests use linear transforms only
        assert slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(labelmap.GetParentTransformNode(), None, toWorld)
        toWorld = np.array([[toWorld.GetElement(r, c) for c in range(4)] for r in range(4)])
        return (toWorld @ np.c_[local, np.ones(len(local))].T)[:3].T
    finally:
        scene.RemoveNode(labelmap)


def expected_world_ball(volume, clickRAS):
    """World centres of the volume's voxels within RADIUS of a world click (independent geometry)."""
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    ijkToRas = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    toWorld = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volume.GetParentTransformNode(), None, toWorld)
    toLocal = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volume.GetParentTransformNode(), toLocal)
    local = np.array(toLocal.TransformPoint(*clickRAS))
    center = (np.linalg.inv(ijkToRas) @ np.append(local, 1))[:3]
    reach = 12
    grid = np.stack(np.meshgrid(*[np.arange(int(c) - reach, int(c) + reach + 1) for c in center], indexing="ij"), -1).reshape(-1, 3)
    localCentres = (ijkToRas @ np.c_[grid, np.ones(len(grid))].T)[:3].T
    world = np.array([toWorld.TransformPoint(*p) for p in localCentres])
    return world[np.linalg.norm(world - np.asarray(clickRAS), axis=1) <= RADIUS]


def same_points(a, b, tol=1e-4):
    if len(a) != len(b):
        return False
    order = lambda x: x[np.lexsort(np.round(x / tol).T)]
    return np.allclose(order(a), order(b), atol=tol)


def layer_bytes(segmentation, segmentId):
    """A segment's voxels on the segmentation's full reference grid, as Slicer exports them: (extent,
    geometry, bytes). Equal values mean the segment is byte-identical, whatever layer holds it."""
    scene = segmentation.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation, [segmentId], labelmap, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        from vtk.util import numpy_support

        data = labelmap.GetImageData()
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetIJKToRASMatrix(matrix)
        return (data.GetExtent(), tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4)),
                (numpy_support.vtk_to_numpy(data.GetPointData().GetScalars()) > 0).tobytes())
    finally:
        scene.RemoveNode(labelmap)


def translate(scene, node, offset):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    for a in range(3):
        matrix.SetElement(a, 3, offset[a])
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    return transform


def ras(lps):
    return np.asarray(lps, float) * [-1, -1, 1]


def ball_logic():
    BallSession.created = 0
    return FL.FastSAM3DLogic(model=object(), sessionFactory=BallSession)


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------


@needs_colin
def test_volume_node_to_image_matches_simpleitk(ch2_node_data):
    _, volume, *_ = new_scene(ch2_node_data)
    image = FL.volumeNodeToImage(volume)
    reference = sitk.ReadImage(str(CH2))
    assert image.GetSize() == reference.GetSize()
    assert np.allclose(image.GetOrigin(), reference.GetOrigin())
    assert np.allclose(image.GetSpacing(), reference.GetSpacing())
    assert np.allclose(image.GetDirection(), reference.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))


def test_oblique_anisotropic_geometry_round_trip():
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    data = vtk.vtkImageData()
    data.SetDimensions(7, 9, 5)
    data.AllocateScalars(vtk.VTK_FLOAT, 1)
    volume.SetAndObserveImageData(data)
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    rotation = rotation @ np.array([[1, 0, 0], [0, np.cos(0.4), -np.sin(0.4)], [0, np.sin(0.4), np.cos(0.4)]])
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = rotation @ np.diag([0.7, 1.3, 3.1])
    ijkToRas[:3, 3] = (12.5, -40.0, 7.25)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijkToRas[r, c])
    volume.SetIJKToRASMatrix(matrix)
    image = FL.volumeNodeToImage(volume)
    for index in [(0, 0, 0), (6, 8, 4), (3, 1, 2)]:
        expected = ras((ijkToRas @ np.append(index, 1))[:3])  # ras() flips both ways
        assert np.allclose(image.TransformIndexToPhysicalPoint(index), expected)


@needs_colin
def test_slicer_and_simpleitk_agree_on_the_putamen_click(ch2_node_data, putamen):
    index, lps, _ = putamen
    _, volume, *_ = new_scene(ch2_node_data)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    clickRAS = np.array(matrix.MultiplyPoint((*index, 1)))[:3]
    assert np.allclose(clickRAS, ras(lps))


@needs_colin
def test_one_click_writes_only_the_target_segment(ch2_node_data, putamen):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    clickRAS = ras(putamen[1]) + [0.3, -0.2, 0.4]  # off the voxel centre on purpose
    before = layer_bytes(segmentation, other)
    logic = ball_logic()
    result = logic.segmentFromPoints(volume, segmentation, target, [clickRAS], [1])
    assert result.voxels > 0
    assert same_points(exported_world_voxels(segmentation, target), expected_world_ball(volume, clickRAS))
    assert layer_bytes(segmentation, other) == before


@needs_colin
@pytest.mark.parametrize("where", ["both", "volume-only", "segmentation-only"])
def test_parent_transforms_are_honoured(ch2_node_data, putamen, where):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    offset = np.array([12.0, -7.5, 30.25])
    if where in ("both", "volume-only"):
        translate(scene, volume, offset)
    if where in ("both", "segmentation-only"):
        translate(scene, segmentation, offset)
    before = layer_bytes(segmentation, other)
    # The user clicks where the putamen is now displayed: the volume's anatomy moved by the offset.
    clickRAS = ras(putamen[1]) + (offset if where != "segmentation-only" else 0)
    logic = ball_logic()
    logic.segmentFromPoints(volume, segmentation, target, [clickRAS], [1])
    got = exported_world_voxels(segmentation, target)
    expected = expected_world_ball(volume, clickRAS)
    if where != "both":  # the two grids no longer coincide: nearest-neighbour resampling
        assert abs(len(got) - len(expected)) <= 0.05 * len(expected)
        assert np.linalg.norm(got.mean(0) - expected.mean(0)) < 0.6
    else:
        assert same_points(got, expected)
    assert np.linalg.norm(got.mean(0) - clickRAS) < 0.6
    assert layer_bytes(segmentation, other) == before


@needs_colin
def test_rotated_transform_and_finer_segmentation_geometry(ch2_node_data, putamen):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    for (r, col), v in {(0, 0): c, (0, 1): -s, (1, 0): s, (1, 1): c, (0, 3): 5.0, (2, 3): -3.0}.items():
        matrix.SetElement(r, col, v)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    # The segmentation stays in world space with a 0.5 mm grid of its own.
    geometry = "0.5;0;0;-90;0;0.5;0;-126;0;0;0.5;-72;0;0;0;1;0;400;0;500;0;300;"
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    segmentation.GetSegmentation().SetConversionParameter(name, geometry)
    toWorld = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(transform, None, toWorld)
    clickRAS = np.array(toWorld.TransformPoint(*ras(putamen[1])))
    logic = ball_logic()
    logic.segmentFromPoints(volume, segmentation, target, [clickRAS], [1])
    got = exported_world_voxels(segmentation, target)
    assert np.linalg.norm(got.mean(0) - clickRAS) < 0.5
    assert np.linalg.norm(got - clickRAS, axis=1).max() <= RADIUS + 1.0
    # The ball is sampled at the segmentation's 0.5 mm: 8 times as many voxels as at 1 mm.
    assert abs(len(got) * 0.125 - len(expected_world_ball(volume, clickRAS))) < 0.15 * len(expected_world_ball(volume, clickRAS))


@needs_colin
def test_label_map_volume_as_input(ch2_node_data, putamen):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    data = vtk.vtkImageData()
    data.DeepCopy(volume.GetImageData())
    labelmap.SetAndObserveImageData(data)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    clickRAS = ras(putamen[1])
    ball_logic().segmentFromPoints(labelmap, segmentation, target, [clickRAS], [1])
    assert same_points(exported_world_voxels(segmentation, target), expected_world_ball(volume, clickRAS))


def test_vector_volume_is_refused_clearly():
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    data = vtk.vtkImageData()
    data.SetDimensions(4, 4, 4)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    volume.SetAndObserveImageData(data)
    with pytest.raises(FastSAM3DInputError, match="3 components"):
        FL.volumeNodeToImage(volume)


# ------------------------------------------------------------------------------------------------
# Errors, undo, reset, accept
# ------------------------------------------------------------------------------------------------


@needs_colin
def test_errors_leave_the_segmentation_unchanged(ch2_node_data, putamen):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    logic = ball_logic()
    click = ras(putamen[1])
    logic.segmentFromPoints(volume, segmentation, target, [click], [1])
    state = {sid: layer_bytes(segmentation, sid) for sid in (target, other)}
    with pytest.raises(PromptError, match=r"outside volume 'ch2' \(it falls at voxel \(-?\d+\.\d, "):
        logic.segmentFromPoints(volume, segmentation, target, [click, [500.0, 0.0, 0.0]], [1, 1])
    # Malformed arguments are input errors naming what was expected (they were TypeError / ValueError).
    with pytest.raises(PromptError, match="labels a list of 1/0"):
        logic.segmentFromPoints(volume, segmentation, target, [click], None)
    with pytest.raises(PromptError, match=r"triples, got an array of shape \(1, 2\)"):
        logic.segmentFromPoints(volume, segmentation, target, [[1.0, 2.0]], [1])
    with pytest.raises(ImageError, match="no input volume"):
        logic.computeUncertainty(None, segmentation, target)
    with pytest.raises(FastSAM3DInputError, match="samples must be a whole number of at least 2"):
        logic.computeUncertainty(volume, segmentation, target, samples=2.5)
    with pytest.raises(PromptError, match="labels"):
        logic.segmentFromPoints(volume, segmentation, target, [click], [1, 0])
    with pytest.raises(PromptError, match="use 1"):
        logic.segmentFromPoints(volume, segmentation, target, [click], [2])
    with pytest.raises(FastSAM3DInputError, match="no segment"):
        logic.segmentFromPoints(volume, segmentation, "nope", [click], [1])
    session = logic._volumes[volume.GetID()].session
    session.fail = True
    with pytest.raises(RuntimeError, match="simulated"):
        logic.segmentFromPoints(volume, segmentation, target, [click + 5], [1])
    session.fail = False
    assert {sid: layer_bytes(segmentation, sid) for sid in (target, other)} == state
    # A failure inside Slicer's write restores the segment as well.
    original = FL.FastSAM3DLogic._setSegment
    calls = []

    def failing(segmentationNode, segmentId, labelmap):
        calls.append(labelmap)
        if len(calls) == 1:
            original(segmentationNode, segmentId, labelmap)  # half-written, then fails
            raise RuntimeError("write failed (simulated)")
        original(segmentationNode, segmentId, labelmap)

    logic._setSegment = failing
    with pytest.raises(RuntimeError, match="write failed"):
        logic.segmentFromPoints(volume, segmentation, target, [click + 9], [1])
    assert {sid: layer_bytes(segmentation, sid) for sid in (target, other)} == state


@needs_colin
def test_undo_reset_accept(ch2_node_data, putamen):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    fill_block(segmentation, target, volume, (slice(10, 12), slice(10, 12), slice(10, 12)))  # prior work
    otherBefore = layer_bytes(segmentation, other)
    s0 = logic_state = layer_bytes(segmentation, target)
    logic = ball_logic()
    click = ras(putamen[1])
    logic.segmentFromPoints(volume, segmentation, target, [click], [1])
    s1 = layer_bytes(segmentation, target)
    logic.segmentFromPoints(volume, segmentation, target, [click, click + [8, 0, 0]], [1, 1])
    s2 = layer_bytes(segmentation, target)
    assert len({s0[2], s1[2], s2[2]}) == 3
    assert logic.undo(segmentation, target) and layer_bytes(segmentation, target)[2] == s1[2]
    logic.segmentFromPoints(volume, segmentation, target, [click, click + [8, 0, 0]], [1, 1])
    assert layer_bytes(segmentation, target)[2] == s2[2]
    assert logic.reset(segmentation, target)
    assert layer_bytes(segmentation, target)[2] == logic_state[2]
    assert not logic.undo(segmentation, target)
    logic.segmentFromPoints(volume, segmentation, target, [click], [1])
    logic.accept(segmentation, target)
    assert not logic.canUndo(segmentation, target)
    assert layer_bytes(segmentation, target)[2] == s1[2]
    assert layer_bytes(segmentation, other) == otherBefore


@needs_colin
def test_segment_fingerprint_follows_the_voxels_not_the_layer(ch2_node_data):
    """What the editor effect relies on to recognise a state after the editor's Undo."""
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    fingerprint, stamp = FL.FastSAM3DLogic.segmentFingerprint, FL.FastSAM3DLogic.segmentStamp
    empty = fingerprint(segmentation, target)
    fill_block(segmentation, target, volume, (slice(10, 14), slice(20, 25), slice(30, 33)))
    block, block_stamp = fingerprint(segmentation, target), stamp(segmentation, target)
    assert FL.FastSAM3DLogic.labelmapFingerprint(FL.FastSAM3DLogic.segmentLabelmap(segmentation, target)) == block
    assert FL.FastSAM3DLogic.labelmapFingerprint(None) == empty
    assert stamp(segmentation, target) == block_stamp  # nothing changed: the cheap check says so
    assert block != empty and fingerprint(segmentation, other) not in (empty, block)
    # The other segment changes (and with it the shared layer): the target's digest does not.
    fill_block(segmentation, other, volume, (slice(0, 3), slice(0, 3), slice(0, 3)))
    assert fingerprint(segmentation, target) == block
    fill_block(segmentation, target, volume, (slice(10, 14), slice(20, 25), slice(30, 33)))
    assert stamp(segmentation, target) != block_stamp  # rewritten (same voxels): the stamp cannot tell
    # One voxel more, then the same voxels written again: different, then equal again.
    fill_block(segmentation, target, volume, (slice(10, 15), slice(20, 25), slice(30, 33)))
    assert fingerprint(segmentation, target) != block
    fill_block(segmentation, target, volume, (slice(10, 14), slice(20, 25), slice(30, 33)))
    assert fingerprint(segmentation, target) == block


@needs_colin
def test_prompts_are_incremental_and_the_session_is_reused(ch2_node_data, putamen):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    logic = ball_logic()
    click = ras(putamen[1])
    logic.segmentFromPoints(volume, segmentation, target, [click], [1])
    logic.segmentFromPoints(volume, segmentation, target, [click, click + [0, 6, 0]], [1, 0])
    session = logic._volumes[volume.GetID()].session
    assert [c[0] for c in session.calls] == ["set_image", "add_point", "add_point"]
    logic.segmentFromPoints(volume, segmentation, target, [click + [1, 0, 0], click + [0, 6, 0]], [1, 0])  # moved
    assert [c[0] for c in session.calls[3:]] == ["reset", "add_point", "add_point"]
    logic.segmentFromPoints(volume, segmentation, other, [click], [1])  # another segment: another object
    assert session.calls[-1][1] != session.calls[-2][1]
    assert BallSession.created == 1
    # Changing the voxels starts a new session; a parent transform does not (the image is unchanged).
    translate(scene, volume, (5, 0, 0))
    logic.segmentFromPoints(volume, segmentation, target, [click + [5, 0, 0]], [1])
    assert BallSession.created == 1
    volume.GetImageData().GetPointData().GetScalars().Modified()
    logic.segmentFromPoints(volume, segmentation, target, [click + [5, 0, 0]], [1])
    assert BallSession.created == 2


@needs_colin
def test_embedding_starts_on_the_worker_before_the_first_click(ch2_node_data, putamen):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    logic = ball_logic()
    request = logic.prepareVolume(volume)
    assert logic.sessionProgress(volume)["stage"] == "starting" and BallSession.created == 0
    queue = FL.PredictionQueue()
    queue.submit(request)
    assert [(r.kind, err) for r, _, err, _ in queue.wait(30)] == [("embed", None)]
    assert logic.sessionProgress(volume)["stage"] == "ready" and BallSession.created == 1
    logic.segmentFromPoints(volume, segmentation, target, [ras(putamen[1])], [1])
    assert BallSession.created == 1
    queue.shutdown()


@needs_colin
def test_box_prompt_and_roi_corners(ch2_node_data, putamen):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    click = ras(putamen[1])
    roi.SetCenterWorld(*click)
    roi.SetSizeWorld(10, 14, 12)
    a, b = FL.FastSAM3DLogic.roiCornersRAS(roi)
    assert np.allclose(a, click - [5, 7, 6]) and np.allclose(b, click + [5, 7, 6])
    logic = ball_logic()
    logic.segmentFromBox(volume, segmentation, target, a, b)
    assert np.linalg.norm(exported_world_voxels(segmentation, target).mean(0) - click) < 0.6

    # Under a 45-degree rotation two opposite corners of a cube land on one plane of the volume's
    # frame (the box was refused as flat): the box around all eight corners is used.
    scene2, volume2, segmentation2, target2, _ = new_scene(ch2_node_data)
    rotation = scene2.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    c = s = np.sqrt(0.5)
    matrix.SetElement(0, 0, c), matrix.SetElement(0, 1, -s), matrix.SetElement(1, 0, s), matrix.SetElement(1, 1, c)
    rotation.SetMatrixTransformToParent(matrix)
    volume2.SetAndObserveTransformNodeID(rotation.GetID())
    center = np.array([c * click[0] - s * click[1], s * click[0] + c * click[1], click[2]])  # the click's world position now
    request = logic.prepareSegmentation(volume2, segmentation2, target2, (), (), (center - 15.0, center + 15.0))
    low, high = (np.asarray(v) for v in request.prompts[0][1:])
    assert np.allclose(high - low, [30 * np.sqrt(2), 30 * np.sqrt(2), 30], atol=1e-6)  # the rotated cube's bounding box
    logic.applyPrediction(request, request.run())
    assert np.linalg.norm(exported_world_voxels(segmentation2, target2).mean(0) - center) < 0.6


@needs_colin
def test_markups_points_world_order_and_colours(ch2_node_data, putamen):
    scene, volume, *_ = new_scene(ch2_node_data)
    include, exclude = FL.FastSAM3DLogic.createPromptNodes(scene)
    assert include.GetDisplayNode().GetSelectedColor() != exclude.GetDisplayNode().GetSelectedColor()
    include.AddControlPoint(1, 2, 3)
    exclude.AddControlPoint(4, 5, 6)
    include.AddControlPoint(7, 8, 9)
    translate(scene, include, (10, 0, 0))
    points, labels = FL.FastSAM3DLogic.pointsFromMarkups(include, exclude)
    assert np.allclose(points, [[11, 2, 3], [17, 8, 9], [4, 5, 6]]) and labels == [1, 1, 0]


# ------------------------------------------------------------------------------------------------
# Segment Editor path (Slicer's C++ editor logic), uncertainty overlay, queue, parameters
# ------------------------------------------------------------------------------------------------


@needs_colin
def test_segment_editor_masking_overwrite_and_undo(ch2_node_data, putamen):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    click = ras(putamen[1])
    # Put 'other' right where the ball will be, and only allow editing outside all segments.
    index = np.round(np.linalg.inv(FL.volumeIJKToRAS(volume)) @ np.append(click, 1))[:3].astype(int)
    fill_block(segmentation, other, volume, (slice(index[2] - 2, index[2] + 3), slice(index[1] - 2, index[1] + 3),
                                             slice(index[0] - 2, index[0] + 3)))
    otherBefore = layer_bytes(segmentation, other)
    editor = EditorShim(scene, segmentation, volume, target)
    editor.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    logic = ball_logic()
    request = logic.prepareSegmentation(volume, segmentation, target, [click], [1])
    applied = logic.applyMaskThroughSegmentEditor(editor, volume, request.run(), editor.logic.ModificationModeSet)
    assert applied
    assert editor.calls == ["confirmCurrentSegmentVisible", "saveStateForUndo", "defaultModifierLabelmap",
                            "modifySelectedSegmentByLabelmap"]
    got = logic.segmentArray(segmentation, target)
    blocked = logic.segmentArray(segmentation, other)
    assert got.sum() == len(expected_world_ball(volume, click)) - blocked.sum()  # the masked voxels are left out
    assert not (got & blocked).any()
    assert layer_bytes(segmentation, other) == otherBefore
    editor.logic.Undo()
    assert logic.segmentArray(segmentation, target).sum() == 0
    assert layer_bytes(segmentation, other) == otherBefore
    # A hidden segment: nothing happens (the application would ask the user first).
    segmentation.GetDisplayNode().SetSegmentVisibility(target, False)
    editor.calls.clear()
    assert not logic.applyMaskThroughSegmentEditor(editor, volume, request.run(), editor.logic.ModificationModeSet)
    assert editor.calls == ["confirmCurrentSegmentVisible"]


@needs_colin
def test_uncertainty_overlay_volume(ch2_node_data, putamen):
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    translate(scene, volume, (3, 4, 5))
    logic = ball_logic()
    with pytest.raises(PromptError, match="click in it first"):
        logic.computeUncertainty(volume, segmentation, target)
    click = ras(putamen[1]) + [3, 4, 5]
    logic.segmentFromPoints(volume, segmentation, target, [click], [1])
    overlay = logic.computeUncertainty(volume, segmentation, target, samples=4)
    assert overlay.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert overlay.GetTransformNodeID() == volume.GetTransformNodeID()
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    overlay.GetIJKToRASMatrix(a)
    volume.GetIJKToRASMatrix(b)
    assert all(a.GetElement(r, c) == b.GetElement(r, c) for r in range(4) for c in range(4))
    assert overlay.GetDisplayNode().GetColorNode() is not None
    from vtk.util import numpy_support

    values = numpy_support.vtk_to_numpy(overlay.GetImageData().GetPointData().GetScalars())
    assert values.max() == pytest.approx(0.5) and np.count_nonzero(values) == len(expected_world_ball(volume, click))
    again = logic.computeUncertainty(volume, segmentation, target, outputVolumeNode=overlay, samples=4)
    assert again is overlay


def test_prediction_queue_runs_one_at_a_time_and_coalesces():
    class Slow:
        kind, key = "segment", ("seg", "a")

        def __init__(self, n, gate=None):
            self.n, self.gate = n, gate

        def run(self):
            if self.gate is not None:
                self.gate.wait(5)
            return self.n

    import threading

    gate = threading.Event()
    queue = FL.PredictionQueue()
    queue.submit(Slow(1, gate))
    queue.submit(Slow(2))
    queue.submit(Slow(3))  # replaces 2, which never runs
    assert queue.busy and queue.poll() == []
    gate.set()
    results = queue.wait(10)
    assert [(r.n, value, err, superseded) for r, value, err, superseded in results] == [(1, 1, None, True), (3, 3, None, False)]
    assert queue.dropped == 1 and not queue.busy
    queue.shutdown()


def test_parameter_node_defaults_and_types():
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "FastSAM3D")
    events = []
    node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *a: events.append(1))
    FL.FastSAM3DLogic.setDefaultParameters(node)
    assert len(events) == 1  # one modify block
    assert FL.FastSAM3DLogic.getParameter(node, "LiveUpdate") is True
    assert FL.FastSAM3DLogic.getParameter(node, "UncertaintySamples") == 16
    FL.FastSAM3DLogic.setParameter(node, "ShowUncertainty", True)
    FL.FastSAM3DLogic.setParameter(node, "Device", "cpu")
    FL.FastSAM3DLogic.setDefaultParameters(node)  # keeps what was set
    assert FL.FastSAM3DLogic.getParameter(node, "ShowUncertainty") is True
    assert FL.FastSAM3DLogic.getParameter(node, "Device") == "cpu"
    node.SetParameter("UncertaintySamples", "not a number")
    assert FL.FastSAM3DLogic.getParameter(node, "UncertaintySamples") == 16
    with pytest.raises(TypeError):  # what Slicer's module scanner would try on the source folder
        FL.FastSAM3DLogic(object())


# ------------------------------------------------------------------------------------------------
# The real engine
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_logic():
    import torch

    from FastSAM3DLib import build_model

    torch.manual_seed(0)
    return FL.FastSAM3DLogic(model=build_model("tiny"), device="cpu")


@needs_colin
def test_real_session_bookkeeping_and_translation(ch2_node_data, putamen, tiny_logic):
    """The real Session (tiny random model): the click voxel is in the segment, nothing else changes,
    and under a translated parent transform the same voxels come back, shifted in world space."""
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    click = ras(putamen[1])
    before = layer_bytes(segmentation, other)
    start = time.perf_counter()
    tiny_logic.segmentFromPoints(volume, segmentation, target, [click], [1])
    plain = tiny_logic.segmentArray(segmentation, target)
    index = putamen[0]
    assert plain[index[2], index[1], index[0]] == 1  # the engine keeps the clicked voxel inside
    assert layer_bytes(segmentation, other) == before
    # What travels from the worker is the crop's box, not a full-size mask, and it is what was written.
    result = tiny_logic.prepareSegmentation(volume, segmentation, target, [click], [1]).run()
    dims = volume.GetImageData().GetDimensions()
    assert tuple(result.size) == dims and result.array.size < np.prod(dims)  # a 192 mm crop in a 217 mm volume
    placed = np.zeros(dims[::-1], np.uint8)
    (i, j, k), (depth, rows, cols) = result.start, result.array.shape
    placed[k:k + depth, j:j + rows, i:i + cols] = result.array
    assert np.array_equal(placed, plain)
    worldPlain = exported_world_voxels(segmentation, target)

    scene2, volume2, segmentation2, target2, other2 = new_scene(ch2_node_data)
    offset = np.array([10.0, -20.0, 5.0])
    translate(scene2, volume2, offset)
    translate(scene2, segmentation2, offset)
    tiny_logic.segmentFromPoints(volume2, segmentation2, target2, [click + offset], [1])
    assert np.array_equal(tiny_logic.segmentArray(segmentation2, target2), plain)
    assert np.allclose(exported_world_voxels(segmentation2, target2).mean(0), worldPlain.mean(0) + offset, atol=1e-3)
    assert time.perf_counter() - start < 60


@needs_colin
def test_undo_takes_the_prompts_back_with_the_voxels(ch2_node_data, putamen):
    """After undo the segment's prompts are those of the restored result: its uncertainty is that
    result's, and the next click refines it as if the undone click had never been made (the real
    session, a tiny random model whose masks depend on the fed-back logits)."""
    import torch

    from FastSAM3DLib import build_model

    def fresh():
        torch.manual_seed(0)
        return FL.FastSAM3DLogic(model=build_model("tiny"), device="cpu", precision="fp32")

    click = ras(putamen[1])
    a, b, c, d = click, click + [6.0, 0, 0], click + [0, 6.0, 0], click + [0, 0, 6.0]
    logic = fresh()
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    logic.segmentFromPoints(volume, segmentation, target, [a], [1])
    logic.segmentFromPoints(volume, segmentation, target, [a, b], [1, 0])
    twoClicks = logic.segmentArray(segmentation, target)
    logic.segmentFromPoints(volume, segmentation, target, [a, b, c], [1, 0, 1])
    # The GUI thread's undo does not wait for the worker (here: a prediction holding the session's lock).
    state = logic._volumes[volume.GetID()]
    held, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (state.lock.acquire(), held.set(), release.wait(), state.lock.release()))
    worker.start()
    held.wait()
    try:
        started = time.perf_counter()
        assert logic.undo(segmentation, target)
        assert time.perf_counter() - started < 5
    finally:
        release.set()
        worker.join()
    assert np.array_equal(logic.segmentArray(segmentation, target), twoClicks)
    afterUndo = logic.computeUncertainty(volume, segmentation, target, samples=4)
    logic.segmentFromPoints(volume, segmentation, target, [a, b, d], [1, 0, 1])
    viaUndo = logic.segmentArray(segmentation, target)

    reference = fresh()
    scene2, volume2, segmentation2, target2, _ = new_scene(ch2_node_data)
    reference.segmentFromPoints(volume2, segmentation2, target2, [a], [1])
    reference.segmentFromPoints(volume2, segmentation2, target2, [a, b], [1, 0])
    expected = reference.computeUncertainty(volume2, segmentation2, target2, samples=4)
    from vtk.util import numpy_support

    values = lambda node: numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())  # noqa: E731
    assert np.array_equal(values(afterUndo), values(expected))
    reference.segmentFromPoints(volume2, segmentation2, target2, [a, b, d], [1, 0, 1])
    assert np.array_equal(viaUndo, reference.segmentArray(segmentation2, target2))
    # Two steps back: the one click that made the restored result, replayed by the next request.
    assert logic.undo(segmentation, target) and logic.undo(segmentation, target)
    assert [(kind, label) for kind, _, label in logic.prepareUncertainty(volume, segmentation, target).prompts] == [("point", True)]
    logic.segmentFromPoints(volume, segmentation, target, [a, c], [1, 1])
    reference.reset(segmentation2, target2)
    reference.segmentFromPoints(volume2, segmentation2, target2, [a], [1])
    reference.segmentFromPoints(volume2, segmentation2, target2, [a, c], [1, 1])
    assert np.array_equal(logic.segmentArray(segmentation, target), reference.segmentArray(segmentation2, target2))
    # A request made before an undo does no work when it runs, and leaves the rewind for the next
    # one; the uncertainty is that of the result shown.
    pending = logic.prepareSegmentation(volume, segmentation, target, [a, c, d], [1, 1, 1])
    assert logic.undo(segmentation, target)
    assert pending.run() is None and logic.isStale(pending)
    assert len(logic.prepareUncertainty(volume, segmentation, target).prompts) == 1
    logic.accept(segmentation, target)
    with pytest.raises(PromptError, match="click in it first"):
        logic.prepareUncertainty(volume, segmentation, target)
    with pytest.raises(ValueError, match="maxUndo must be at least 1"):
        FL.FastSAM3DLogic(model=build_model("tiny"), maxUndo=0)


@needs_colin
def test_another_candidate_of_a_lone_click_is_shown_undone_and_refined(ch2_node_data, putamen):
    """A lone click of a model with candidate masks: the result lists them; asking for another
    writes that one (undoable), the uncertainty request keeps it, and the next click refines it."""
    import torch

    from FastSAM3DLib import build_model

    torch.manual_seed(0)
    model = build_model("tiny")
    model.config["first_click_multimask"] = True
    logic = FL.FastSAM3DLogic(model=model, device="cpu", precision="fp32")
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    click = ras(putamen[1])
    before = layer_bytes(segmentation, other)
    picked = logic.segmentFromPoints(volume, segmentation, target, [click], [1])
    assert len(picked.candidates) == 3 and picked.candidate is None
    assert picked.timings["decode_s"] > 0 and picked.timings["total_s"] >= picked.timings["decode_s"]
    pickedArray = logic.segmentArray(segmentation, target)
    other_choice = int(np.argmin(picked.candidates))
    chosen = logic.segmentFromPoints(volume, segmentation, target, [click], [1], candidate=other_choice)
    assert chosen.candidate == other_choice and chosen.candidates == picked.candidates
    chosenArray = logic.segmentArray(segmentation, target)
    assert not np.array_equal(chosenArray, pickedArray), "a random model's candidates differ"
    # The uncertainty describes the candidate shown (the session test checks the decodes themselves).
    assert logic.prepareUncertainty(volume, segmentation, target, samples=2).candidate == other_choice
    assert layer_bytes(segmentation, other) == before

    session = logic._volumes[volume.GetID()].session
    handle = logic._volumes[volume.GetID()].objects[(segmentation.GetID(), target)].handle
    history = len(session._objects[handle].history)
    with pytest.raises(PromptError, match="candidate 7 does not exist"):
        logic.segmentFromPoints(volume, segmentation, target, [click], [1], candidate=7)
    assert np.array_equal(logic.segmentArray(segmentation, target), chosenArray)
    assert len(session._objects[handle].history) == history  # the object was not started over
    with pytest.raises(PromptError, match="candidate must be None"):
        logic.prepareSegmentation(volume, segmentation, target, [click], [1], candidate=-1)

    assert logic.undo(segmentation, target)
    assert np.array_equal(logic.segmentArray(segmentation, target), pickedArray)

    second = click + np.array([2.0, 0.0, 0.0])
    refined = logic.segmentFromPoints(volume, segmentation, target, [click, second], [1, 1], candidate=other_choice)
    assert refined.candidates == [] and refined.candidate is None
    # The session's state before the second click (its undo snapshot: ..., candidates, chosen, checked):
    state = session._objects[handle]
    crop = state.crops[0]
    assert state.history[-1][5][crop][0].shape[0] == 3  # a lone click with candidates
    assert state.history[-1][6][crop] == other_choice  # ... showing the chosen one, which the second click refined
    logic.segmentFromPoints(volume, segmentation, target, [click, second], [1, 1])  # no choice: replayed as any two clicks
    assert session._objects[handle].history[-1][6].get(crop) is None

    # A box first has no candidates: a remembered choice is dropped there, not an error.
    corners = (click - 8.0, click + 8.0)
    boxed = logic.prepareSegmentation(volume, segmentation, target, [click], [1], corners, candidate=other_choice)
    logic.applyPrediction(boxed, boxed.run())
    no_candidates = FL.FastSAM3DLogic(model=build_model("tiny"), device="cpu", precision="fp32")
    with pytest.raises(PromptError, match="no candidate masks"):
        no_candidates.segmentFromPoints(volume, segmentation, target, [click], [1], candidate=0)


@needs_colin
def test_bundled_model_segments_the_left_putamen(ch2_node_data, putamen):
    from FastSAM3DLib import bundled_model_path, load_model

    if bundled_model_path() is None:
        pytest.skip("this install has no bundled model weights (Resources/Models); geometry is tested above")
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    logic = FL.FastSAM3DLogic(model=load_model(None, device="cpu"), device="cpu")
    before = layer_bytes(segmentation, other)
    logic.segmentFromPoints(volume, segmentation, target, [ras(putamen[1])], [1])
    got = logic.segmentArray(segmentation, target).astype(bool)
    truth = sitk.GetArrayViewFromImage(putamen[2]).astype(bool)
    dice = 2 * (got & truth).sum() / (got.sum() + truth.sum())
    centroid = lambda m: np.array(np.nonzero(m)).mean(1)
    assert dice > 0.5, f"Dice {dice:.2f}"
    assert 0.5 < got.sum() / truth.sum() < 2.0
    assert np.linalg.norm(centroid(got) - centroid(truth)) < 5.0
    assert layer_bytes(segmentation, other) == before


@needs_colin
def test_refine_boundary_is_a_setting_of_the_open_sessions(ch2_node_data, putamen):
    """The boundary refinement on and off through the Logic: the same click answers differently on
    Colin27 (a 30 mm sphere oracle, its boundary moved by the intensities), the open session keeps its
    embedding, and the setting gives what a Logic created with it gives."""
    from oracles import sphere_oracle_model

    model, _ = sphere_oracle_model(30.0)
    click = [ras(putamen[1])]
    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    logic = FL.FastSAM3DLogic(model=model, device="cpu", precision="fp32")
    logic.segmentFromPoints(volume, segmentation, target, click, [1])
    refined = logic.segmentArray(segmentation, target).copy()
    session = logic._volumes[volume.GetID()].session
    calls = session.encoder_calls
    logic.setRefineBoundary(False)
    assert session.refinement is None
    logic.segmentFromPoints(volume, segmentation, target, click, [1])
    plain = logic.segmentArray(segmentation, target).copy()
    assert session.encoder_calls == calls
    # The oracle's sphere, against its boundary moved by the anatomy's intensities.
    assert abs(int(plain.sum()) - int(refined.sum())) > 0.2 * int(plain.sum())

    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    without = FL.FastSAM3DLogic(model=model, device="cpu", precision="fp32", refineBoundary=False)
    without.segmentFromPoints(volume, segmentation, target, click, [1])
    assert np.array_equal(without.segmentArray(segmentation, target), plain)


@needs_colin
def test_an_unusable_volume_is_named_in_the_error(ch2_node_data, putamen, tiny_logic):
    from vtk.util import numpy_support

    scene, volume, segmentation, target, other = new_scene(ch2_node_data)
    numpy_support.vtk_to_numpy(volume.GetImageData().GetPointData().GetScalars())[:] = 7
    volume.GetImageData().Modified()
    volume.Modified()
    before = layer_bytes(segmentation, target)
    with pytest.raises(ImageError, match="volume 'ch2': every voxel has the same value"):
        tiny_logic.segmentFromPoints(volume, segmentation, target, [ras(putamen[1])], [1])
    assert layer_bytes(segmentation, target) == before


@needs_colin
def test_a_non_linear_parent_transform_gives_the_linear_answer_quietly(ch2_node_data, putamen, capfd):
    """A grid transform of constant displacement is the translation by it: same voxels, and no VTK
    error logged per click (the matrix was asked of a non-linear chain first)."""
    from vtk.util import numpy_support

    offset = np.array([6.0, -4.0, 3.0])
    click = ras(putamen[1]) + offset
    scene, volume, segmentation, target, _ = new_scene(ch2_node_data)
    translate(scene, volume, offset)
    logic = ball_logic()
    logic.segmentFromPoints(volume, segmentation, target, [click], [1])
    expected = logic.segmentArray(segmentation, target)

    scene2, volume2, segmentation2, target2, _ = new_scene(ch2_node_data)
    grid = vtk.vtkImageData()
    grid.SetOrigin(-150, -150, -150), grid.SetSpacing(30, 30, 30), grid.SetDimensions(11, 11, 11)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())[:] = offset
    displacement = slicer.vtkOrientedGridTransform()
    displacement.SetDisplacementGridData(grid)
    displacement.SetInterpolationModeToLinear()
    node = scene2.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformToParent(displacement)
    volume2.SetAndObserveTransformNodeID(node.GetID())
    capfd.readouterr()
    logic.segmentFromPoints(volume2, segmentation2, target2, [click], [1])
    assert np.array_equal(logic.segmentArray(segmentation2, target2), expected)
    assert "not linear" not in capfd.readouterr().err


def _noise_volume_and_segment(name: str, seed: int, ijkToRas: np.ndarray = np.eye(4)):
    """A 40 x 40 x 12 volume of uniform noise with the given IJK-to-RAS matrix, and a segmentation
    on its grid holding one empty segment: (scene, volume, segmentation, segment ID); the caller
    keeps the scene, which its nodes do not hold."""
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    data = vtk.vtkImageData()
    data.SetDimensions(40, 40, 12)
    data.AllocateScalars(vtk.VTK_FLOAT, 1)
    numpy_support.vtk_to_numpy(data.GetPointData().GetScalars())[:] = np.random.default_rng(seed).random(40 * 40 * 12) * 100
    volume.SetAndObserveImageData(data)
    vtkMatrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for col in range(4):
            vtkMatrix.SetElement(r, col, ijkToRas[r, col])
    volume.SetIJKToRASMatrix(vtkMatrix)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return scene, volume, segmentation, segmentation.GetSegmentation().AddEmptySegment("t")


def test_a_box_at_the_edge_of_an_oblique_volume(tiny_logic):
    """The engine's box is axis-aligned in LPS: around an oblique volume's edge its corners leave the
    volume although the corners drawn lie in it; it is accepted, and the mask stays in the box."""
    c = s = np.sqrt(0.5)
    matrix = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    _scene, volume, segmentation, target = _noise_volume_and_segment("oblique", 0, matrix)
    a, b = (matrix @ [1, 38, 2, 1])[:3], (matrix @ [1, 1, 9, 1])[:3]
    tiny_logic.segmentFromBox(volume, segmentation, target, a, b)
    voxels = exported_world_voxels(segmentation, target)
    low, high = np.minimum(a, b), np.maximum(a, b)
    assert len(voxels) and np.all(voxels >= low - 1e-3) and np.all(voxels <= high + 1e-3)


def test_a_box_past_the_volume_edge_is_taken_and_a_flat_one_is_explained(tiny_logic):
    """Found by review: an ROI drawn around a structure at the edge of the field of view was refused
    because a corner lay outside the volume, though the engine takes such a box; and a flat ROI was
    explained in the engine's LPS millimetres, which Slicer never shows."""
    _scene, volume, segmentation, target = _noise_volume_and_segment("edge", 1)
    a, b = np.array([-6.0, -6.0, 2.0]), np.array([10.0, 10.0, 8.0])  # RAS = IJK here; two faces lie past the volume
    tiny_logic.segmentFromBox(volume, segmentation, target, a, b)
    voxels = exported_world_voxels(segmentation, target)
    assert len(voxels) and np.all(voxels >= a - 1e-3) and np.all(voxels <= b + 1e-3)

    with pytest.raises(FL._errors().PromptError, match="centre of the box .* is outside volume 'edge'"):
        tiny_logic.prepareSegmentation(volume, segmentation, target, (), (), (np.array([-30.0, -30, 2]), np.array([-2.0, -2, 8])))
    with pytest.raises(FL._errors().PromptError, match=r"flat: it spans 16.0 x 0.0 x 6.0 mm \(R x A x S in volume 'edge'"):
        tiny_logic.prepareSegmentation(volume, segmentation, target, (), (), (np.array([2.0, 5, 2]), np.array([18.0, 5, 8])))
