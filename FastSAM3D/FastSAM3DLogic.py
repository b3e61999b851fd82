"""FastSAM3D in Slicer: everything that moves data between the MRML scene and a ``FastSAM3DLib.Session``.

The module widget and the Segment Editor effect are thin: they collect clicks and show progress;
this file does the work, and it runs where only Slicer's MRML libraries exist (the ``slicer-core``
package: no application, no Qt), which is how it is tested. It never imports torch at import time,
so Slicer can load the module before the user has agreed to install it.

Coordinates, in one place
-------------------------
* Slicer reports points in *world RAS* (markups ``GetNthControlPointPositionWorld``, slice views);
  volumes keep their voxels in a *local* frame (``IJKToRAS``) under an optional parent transform.
* The engine works in physical *LPS* millimetres on a SimpleITK image (DESIGN.md §9).
* We never resample the volume: the SimpleITK image is the volume's own grid in its local frame
  (:func:`volumeNodeToImage`), and clicks are moved into that frame with the inverse of the volume's
  parent transform (:func:`worldToLocal`; exact for linear and non-linear transforms alike). The
  predicted mask therefore lies on the volume's voxels; it is carried into the segmentation's frame
  (through both parent transforms) and resampled onto the segmentation's reference geometry only
  when the two differ (:meth:`FastSAM3DLogic.maskToSegmentLabelmap`).
* RAS and LPS differ by the sign of the first two axes: :func:`rasToLps` / :func:`lpsToRas` below are
  the only places that flip them.

Writing results
---------------
Only the target segment changes: the mask replaces that segment's binary labelmap through
``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment`` (which moves the segment to its own
layer rather than touch an overlapping segment). Everything that can fail is checked before the
segmentation is touched, and a failed write restores the previous labelmap. Each write keeps the
segment's previous labelmap, so :meth:`FastSAM3DLogic.undo` restores it exactly. A prediction travels
from the worker as the box of the volume that the model's crops cover (:class:`RegionMask`), so a
click costs work in proportion to the crops, not to the volume.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

try:  # the Slicer application
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # slicer-core (MRML only): a plain base class
    ScriptedLoadableModuleLogic = object

logger = logging.getLogger(__name__)

_MODULE_DIR = Path(__file__).resolve().parent


def _ensureEngineImportable() -> None:
    """Make ``FastSAM3DLib`` importable: installed next to the module, or in the source checkout."""
    import importlib.util

    if importlib.util.find_spec("FastSAM3DLib") is not None:
        return
    for candidate in (_MODULE_DIR, _MODULE_DIR.parent):
        if (candidate / "FastSAM3DLib" / "__init__.py").exists():
            sys.path.insert(0, str(candidate))
            return


def _engine():
    """The engine package, imported on first use (it imports torch)."""
    _ensureEngineImportable()
    import FastSAM3DLib

    return FastSAM3DLib


def _errors():
    """The engine's input-error classes without importing torch (``FastSAM3DLib/errors.py`` is plain)."""
    _ensureEngineImportable()
    if "FastSAM3DLib.errors" in sys.modules:
        return sys.modules["FastSAM3DLib.errors"]
    import importlib.util

    spec = importlib.util.find_spec("FastSAM3DLib")
    path = Path(spec.submodule_search_locations[0]) / "errors.py"
    errorsSpec = importlib.util.spec_from_file_location("FastSAM3DLib.errors", path)
    module = importlib.util.module_from_spec(errorsSpec)
    sys.modules["FastSAM3DLib.errors"] = module
    errorsSpec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# Coordinates: the only place where RAS and LPS meet
# ------------------------------------------------------------------------------------------------

_RAS_LPS_FLIP = np.array([-1.0, -1.0, 1.0])


def rasToLps(points) -> np.ndarray:
    """RAS millimetres -> LPS millimetres (N x 3 or 3)."""
    return np.asarray(points, dtype=np.float64) * _RAS_LPS_FLIP


def lpsToRas(points) -> np.ndarray:
    """LPS millimetres -> RAS millimetres (N x 3 or 3)."""
    return np.asarray(points, dtype=np.float64) * _RAS_LPS_FLIP


def worldToLocal(node, pointsRAS) -> np.ndarray:
    """World RAS points -> the node's local RAS frame (inverse of its parent transforms, linear or not)."""
    points = np.asarray(pointsRAS, dtype=np.float64).reshape(-1, 3)
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return points.copy()
    worldToParent = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, worldToParent)
    return np.array([worldToParent.TransformPoint(*p) for p in points], dtype=np.float64)


def localToWorld(node, pointsRAS) -> np.ndarray:
    """The node's local RAS frame -> world RAS (its parent transforms applied)."""
    points = np.asarray(pointsRAS, dtype=np.float64).reshape(-1, 3)
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return points.copy()
    parentToWorld = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, parentToWorld)
    return np.array([parentToWorld.TransformPoint(*p) for p in points], dtype=np.float64)


def _matrixToNumpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpyToMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volumeIJKToRAS(volumeNode) -> np.ndarray:
    """The volume's IJK -> local RAS matrix (4 x 4), IJK counted from the image data's first voxel."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRas = _matrixToNumpy(matrix)
    extent = volumeNode.GetImageData().GetExtent()
    shift = np.eye(4)
    shift[:3, 3] = (extent[0], extent[2], extent[4])
    return ijkToRas @ shift


def volumeNodeToImage(volumeNode) -> sitk.Image:
    """A scalar volume node as a SimpleITK image on exactly its voxels, in its *local* frame, LPS.

    The parent transform is deliberately not applied (see the module docstring): points are moved
    into this frame instead, so nothing is resampled. Label-map volumes are ordinary scalar volumes
    here. Raises ImageError (a FastSAM3DInputError) for nodes without a single-component image.
    """
    errors = _errors()
    name = volumeNode.GetName() if volumeNode is not None else None
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None or imageData.GetPointData() is None or imageData.GetPointData().GetScalars() is None:
        raise errors.ImageError(f"volume {name!r} has no voxels: load an image into it first")
    scalars = imageData.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise errors.ImageError(
            f"volume {name!r} has {scalars.GetNumberOfComponents()} components per voxel (a colour or vector "
            "volume); choose a single-component scalar volume (e.g. convert it with the Vector to Scalar Volume module)"
        )
    extent = imageData.GetExtent()
    dims = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    if min(dims) < 1:
        raise errors.ImageError(f"volume {name!r} is empty (dimensions {dims})")
    array = numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1])
    image = sitk.GetImageFromArray(array)  # copies: the session may run in another thread

    ijkToRas = volumeIJKToRAS(volumeNode)
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(ijkToRas)):
        raise errors.ImageError(f"volume {name!r} has an invalid geometry (spacing {tuple(spacing)})")
    directionRAS = ijkToRas[:3, :3] / spacing
    directionLPS = directionRAS * _RAS_LPS_FLIP[:, None]  # flip the rows of x and y: RAS -> LPS
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in rasToLps(ijkToRas[:3, 3])))
    try:
        image.SetDirection(tuple(float(v) for v in directionLPS.ravel()))
    except RuntimeError as error:
        raise errors.ImageError(
            f"volume {name!r} has sheared or degenerate axes (IJKToRAS directions {directionRAS.round(4).tolist()}); "
            "resample it to an orthogonal grid first"
        ) from error
    return image


# ------------------------------------------------------------------------------------------------
# Oriented image data helpers (segmentation side)
# ------------------------------------------------------------------------------------------------


def _orientedImageArray(image) -> np.ndarray:
    """A (k, j, i) numpy view of an oriented image's scalars (empty array for an empty extent)."""
    extent = image.GetExtent()
    dims = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    if min(dims) <= 0 or image.GetPointData().GetScalars() is None:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def _makeOrientedImage(array: np.ndarray, ijkToRas: np.ndarray, start: Sequence[int]) -> "slicer.vtkOrientedImageData":
    """A uint8 oriented image holding ``array`` (k, j, i) with its first voxel at IJK ``start``."""
    image = slicer.vtkOrientedImageData()
    k, j, i = array.shape
    image.SetExtent(start[0], start[0] + i - 1, start[1], start[1] + j - 1, start[2], start[2] + k - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    _orientedImageArray(image)[...] = array
    image.SetImageToWorldMatrix(_numpyToMatrix(ijkToRas))
    return image


def _imageToWorld(image) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return _matrixToNumpy(matrix)


def _nonzeroBounds(array: np.ndarray) -> Optional[Tuple[slice, slice, slice]]:
    """Tight (k, j, i) slices around the non-zero voxels, or None if there are none (two passes:
    whole slices first, then the footprint of the occupied ones)."""
    occupied = np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1))
    if occupied.size == 0:
        return None
    k = slice(int(occupied[0]), int(occupied[-1]) + 1)
    footprint = array[k].any(axis=0)
    rows, columns = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    return k, slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)


def _fingerprint(array: Optional[np.ndarray], start, world) -> str:
    """sha1 of the non-zero voxels of a (k, j, i) array whose first voxel is IJK ``start`` in a frame
    with image-to-world matrix ``world``: their tight box (position, size), the frame and the bits."""
    digest = hashlib.sha1()
    bounds = None if array is None or array.size == 0 else _nonzeroBounds(array)
    if bounds is not None:
        first = [start[0] + bounds[2].start, start[1] + bounds[1].start, start[2] + bounds[0].start]
        digest.update(np.asarray(first + list(array[bounds].shape), np.int64).tobytes())
        digest.update(np.round(world, 6).tobytes())
        digest.update(np.packbits(array[bounds]).tobytes())
    return digest.hexdigest()


def _cropToExtent(image, extent: Sequence[int]):
    """The part of ``image`` inside ``extent`` (same geometry); None if they do not overlap."""
    own = image.GetExtent()
    lo = [max(own[2 * a], extent[2 * a]) for a in range(3)]
    hi = [min(own[2 * a + 1], extent[2 * a + 1]) for a in range(3)]
    if any(h < l for l, h in zip(lo, hi)):
        return None
    if list(lo) == [own[0], own[2], own[4]] and list(hi) == [own[1], own[3], own[5]]:
        return image
    array = _orientedImageArray(image)
    sub = array[lo[2] - own[4]: hi[2] - own[4] + 1, lo[1] - own[2]: hi[1] - own[2] + 1, lo[0] - own[0]: hi[0] - own[0] + 1]
    return _makeOrientedImage(np.ascontiguousarray(sub), _imageToWorld(image), lo)


def _transformBetween(sourceNode, targetNode) -> Tuple[Optional[vtk.vtkAbstractTransform], bool]:
    """Transform from ``sourceNode``'s local frame to ``targetNode``'s, and whether it is the identity."""
    sourceParent = sourceNode.GetParentTransformNode() if sourceNode is not None else None
    targetParent = targetNode.GetParentTransformNode() if targetNode is not None else None
    if sourceParent is None and targetParent is None:
        return None, True
    # Asked only of a linear chain: for a non-linear one Slicer logs an error before it declines.
    linear = (sourceParent.IsTransformToNodeLinear(targetParent) if sourceParent is not None
              else targetParent.IsTransformToWorldLinear())
    matrix = vtk.vtkMatrix4x4()
    if linear and slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(sourceParent, targetParent, matrix):
        if np.allclose(_matrixToNumpy(matrix), np.eye(4), atol=1e-9):
            return None, True
        transform = vtk.vtkTransform()
        transform.SetMatrix(matrix)
        return transform, False
    general = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(sourceParent, targetParent, general)
    return general, False


def _referenceAround(reference, image, transform):
    """``reference``'s grid cut to where ``image`` lands (2 voxels of margin); None if nowhere.

    Resampling onto a whole fine reference grid for every click would cost far more than the
    click; for a non-linear transform the full grid is used (its corners bound nothing).
    """
    if transform is not None and not isinstance(transform, vtk.vtkTransform):
        return reference
    extent = image.GetExtent()
    corners = np.array([[i, j, k, 1.0] for i in (extent[0] - 0.5, extent[1] + 0.5)
                        for j in (extent[2] - 0.5, extent[3] + 0.5) for k in (extent[4] - 0.5, extent[5] + 0.5)])
    world = (_imageToWorld(image) @ corners.T).T[:, :3]
    if transform is not None:
        world = np.array([transform.TransformPoint(*p) for p in world])
    ijk = (np.linalg.inv(_imageToWorld(reference)) @ np.c_[world, np.ones(len(world))].T).T[:, :3]
    own = reference.GetExtent()
    lo = [max(own[2 * a], int(np.floor(ijk[:, a].min())) - 2) for a in range(3)]
    hi = [min(own[2 * a + 1], int(np.ceil(ijk[:, a].max())) + 2) for a in range(3)]
    if any(h < l for l, h in zip(lo, hi)):
        return None
    target = slicer.vtkOrientedImageData()
    target.SetExtent(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
    target.SetImageToWorldMatrix(_numpyToMatrix(_imageToWorld(reference)))
    return target


def ensureSegmentationConverterRules() -> None:
    """Register the labelmap/surface converter rules when running outside the application.

    The Slicer application registers them at startup; a bare ``slicer-core`` process does not, and
    without them a segmentation cannot even create an empty binary labelmap segment.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {factory.GetConverterRules()[i].GetClassName() for i in range(len(factory.GetConverterRules()))}
    for ruleClass in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if ruleClass.__name__ not in registered:
            factory.RegisterConverterRule(ruleClass())


# ------------------------------------------------------------------------------------------------
# Requests: prepared on the main thread, run on a worker, applied on the main thread
# ------------------------------------------------------------------------------------------------

Prompt = Tuple  # ("point", lps(3), positive) or ("box", lps(3), lps(3))


@dataclass
class _ObjectTrack:
    """The session object of one segment, the prompts it was last given (in order) and the
    candidate mask it shows for a lone click (None: the model's pick)."""

    handle: int
    given: List[Prompt] = field(default_factory=list)
    candidate: Optional[int] = None
    stale: bool = False  # the session object no longer holds ``given`` (undo, reset or accept): replay it


@dataclass
class _Shown:
    """What made the voxels a segment shows: the prompts (in the volume's frame), the candidate, the volume."""

    prompts: List[Prompt] = field(default_factory=list)
    candidate: Optional[int] = None
    volumeNodeID: Optional[str] = None


@dataclass
class _UndoEntry:
    """A segment's voxels before a write, and what had made them."""

    labelmap: Any
    shown: _Shown


@dataclass
class _VolumeState:
    """A session on one volume node, reused between clicks (its embeddings stay cached).

    The session is created and given the image on the worker thread (``ensureSession``): validating
    and copying a large CT must not hold up the GUI.
    """

    volumeNodeID: str
    signature: tuple
    image: sitk.Image
    factory: Callable[[], Any]
    name: str = "image"  # how an unusable volume is named in the error
    session: Any = None
    objects: Dict[Tuple[str, str], _ObjectTrack] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Per segment, the prompts and candidate an undo, reset or accept went back to, for the worker to
    # give the session (the GUI thread must not wait for a worker's lock).
    rewinds: Dict[Tuple[str, str], Tuple[List[Prompt], Optional[int]]] = field(default_factory=dict)

    def ensureSession(self):
        with self.lock:
            if self.session is None:
                session = self.factory()
                session.set_image(self.image, name=self.name)  # embedding starts in the background
                self.session = session
            return self.session


@dataclass
class RegionMask:
    """A predicted mask on the volume's voxels, kept to the box where it can be non-zero.

    Carrying the box instead of a full-size mask keeps a click's cost proportional to the model's
    crops, not to the volume (a 512 x 512 x 300 CT would otherwise cost two full-size copies and a
    full scan per click).
    """

    start: Tuple[int, int, int]  # (i, j, k) of the box's first voxel
    array: np.ndarray  # uint8 (k, j, i), the box
    size: Tuple[int, int, int]  # (i, j, k) dimensions of the whole volume


@dataclass
class SegmentationResult:
    """What one prediction wrote: the segment, how many voxels, and the engine's timings."""

    segmentationNodeID: str
    segmentID: str
    voxels: int
    volumeMl: float
    timings: Dict[str, float]
    candidates: List[float] = field(default_factory=list)  # predicted IoUs of a lone click's candidate masks
    candidate: Optional[int] = None  # the one shown (None: the model's pick)


def shownCandidate(candidates: Sequence[float], chosen: Optional[int]) -> int:
    """Index of the candidate mask shown: the chosen one, else the model's pick (highest predicted IoU)."""
    return chosen if chosen is not None else int(np.argmax(candidates))


def _samePrompt(a: Prompt, b: Prompt, tolerance: float = 1e-6) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "point":
        return a[2] == b[2] and np.allclose(a[1], b[1], atol=tolerance)
    return np.allclose(a[1], b[1], atol=tolerance) and np.allclose(a[2], b[2], atol=tolerance)


def _rewind(session, track: _ObjectTrack, prompts: List[Prompt], candidate: Optional[int]) -> None:
    """Bring a segment's session object back to ``prompts`` (and ``candidate``): back to an earlier
    prompt of the same object by the session's exact undo, else marked for a replay."""
    given = track.given
    earlier = (not track.stale and track.candidate == candidate and 1 <= len(prompts) <= len(given)
               and all(_samePrompt(a, b) for a, b in zip(given, prompts)))
    if earlier:  # each later prompt is one history entry of the session (a candidate choice comes before them)
        for _ in range(len(given) - len(prompts)):
            session.undo(object=track.handle)
        track.given = list(prompts)
        return
    track.given, track.candidate, track.stale = list(prompts), candidate, True


class PredictionRequest:
    """One segmentation request: validated on the main thread, run anywhere, applied on the main thread.

    ``run()`` touches only the engine session (never MRML), so a GUI can call it on a worker thread;
    :meth:`FastSAM3DLogic.applyPrediction` then writes the mask on the main thread.
    """

    kind = "segment"

    def __init__(self, scene, state: _VolumeState, key: Tuple[str, str], prompts: List[Prompt], volumeNodeID: str,
                 candidate: Optional[int] = None):
        self.scene = scene
        self.state = state
        self.key = key
        self.prompts = prompts
        self.volumeNodeID = volumeNodeID
        self.candidate = candidate
        self.epoch = (0, 0)  # the Logic's stamp for the segment when the request was made (FastSAM3DLogic.isStale)
        self.isStale: Callable[[], bool] = lambda: False  # set by the Logic: an undo, reset, accept, model or scene came after
        self.candidates: Tuple[List[float], Optional[int]] = ([], None)  # after run(): the session's candidates()
        self.segmentationNodeID, self.segmentID = key

    def _syncPrompts(self) -> _ObjectTrack:
        """Give the session exactly ``self.prompts``: new clicks only if the old ones are a prefix."""
        session = self.state.session
        track = self.state.objects.get(self.key)
        if track is None:
            track = _ObjectTrack(handle=session.new_object())
            self.state.objects[self.key] = track
        rewind = self.state.rewinds.pop(self.key, None)
        if rewind is not None:
            _rewind(session, track, *rewind)
        given = track.given
        # Another candidate for the first click changes what the later clicks refined: replay them.
        sameCandidate = self.candidate == track.candidate or len(given) <= 1
        if (not track.stale and sameCandidate and len(given) <= len(self.prompts)
                and all(_samePrompt(a, b) for a, b in zip(given, self.prompts))):
            todo = self.prompts[len(given):]
        else:  # a point moved or was removed (or another candidate was chosen): start the object over
            self._restart(track)
            todo = list(self.prompts)
        self._showCandidate(track)
        for prompt in todo:
            try:
                if prompt[0] == "point":
                    session.add_point(tuple(prompt[1]), positive=bool(prompt[2]), object=track.handle)
                else:
                    session.add_box(tuple(prompt[1]), tuple(prompt[2]), object=track.handle)
            except Exception:
                self._restart(track)
                raise
            track.given.append(prompt)
            self._showCandidate(track)
        return track

    def _restart(self, track: _ObjectTrack) -> None:
        self.state.session.reset(object=track.handle)
        track.given = []
        track.candidate = None
        track.stale = False

    def _showCandidate(self, track: _ObjectTrack) -> None:
        """While the first prompt is the only one given, show the requested candidate: later prompts refine it.

        A first prompt without candidates (a box, a model without them) ignores the request, except
        when it is the request's only prompt: asking for a candidate there is an error (PromptError).
        """
        if len(track.given) != 1 or (self.candidate is None and track.candidate is None):
            return  # nothing chosen, now or before: the session shows the model's pick
        ious, shown = self.state.session.candidates(object=track.handle)
        if not ious and len(self.prompts) > 1:
            track.candidate = None
            return
        if shown != self.candidate:
            self.state.session.choose_candidate(self.candidate, object=track.handle)
        track.candidate = self.candidate

    def run(self) -> Optional[RegionMask]:
        """The mask, or None for a request made stale while it waited (its result would not be
        written; a pending rewind is left for the next request)."""
        if self.isStale():
            return None
        with self.state.lock:
            self.state.ensureSession()
            track = self._syncPrompts()
            region, array = self.state.session.predict_region(object=track.handle)
            self.candidates = self.state.session.candidates(object=track.handle)
            size = tuple(int(n) for n in self.state.session.image.GetSize())
            return RegionMask(tuple(int(a) for a in region.start), array, size)


class UncertaintyRequest(PredictionRequest):
    """Stochastic decodes of the segment's current prompts: (mean probability, uncertainty) images."""

    kind = "uncertainty"

    def __init__(self, scene, state, key, prompts, volumeNodeID, samples: int, method: str, candidate: Optional[int] = None):
        super().__init__(scene, state, key, prompts, volumeNodeID, candidate)
        self.samples = int(samples)
        self.method = method

    def run(self) -> Optional[Tuple[sitk.Image, sitk.Image]]:
        if self.isStale():
            return None
        with self.state.lock:
            self.state.ensureSession()
            track = self._syncPrompts()
            return self.state.session.uncertainty(n=self.samples, method=self.method, object=track.handle)


class EmbeddingRequest:
    """Create the volume's session (which starts embedding) on the worker, before the first click."""

    kind = "embed"
    key = None

    def __init__(self, scene, state: _VolumeState):
        self.scene = scene
        self.state = state
        self.volumeNodeID = state.volumeNodeID

    def run(self) -> None:
        self.state.ensureSession()


class PredictionQueue:
    """One worker thread for engine calls; a newer request replaces an older one still waiting for the
    same thing (kind and segment), and requests for other things wait their turn in order.

    Live updates produce a request per mouse event; only the newest waiting one is worth running.
    The GUI calls :meth:`poll` from a timer on the main thread and applies what it returns there.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsam3d-slicer")
        self._lock = threading.Lock()
        self._running: Optional[Tuple[Any, Future]] = None
        self._waiting: "OrderedDict[Tuple[str, Any], Any]" = OrderedDict()
        self.dropped = 0

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None or bool(self._waiting)

    def submit(self, request) -> None:
        with self._lock:
            if self._running is None:
                self._running = (request, self._executor.submit(request.run))
                return
            slot = (request.kind, request.key)
            if slot in self._waiting:
                self.dropped += 1
                del self._waiting[slot]  # the newer one goes to the back, after what was asked in between
            self._waiting[slot] = request

    def poll(self) -> List[Tuple[Any, Any, Optional[BaseException], bool]]:
        """Finished work as ``(request, result, error, superseded)``; starts the next waiting request.

        ``superseded`` is True when a newer request of the same kind for the same segment is
        already waiting, so applying this result would only be overwritten a moment later.
        """
        finished = []
        with self._lock:
            if self._running is not None and self._running[1].done():
                request, future = self._running
                error = future.exception()
                result = None if error is not None else future.result()
                superseded = (request.kind, request.key) in self._waiting
                finished.append((request, result, error, superseded))
                self._running = None
                if self._waiting:
                    _, waiting = self._waiting.popitem(last=False)
                    self._running = (waiting, self._executor.submit(waiting.run))
        return finished

    def wait(self, timeout: float = 60.0) -> List[Tuple[Any, Any, Optional[BaseException], bool]]:
        """Poll until idle (scripts and tests; the GUI polls from a timer instead)."""
        results = []
        deadline = time.monotonic() + timeout
        while self.busy:
            results.extend(self.poll())
            if time.monotonic() > deadline:
                raise TimeoutError("FastSAM3D prediction did not finish in time")
            time.sleep(0.01)
        return results

    def shutdown(self) -> None:
        with self._lock:
            self._waiting.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------
# Parameter node: defaults and types in one place
# ------------------------------------------------------------------------------------------------

#: Parameter name -> (type, default). Node references (volume, segmentation, markups, ROI, overlay)
#: are stored as MRML node references, not here.
PARAMETERS: Dict[str, Tuple[type, Any]] = {
    "SegmentID": (str, ""),
    "ModelSource": (str, "bundled"),  # bundled | checkpoint | public
    "CheckpointPath": (str, ""),
    "Device": (str, "auto"),  # auto | cpu | cuda
    "LiveUpdate": (bool, True),
    "ShowUncertainty": (bool, False),
    "UncertaintySamples": (int, 16),
    "Candidate": (int, -1),  # the candidate mask shown for a lone click; -1: the model's pick
    "RefineBoundary": (bool, True),  # near the model's boundary the volume's intensities help decide
}
MODEL_SOURCES = ("bundled", "checkpoint", "public")
DEVICES = ("auto", "cpu", "cuda")
REFERENCE_ROLES = {
    "InputVolume": "FastSAM3D.InputVolume",
    "Segmentation": "FastSAM3D.Segmentation",
    "PositivePoints": "FastSAM3D.PositivePoints",
    "NegativePoints": "FastSAM3D.NegativePoints",
    "ROI": "FastSAM3D.ROI",
    "Uncertainty": "FastSAM3D.Uncertainty",
}
POSITIVE_COLOR = (0.20, 0.85, 0.25)
NEGATIVE_COLOR = (0.95, 0.20, 0.20)


def _serialize(kind: type, value) -> str:
    if kind is bool:
        return "True" if value else "False"
    return str(kind(value))


def _parse(kind: type, text: str, default):
    if text is None or text == "":
        return default
    try:
        if kind is bool:
            return text.strip().lower() in ("true", "1", "yes", "on")
        return kind(text)
    except ValueError:
        return default


# ------------------------------------------------------------------------------------------------
# The logic
# ------------------------------------------------------------------------------------------------


class FastSAM3DLogic(ScriptedLoadableModuleLogic):
    """Click-based 3D segmentation of MRML volumes into MRML segments.

    Usable from the Python console without the module's GUI::

        logic = FastSAM3DLogic()
        logic.segmentFromPoints(volumeNode, segmentationNode, segmentId, [[12.0, -20.5, 8.0]], [1])

    Arguments:
      model: an already loaded model (``FastSAM3DLib.load_model`` / ``build_model``); None loads
        the bundled weights on first use (``loadModel`` chooses others).
      device: "auto", "cpu", "cuda" (where the model runs).
      precision: the session's precision (FastSAM3DLib.session.PRECISIONS; "auto" by default).
      refineBoundary: let the volume's intensities decide where the model is unsure of its boundary
        (``FastSAM3DLib.paste.BoundaryRefinement``); ``setRefineBoundary`` changes it later.
      sessionFactory: ``factory(model) -> Session``; the default creates ``FastSAM3DLib.Session``. Another
        engine provides what the Logic calls: ``set_image(image, name=...)``, ``new_object``, ``add_point``,
        ``add_box``, ``undo(object=)``, ``reset(object=)``, ``predict_region``, ``candidates``,
        ``choose_candidate``, ``uncertainty``, as ``Session`` does.
      maxUndo: how many earlier labelmaps are kept per segment.

    The arguments are keyword-only: when the source folder is added to Slicer's module paths,
    Slicer tries ``FastSAM3DLogic(moduleObject)`` as if this file were a module; that call then
    fails cleanly instead of registering a bogus module (the installed layout avoids it).
    """

    def __init__(
        self,
        *,
        model=None,
        device: str = "auto",
        precision: str = "auto",
        refineBoundary: bool = True,
        sessionFactory: Optional[Callable[[Any], Any]] = None,
        maxUndo: int = 20,
    ) -> None:
        if ScriptedLoadableModuleLogic is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        self._model = model
        self.device = device
        self.precision = precision
        self.refineBoundary = bool(refineBoundary)
        self.sessionFactory = sessionFactory
        if int(maxUndo) < 1:
            raise ValueError(f"maxUndo must be at least 1 (the state before the first edit is always kept), got {maxUndo}")
        self.maxUndo = int(maxUndo)
        self._volumes: Dict[str, _VolumeState] = {}
        self._undo: Dict[Tuple[str, str], List[_UndoEntry]] = {}
        # Per segment: what made the result it shows (each undo entry keeps what made the one before).
        self._shown: Dict[Tuple[str, str], _Shown] = {}
        # Per segment: raised by undo, reset and accept; and for all segments, by a new model or scene.
        # A request made before keeps the older stamp, and its result, arriving after, is not written
        # over what the user went back to.
        self._epochs: Dict[Tuple[str, str], int] = {}
        self._generation = 0
        self.logCallback: Optional[Callable[[str], None]] = None

    def log(self, message: str) -> None:
        logger.info(message)
        if self.logCallback is not None:
            self.logCallback(message)

    # -- parameter node --------------------------------------------------------------------------

    @staticmethod
    def setDefaultParameters(parameterNode) -> None:
        """Fill every parameter the node does not have yet (one modify block)."""
        wasModifying = parameterNode.StartModify()
        try:
            for name, (kind, default) in PARAMETERS.items():
                if not parameterNode.GetParameter(name):
                    parameterNode.SetParameter(name, _serialize(kind, default))
        finally:
            parameterNode.EndModify(wasModifying)

    @staticmethod
    def getParameter(parameterNode, name: str):
        """A typed parameter value (the default when absent or unreadable)."""
        kind, default = PARAMETERS[name]
        return _parse(kind, parameterNode.GetParameter(name), default)

    @staticmethod
    def setParameter(parameterNode, name: str, value) -> None:
        kind, _ = PARAMETERS[name]
        parameterNode.SetParameter(name, _serialize(kind, value))

    # -- model -------------------------------------------------------------------------------------

    @property
    def model(self):
        """The model in use; the bundled one is loaded on first access."""
        if self._model is None:
            self.loadModel("bundled")
        return self._model

    def setModel(self, model) -> None:
        """Use another model; cached sessions (and their embeddings) are dropped, and results of the
        previous model still running are not written."""
        self._model = model
        self.clearSessions()
        self._generation += 1

    def loadModel(self, source: str = "bundled", checkpointPath: Optional[str] = None, device: Optional[str] = None):
        """Load the bundled weights or a checkpoint file; raises CheckpointError with a clear message."""
        engine = _engine()
        if device is not None:
            self.device = device
        if source == "bundled":
            if engine.bundled_model_path() is None:  # said in Slicer's terms, not the engine's Python/CLI ones
                raise engine.CheckpointError(
                    "this FastSAM3D install has no bundled model weights yet: in the FastSAM3D module's Model "
                    "section choose 'Local checkpoint' (e.g. Resources/Training/fastsam3d-campaign.safetensors of the "
                    "source tree) or download the public weights, then press Load model"
                )
            model = engine.load_model(None, device=self.device)
        elif source in ("checkpoint", "public"):
            if not checkpointPath:
                raise engine.CheckpointError("no checkpoint file chosen: pick a .pth or .safetensors file first")
            model = engine.load_model(checkpointPath, device=self.device)
        else:
            raise ValueError(f"model source must be one of {', '.join(MODEL_SOURCES)}, got {source!r}")
        self.setModel(model)
        self.log(f"Model loaded: {model.config.get('source', source)} on {next(model.parameters()).device}")
        return model

    @staticmethod
    def weightsDirectory() -> Path:
        """Where downloaded weights are kept (``FASTSAM3D_WEIGHTS_DIR``, Slicer's cache, or ~/.cache)."""
        override = os.environ.get("FASTSAM3D_WEIGHTS_DIR")
        if override:
            return Path(override)
        app = getattr(slicer, "app", None)
        if app is not None and getattr(app, "cachePath", None):
            return Path(app.cachePath) / "FastSAM3D"
        return Path.home() / ".cache" / "fastsam3d"

    def publicWeightsPath(self, key: Optional[str] = None) -> Path:
        """Where :meth:`downloadPublicWeights` keeps the converted public weights ``key`` (default: the pinned ones)."""
        import FastSAM3DDownload

        source = FastSAM3DDownload.PUBLIC_WEIGHTS[key or FastSAM3DDownload.DEFAULT_PUBLIC_WEIGHTS]
        return self.weightsDirectory() / (Path(source.filename).stem + ".safetensors")

    def downloadPublicWeights(self, key: Optional[str] = None, progress=None, cancel=None) -> Path:
        """Download public weights (pinned sha256) and convert them once to safetensors; returns its path.

        The public ``.pth`` holds pickled training state; it is unpickled (``trust=True``) only after
        its sha256 matched the pinned digest of the published file, and only to write a weights-only
        safetensors file, which is what gets loaded.
        """
        import FastSAM3DDownload

        source = FastSAM3DDownload.PUBLIC_WEIGHTS[key or FastSAM3DDownload.DEFAULT_PUBLIC_WEIGHTS]
        converted = self.publicWeightsPath(key)
        if converted.exists():
            return converted
        downloaded = FastSAM3DDownload.download_weights(source, self.weightsDirectory(), progress=progress, cancel=cancel)
        _engine().convert_checkpoint(downloaded, converted, trust=True)
        return converted

    # -- sessions ----------------------------------------------------------------------------------

    def _newSession(self, model):
        if self.sessionFactory is not None:
            return self.sessionFactory(model)
        return _engine().Session(model, device=self.device, precision=self.precision, refinement=self._refinement())

    def _refinement(self):
        return _engine().BoundaryRefinement() if self.refineBoundary else None

    def setRefineBoundary(self, enabled: bool) -> None:
        """Turn the boundary refinement on or off for every open session, keeping their embeddings
        and prompts: the next segmentation of each object answers with the new setting."""
        if bool(enabled) == self.refineBoundary:
            return
        self.refineBoundary = bool(enabled)
        for state in list(self._volumes.values()):
            session = state.session  # the session's setter is thread-safe: no wait for a running update
            if session is not None and hasattr(session, "refinement"):
                session.refinement = self._refinement()

    @staticmethod
    def _volumeSignature(volumeNode) -> tuple:
        """What identifies the voxels and grid a session was made for (not the parent transform:
        clicks are moved into the volume's frame, so a moved volume keeps its embeddings)."""
        imageData = volumeNode.GetImageData()
        scalars = imageData.GetPointData().GetScalars() if imageData is not None else None
        if scalars is None:
            return ()
        return (
            imageData.GetAddressAsString("vtkImageData"),
            scalars.GetAddressAsString("vtkDataArray"),
            scalars.GetMTime(),  # bumped by Modified(), e.g. slicer.util.arrayFromVolumeModified
            imageData.GetExtent(),
            tuple(np.round(volumeIJKToRAS(volumeNode).ravel(), 9)),
        )

    def _volumeState(self, volumeNode) -> _VolumeState:
        """The cached session for this volume, (re)created when its voxels or geometry changed."""
        signature = self._volumeSignature(volumeNode)
        state = self._volumes.get(volumeNode.GetID())
        if state is not None and state.signature == signature:
            return state
        image = volumeNodeToImage(volumeNode)
        if state is not None:
            self._closeState(state)
        # The model is taken here (on the caller's thread, loading the bundled one if none is set), not
        # when the worker creates the session: a model changed meanwhile must not be loaded there.
        model = self.model
        state = _VolumeState(volumeNode.GetID(), signature, image, lambda: self._newSession(model), name=f"volume {volumeNode.GetName()!r}")
        self._volumes[volumeNode.GetID()] = state
        return state

    def prepareVolume(self, volumeNode) -> EmbeddingRequest:
        """A request that starts embedding ``volumeNode`` (run it on a worker when the volume is chosen,
        so the first click waits less)."""
        return EmbeddingRequest(volumeNode.GetScene(), self._volumeState(volumeNode))

    def sessionProgress(self, volumeNode) -> Dict[str, Any]:
        """The session's progress dict (``{"stage": ..., "fraction": ...}``), or idle if none."""
        state = self._volumes.get(volumeNode.GetID()) if volumeNode is not None else None
        if state is None:
            return {"stage": "idle", "fraction": 0.0}
        if state.session is None:
            return {"stage": "starting", "fraction": 0.0}
        return dict(getattr(state.session, "progress", {"stage": "ready", "fraction": 1.0}))

    @staticmethod
    def _closeState(state: _VolumeState) -> None:
        close = getattr(state.session, "close", None) if state.session is not None else None
        if close is not None:
            try:
                close()
            except Exception:  # closing is best effort; never hide the real work's errors
                logger.exception("closing a FastSAM3D session failed")

    def releaseVolume(self, volumeNode) -> None:
        """Forget the session (and embeddings) of one volume."""
        state = self._volumes.pop(volumeNode.GetID(), None)
        if state is not None:
            self._closeState(state)

    def clearSessions(self) -> None:
        """Forget all sessions (a model change; :meth:`forgetScene` on a scene close)."""
        for state in self._volumes.values():
            self._closeState(state)
        self._volumes.clear()

    def forgetScene(self) -> None:
        """The scene closes: its sessions, undo history and prompts go (node IDs are reused by the
        next scene, whose segments an old undo entry would overwrite)."""
        self.clearSessions()
        self._undo.clear()
        self._shown.clear()
        self._generation += 1  # results still in flight belong to the closed scene

    # -- validation ----------------------------------------------------------------------------

    @staticmethod
    def _checkSegment(segmentationNode, segmentId: str) -> None:
        errors = _errors()
        if segmentationNode is None:
            raise errors.FastSAM3DInputError("no segmentation chosen: select or create a segmentation node")
        segmentation = segmentationNode.GetSegmentation()
        if not segmentId or segmentation.GetSegment(segmentId) is None:
            raise errors.FastSAM3DInputError(
                f"segmentation {segmentationNode.GetName()!r} has no segment {segmentId!r}: add or select a segment"
            )
        sourceName = segmentation.GetSourceRepresentationName() if hasattr(segmentation, "GetSourceRepresentationName") \
            else segmentation.GetMasterRepresentationName()
        if sourceName != slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName():
            raise errors.FastSAM3DInputError(
                f"segmentation {segmentationNode.GetName()!r} is stored as {sourceName!r}; FastSAM3D writes binary "
                "labelmaps: make 'Binary labelmap' its source representation (Segmentations module) first"
            )

    @staticmethod
    def _toLocalLps(volumeNode, state: _VolumeState, pointsRAS, what: str) -> np.ndarray:
        """World RAS points -> the session image's LPS frame, each checked to lie inside the volume."""
        errors = _errors()
        points = np.asarray(pointsRAS, dtype=np.float64)
        if points.size == 0:
            return points.reshape(0, 3)
        if points.ndim != 2 or points.shape[1] != 3 or not np.all(np.isfinite(points)):
            raise errors.PromptError(f"{what} must be a list of (R, A, S) millimetre triples, got shape {points.shape}")
        lps = rasToLps(worldToLocal(volumeNode, points))
        size = np.asarray(state.image.GetSize())
        for n, (world, point) in enumerate(zip(points, lps)):
            index = np.asarray(state.image.TransformPhysicalPointToContinuousIndex(tuple(point)))
            if np.any(index < -0.5) or np.any(index > size - 0.5):
                raise errors.PromptError(
                    f"{what}{f' {n + 1}' if len(points) > 1 else ''} at R {world[0]:.1f}, A {world[1]:.1f}, S {world[2]:.1f} mm is outside volume "
                    f"{volumeNode.GetName()!r} (it falls at voxel ({', '.join(f'{v:.1f}' for v in index)}); the volume has "
                    f"{tuple(int(s) for s in size)} voxels)"
                )
        return lps

    @classmethod
    def _localBox(cls, volumeNode, state: _VolumeState, cornersRAS: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """A world box (two opposite RAS corners) as the engine's box: axis-aligned in the volume's
        LPS frame, around all eight of its corners carried there (under a rotating transform two
        corners alone can span a flat box). Like the engine, it may reach past the volume (an ROI
        drawn around a structure at the edge of the field of view) if its centre lies inside."""
        errors = _errors()
        if not np.all(np.isfinite(cornersRAS)):
            raise errors.PromptError(f"box corners must be finite (R, A, S) millimetres, got {cornersRAS.tolist()}")
        cls._toLocalLps(volumeNode, state, cornersRAS.mean(0, keepdims=True), "the centre of the box")
        cube = np.array([[cornersRAS[i, 0], cornersRAS[j, 1], cornersRAS[k, 2]] for i, j, k in np.ndindex(2, 2, 2)])
        local = rasToLps(worldToLocal(volumeNode, cube))
        extent, voxel = local.max(0) - local.min(0), min(state.image.GetSpacing())
        if np.any(extent < voxel):  # the engine's rule, said in the volume's own R, A, S axes
            raise errors.PromptError(
                f"the box is flat: it spans {extent[0]:.1f} x {extent[1]:.1f} x {extent[2]:.1f} mm (R x A x S in volume "
                f"{volumeNode.GetName()!r}'s frame); give it at least one voxel ({voxel:.2g} mm) in every direction"
            )
        return tuple(float(v) for v in local.min(0)), tuple(float(v) for v in local.max(0))

    # -- segmentation --------------------------------------------------------------------------

    def prepareSegmentation(
        self,
        volumeNode,
        segmentationNode,
        segmentId: str,
        pointsRAS=(),
        labels=(),
        boxRAS: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
        candidate: Optional[int] = None,
    ) -> PredictionRequest:
        """Validate the inputs and return a request whose ``run()`` predicts (see :class:`PredictionRequest`).

        Arguments are those of :meth:`segmentFromPoints`, plus ``boxRAS``: two opposite corners of a
        box in world RAS. Raises FastSAM3DInputError subclasses before anything is computed (a
        ``candidate`` the model does not offer fails in ``run()``).
        """
        errors = _errors()
        if volumeNode is None:
            raise errors.ImageError("no input volume chosen")
        self._checkSegment(segmentationNode, segmentId)
        if candidate is not None and (isinstance(candidate, bool) or not isinstance(candidate, (int, np.integer)) or candidate < 0):
            raise errors.PromptError(f"candidate must be None (the model's pick) or a candidate index 0, 1, 2..., got {candidate!r}")
        try:
            labels = list(labels)
            points = np.asarray(pointsRAS, dtype=np.float64)
        except (TypeError, ValueError):
            raise errors.PromptError(
                f"points must be a list of (R, A, S) millimetre triples and labels a list of 1/0, got {pointsRAS!r} and {labels!r}"
            ) from None
        if points.size == 0:
            points = np.zeros((0, 3))
        elif points.ndim > 2 or points.shape[-1] != 3:
            raise errors.PromptError(f"points must be (R, A, S) millimetre triples, got an array of shape {points.shape}")
        points = points.reshape(-1, 3)
        if len(labels) != len(points):
            raise errors.PromptError(f"got {len(points)} points but {len(labels)} labels: give one label (1 or 0) per point")
        for n, label in enumerate(labels):
            if label not in (0, 1, True, False):
                raise errors.PromptError(f"label {n + 1} is {label!r}: use 1 (include) or 0 (exclude)")
        if len(points) == 0 and boxRAS is None:
            raise errors.PromptError("no prompt: place at least one point or a box")
        state = self._volumeState(volumeNode)
        prompts: List[Prompt] = []
        if boxRAS is not None:
            prompts.append(("box",) + self._localBox(volumeNode, state, np.asarray(boxRAS, dtype=np.float64).reshape(2, 3)))
        lps = self._toLocalLps(volumeNode, state, points, "point")
        prompts.extend(("point", tuple(p), bool(label)) for p, label in zip(lps, labels))
        key = (segmentationNode.GetID(), segmentId)
        request = PredictionRequest(volumeNode.GetScene(), state, key, prompts, volumeNode.GetID(),
                                    None if candidate is None else int(candidate))
        self._stampRequest(request)
        return request

    def _stampRequest(self, request) -> None:
        request.epoch = self._stamp(request.key)
        request.isStale = lambda: self.isStale(request)

    @staticmethod
    def _checkMaskFits(mask: RegionMask, volumeNode) -> None:
        dims = tuple(volumeNode.GetImageData().GetDimensions())
        if tuple(mask.size) != dims:
            raise _errors().ImageError(
                f"the mask is for {tuple(mask.size)} voxels but volume {volumeNode.GetName()!r} has {dims}; the volume "
                "changed while the prediction ran: click again"
            )

    def isStale(self, request) -> bool:
        """Whether an undo, reset or accept of its segment, or another model or scene, came after
        ``request`` was made: its result must not be written (the next request brings the session
        in line)."""
        return request.epoch != self._stamp(request.key)

    def _stamp(self, key) -> Tuple[int, int]:
        return self._generation, self._epochs.get(key, 0)

    def applyPrediction(self, request: PredictionRequest, mask: RegionMask) -> Optional[SegmentationResult]:
        """Write a finished request's mask into its segment (main thread); undo keeps the previous one.

        Returns None, writing nothing, for a request made before an undo, reset or accept of its
        segment, or before another model or scene (:meth:`isStale`).
        """
        errors = _errors()
        if self.isStale(request):
            return None
        scene = request.scene
        volumeNode = scene.GetNodeByID(request.volumeNodeID)
        segmentationNode = scene.GetNodeByID(request.segmentationNodeID)
        if volumeNode is None:
            raise errors.ImageError("the input volume was removed from the scene before the result arrived")
        self._checkSegment(segmentationNode, request.segmentID)
        self._checkMaskFits(mask, volumeNode)
        labelmap = self.maskToSegmentLabelmap(mask.array, volumeNode, segmentationNode, mask.start)
        shown = _Shown(list(request.prompts), request.candidate, request.volumeNodeID)
        self._writeSegment(segmentationNode, request.segmentID, labelmap, shown)
        spacing = np.prod(volumeNode.GetSpacing())
        voxels = int(np.count_nonzero(mask.array))
        timings = dict(getattr(request.state.session, "last_timings", {}) or {})
        ious, shown = request.candidates
        return SegmentationResult(segmentationNode.GetID(), request.segmentID, voxels, float(voxels * spacing / 1000.0), timings,
                                  list(ious), shown)

    def segmentFromPoints(self, volumeNode, segmentationNode, segmentId: str, pointsRAS, labels, candidate=None) -> SegmentationResult:
        """Segment ``segmentId`` from clicks and write it into the segmentation.

        Arguments:
          volumeNode: the scalar (or label-map) volume to segment; parent transforms are honoured.
          segmentationNode: the segmentation holding the target segment (parent transforms honoured).
          segmentId: the segment to (re)place; no other segment changes.
          pointsRAS: clicks in world RAS millimetres, as markups report them (N x 3). They are the
            segment's complete prompt list: points that were given before and are still first in
            the list cost only a decode; a moved or removed point restarts the segment's prompts.
          labels: per point, 1 (include) or 0 (exclude).
          candidate: for a first positive click of a model with candidate masks (the result's
            ``candidates``, small to large, after a lone click), which one to show; None: the one the
            model rates best. Later points refine the candidate shown (asking for another replays
            them on it). With a lone click that has no candidates it is an error; when a box or
            another prompt without candidates comes first, it is ignored.

        Returns:
          :class:`SegmentationResult` (voxel count, volume, engine timings, candidates).

        Raises:
          FastSAM3DInputError (ImageError, PromptError, CheckpointError): bad input, with a message
          naming what is wrong; the segmentation is unchanged.
        """
        request = self.prepareSegmentation(volumeNode, segmentationNode, segmentId, pointsRAS, labels, candidate=candidate)
        return self.applyPrediction(request, request.run())

    def segmentFromBox(self, volumeNode, segmentationNode, segmentId: str, cornerRAS, oppositeRAS, pointsRAS=(), labels=()):
        """Segment from a box (two opposite corners in world RAS), optionally refined with clicks.

        The box is axis-aligned in the volume's local LPS frame: a box drawn in a rotated view, or a
        volume under a rotating transform, is replaced by the box around its eight transformed corners.
        """
        request = self.prepareSegmentation(volumeNode, segmentationNode, segmentId, pointsRAS, labels, (cornerRAS, oppositeRAS))
        return self.applyPrediction(request, request.run())

    @staticmethod
    def roiCornersRAS(roiNode) -> Tuple[np.ndarray, np.ndarray]:
        """Two opposite corners (world RAS) of the axis-aligned box around a markups ROI."""
        bounds = [0.0] * 6
        roiNode.GetRASBounds(bounds)
        return np.array(bounds[0::2]), np.array(bounds[1::2])

    # -- writing and undo --------------------------------------------------------------------------

    @staticmethod
    def referenceGeometry(segmentationNode, volumeNode=None):
        """The segmentation's reference geometry (an oriented image without voxels) in its local frame.

        A segmentation that has none yet gets the volume's (Slicer's own rule for new segmentations).
        """
        converter = slicer.vtkSegmentationConverter
        name = converter.GetReferenceImageGeometryParameterName()
        segmentation = segmentationNode.GetSegmentation()
        text = segmentation.GetConversionParameter(name)
        if not text and volumeNode is not None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            text = segmentation.GetConversionParameter(name)
        geometry = slicer.vtkOrientedImageData()
        if not text or not converter.DeserializeImageGeometry(text, geometry, False):
            raise _errors().FastSAM3DInputError(
                f"segmentation {segmentationNode.GetName()!r} has no reference geometry: choose its source geometry "
                "(Segment Editor: 'Specify geometry') or segment with a volume first"
            )
        return geometry

    def maskToSegmentLabelmap(self, maskArray: np.ndarray, volumeNode, segmentationNode, start: Sequence[int] = (0, 0, 0)):
        """A (k, j, i) mask on the volume's voxels -> uint8 labelmap on the segmentation's reference grid.

        ``maskArray`` is the whole volume, or the box of it whose first voxel is ``start`` (i, j, k).
        Carries the mask through the volume's and the segmentation's parent transforms and resamples
        (nearest neighbour) only when the grids differ. Returns None for an empty mask.
        """
        bounds = _nonzeroBounds(maskArray)
        if bounds is None:
            return None
        first = [start[0] + bounds[2].start, start[1] + bounds[1].start, start[2] + bounds[0].start]
        extent = volumeNode.GetImageData().GetExtent()
        labelmap = _makeOrientedImage(
            np.ascontiguousarray(maskArray[bounds], dtype=np.uint8).clip(0, 1),
            _matrixToNumpy(self._ijkToRasMatrix(volumeNode)),
            [first[0] + extent[0], first[1] + extent[2], first[2] + extent[4]],
        )
        reference = self.referenceGeometry(segmentationNode, volumeNode)
        transform, identity = _transformBetween(volumeNode, segmentationNode)
        if identity and np.allclose(_imageToWorld(labelmap), _imageToWorld(reference), atol=1e-6):
            return _cropToExtent(labelmap, reference.GetExtent())
        target = _referenceAround(reference, labelmap, transform)
        if target is None:  # the mask lands outside the segmentation's grid
            return None
        resampled = slicer.vtkOrientedImageData()
        ok = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, target, resampled, False, False, transform
        )
        if not ok:
            raise RuntimeError("resampling the mask onto the segmentation's geometry failed")
        array = _orientedImageArray(resampled)
        if array.size == 0 or not array.any():
            return None
        return resampled

    @staticmethod
    def _ijkToRasMatrix(volumeNode) -> vtk.vtkMatrix4x4:
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return matrix

    @staticmethod
    def segmentLabelmap(segmentationNode, segmentId: str):
        """A binary (0/1) copy of one segment's voxels in the segmentation's local frame; None if empty."""
        layer = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, segmentId, layer, False)
        array = _orientedImageArray(layer)
        if array.size == 0:
            return None
        label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
        binary = array == label
        bounds = _nonzeroBounds(binary)
        if bounds is None:
            return None
        extent = layer.GetExtent()
        start = [extent[0] + bounds[2].start, extent[2] + bounds[1].start, extent[4] + bounds[0].start]
        return _makeOrientedImage(np.ascontiguousarray(binary[bounds], dtype=np.uint8), _imageToWorld(layer), start)

    @staticmethod
    def _segmentLayer(segmentationNode, segmentId: str):
        """The shared labelmap layer holding a segment (no copy), or None if the segment has none."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            return None
        return segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())

    @classmethod
    def segmentStamp(cls, segmentationNode, segmentId: str) -> tuple:
        """Changes whenever the segment's voxels may have changed (its layer was replaced or
        modified, or its label value changed); equal stamps mean the same voxels."""
        layer = cls._segmentLayer(segmentationNode, segmentId)
        if layer is None:
            return (None,)
        label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
        return (layer.GetAddressAsString("vtkOrientedImageData"), layer.GetMTime(), label)

    @classmethod
    def segmentFingerprint(cls, segmentationNode, segmentId: str) -> str:
        """A digest of one segment's voxels (their positions in the segmentation's frame), equal for
        equal contents whatever the shared layer around them: how the editor effect recognises a
        state it wrote earlier after the Segment Editor's Undo. Reads the layer in place."""
        layer = cls._segmentLayer(segmentationNode, segmentId)
        if layer is None:  # not stored as a labelmap: convert a copy
            return cls.labelmapFingerprint(cls.segmentLabelmap(segmentationNode, segmentId))
        label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
        return _fingerprint(_orientedImageArray(layer) == label, layer.GetExtent()[::2], _imageToWorld(layer))

    @staticmethod
    def labelmapFingerprint(labelmap) -> str:
        """:meth:`segmentFingerprint` of a labelmap from :meth:`segmentLabelmap` (None: an empty
        segment), without reading the segmentation again."""
        if labelmap is None:
            return _fingerprint(None, None, None)
        return _fingerprint(_orientedImageArray(labelmap) > 0, labelmap.GetExtent()[::2], _imageToWorld(labelmap))

    def segmentArray(self, segmentationNode, segmentId: str, volumeNode=None) -> np.ndarray:
        """One segment as a (k, j, i) 0/1 array on the segmentation's full reference grid."""
        reference = self.referenceGeometry(segmentationNode, volumeNode)
        extent = reference.GetExtent()
        full = np.zeros((extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1), np.uint8)
        labelmap = self.segmentLabelmap(segmentationNode, segmentId)
        if labelmap is None:
            return full
        if not np.allclose(_imageToWorld(labelmap), _imageToWorld(reference), atol=1e-6):
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled)
            labelmap = resampled
        labelmap = _cropToExtent(labelmap, extent)
        if labelmap is None:
            return full
        own = labelmap.GetExtent()
        full[own[4] - extent[4]: own[5] - extent[4] + 1, own[2] - extent[2]: own[3] - extent[2] + 1,
             own[0] - extent[0]: own[1] - extent[0] + 1] = _orientedImageArray(labelmap) > 0
        return full

    @staticmethod
    def _setSegment(segmentationNode, segmentId: str, labelmap) -> None:
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if labelmap is None:
            ok = logic.ClearSegment(segmentationNode, segmentId)
        else:
            ok = logic.SetBinaryLabelmapToSegment(labelmap, segmentationNode, segmentId, logic.MODE_REPLACE)
        if not ok:
            raise RuntimeError(f"Slicer could not write segment {segmentId!r} of {segmentationNode.GetName()!r}")

    def _writeSegment(self, segmentationNode, segmentId: str, labelmap, shown: _Shown) -> None:
        """Replace one segment's voxels (made as ``shown`` says), keeping the previous ones for undo;
        restore them on failure."""
        key = (segmentationNode.GetID(), segmentId)
        previous = self.segmentLabelmap(segmentationNode, segmentId)
        try:
            self._setSegment(segmentationNode, segmentId, labelmap)
        except Exception:
            self._setSegment(segmentationNode, segmentId, previous)
            raise
        stack = self._undo.setdefault(key, [])
        stack.append(_UndoEntry(previous, self._shown.get(key, _Shown())))
        self._shown[key] = shown
        if len(stack) > self.maxUndo:
            del stack[1]  # keep the state before the first FastSAM3D edit: reset() returns to it

    def canUndo(self, segmentationNode, segmentId: str) -> bool:
        return bool(self._undo.get((segmentationNode.GetID(), segmentId)))

    def undo(self, segmentationNode, segmentId: str) -> bool:
        """Restore the segment's labelmap from before the last FastSAM3D write; False if there is none.

        The segment's prompts go back with it: the uncertainty is then that of the restored result,
        and the next click refines it (back to an earlier prompt of the same object through the
        session's own exact undo; otherwise the next request replays the prompts). The session is
        brought back by the next request, on the worker: this returns at once even while a prediction runs.
        """
        key = (segmentationNode.GetID(), segmentId)
        stack = self._undo.get(key)
        if not stack:
            return False
        entry = stack.pop()
        self._setSegment(segmentationNode, segmentId, entry.labelmap)
        self._shown[key] = entry.shown
        self._epochs[key] = self._epochs.get(key, 0) + 1
        for volumeNodeID, state in self._volumes.items():
            if key in state.objects or key in state.rewinds:
                # Another volume's object for this segment did not make what it shows now: it starts afresh.
                ours = volumeNodeID == entry.shown.volumeNodeID
                state.rewinds[key] = (list(entry.shown.prompts), entry.shown.candidate) if ours else ([], None)
        return True

    def _forgetPrompts(self, segmentationNode, segmentId: str) -> None:
        """The segment's next request starts afresh (its session object is reset then, on the worker:
        the GUI thread does not wait for a running prediction); results still in flight are dropped."""
        key = (segmentationNode.GetID(), segmentId)
        self._epochs[key] = self._epochs.get(key, 0) + 1
        for state in self._volumes.values():
            if key in state.objects or key in state.rewinds:
                state.rewinds[key] = ([], None)

    def reset(self, segmentationNode, segmentId: str) -> bool:
        """Drop the segment's prompts and restore it to before the first FastSAM3D edit since ``accept``."""
        self._forgetPrompts(segmentationNode, segmentId)
        self._shown.pop((segmentationNode.GetID(), segmentId), None)
        stack = self._undo.pop((segmentationNode.GetID(), segmentId), None)
        if not stack:
            return False
        self._setSegment(segmentationNode, segmentId, stack[0].labelmap)
        return True

    def accept(self, segmentationNode, segmentId: str) -> None:
        """Keep the segment as it is: forget its prompts and undo history (the next click starts afresh)."""
        self._forgetPrompts(segmentationNode, segmentId)
        self._shown.pop((segmentationNode.GetID(), segmentId), None)
        self._undo.pop((segmentationNode.GetID(), segmentId), None)

    # -- uncertainty -------------------------------------------------------------------------------

    def prepareUncertainty(self, volumeNode, segmentationNode, segmentId: str, samples: int = 16, method: str = "mc-dropout"):
        """A request for the uncertainty of the segment's current prompts (it must have been segmented)."""
        errors = _errors()
        if volumeNode is None:
            raise errors.ImageError("no input volume chosen")
        self._checkSegment(segmentationNode, segmentId)
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
            raise errors.FastSAM3DInputError(f"samples must be a whole number of at least 2 stochastic decodes, got {samples!r}")
        state = self._volumeState(volumeNode)
        key = (segmentationNode.GetID(), segmentId)
        # The uncertainty of the result the segment shows: the prompts that made it on this volume.
        shown = self._shown.get(key)
        ours = shown is not None and shown.volumeNodeID == volumeNode.GetID()
        prompts, candidate = (list(shown.prompts), shown.candidate) if ours else ([], None)
        if not prompts:
            raise errors.PromptError(
                f"segment {segmentId!r} has no FastSAM3D prompts on volume {volumeNode.GetName()!r}: click in it first"
            )
        request = UncertaintyRequest(volumeNode.GetScene(), state, key, prompts, volumeNode.GetID(), samples, method, candidate)
        self._stampRequest(request)
        return request

    def applyUncertainty(self, request: UncertaintyRequest, result, outputVolumeNode=None):
        """Write the uncertainty image into a colour-mapped scalar volume on the input volume's grid."""
        scene = request.scene
        volumeNode = scene.GetNodeByID(request.volumeNodeID)
        _, uncertainty = result
        array = sitk.GetArrayFromImage(uncertainty).astype(np.float32)
        if outputVolumeNode is None:
            segment = scene.GetNodeByID(request.segmentationNodeID).GetSegmentation().GetSegment(request.segmentID)
            outputVolumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{segment.GetName()} uncertainty (FastSAM3D)")
        imageData = vtk.vtkImageData()
        extent = volumeNode.GetImageData().GetExtent()
        imageData.SetExtent(extent)
        imageData.AllocateScalars(vtk.VTK_FLOAT, 1)
        numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())[:] = array.ravel()
        outputVolumeNode.SetIJKToRASMatrix(self._ijkToRasMatrix(volumeNode))
        outputVolumeNode.SetAndObserveImageData(imageData)
        outputVolumeNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        self._styleUncertainty(outputVolumeNode, float(array.max()) if array.size else 1.0)
        return outputVolumeNode

    def computeUncertainty(self, volumeNode, segmentationNode, segmentId: str, outputVolumeNode=None,
                           samples: int = 16, method: str = "mc-dropout"):
        """Uncertainty of the segment's current prediction as a colour overlay volume (created if None)."""
        request = self.prepareUncertainty(volumeNode, segmentationNode, segmentId, samples, method)
        return self.applyUncertainty(request, request.run(), outputVolumeNode)

    @staticmethod
    def uncertaintyColorNode(scene):
        """A perceptually ordered dark-to-bright colour table (Slicer's Inferno if the scene has it)."""
        for nodeId in ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileInferno"):
            node = scene.GetNodeByID(nodeId)
            if node is not None:
                return node
        name = "FastSAM3D uncertainty"
        existing = scene.GetFirstNodeByName(name)
        if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
            return existing
        table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        table.SetTypeToUser()
        table.SetNumberOfColors(256)
        anchors = np.array([[0.0, 0.0, 0.02], [0.34, 0.06, 0.43], [0.73, 0.21, 0.33], [0.98, 0.55, 0.04], [0.99, 1.0, 0.64]])
        positions = np.linspace(0, 1, len(anchors))
        for n in range(256):
            t = n / 255.0
            rgb = [float(np.interp(t, positions, anchors[:, c])) for c in range(3)]
            table.SetColor(n, f"{n}", *rgb, 1.0)
        table.SetAttribute("Category", "FastSAM3D")
        return table

    def _styleUncertainty(self, volumeNode, maximum: float) -> None:
        if volumeNode.GetDisplayNode() is None:
            volumeNode.CreateDefaultDisplayNodes()
        display = volumeNode.GetDisplayNode()
        if display is None:
            return
        display.SetAndObserveColorNodeID(self.uncertaintyColorNode(volumeNode.GetScene()).GetID())
        display.AutoWindowLevelOff()
        top = maximum if maximum > 0 else 1.0
        display.SetWindowLevelMinMax(0.0, top)
        display.SetLowerThreshold(0.02 * top)
        display.SetUpperThreshold(top)
        display.ApplyThresholdOn()

    # -- Segment Editor ----------------------------------------------------------------------------

    def applyMaskThroughSegmentEditor(self, scriptedEffect, sourceVolumeNode, mask: RegionMask, modificationModeSet,
                                      base=None) -> bool:
        """Write a mask through the Segment Editor so that its masking, overwrite rules and undo apply.

        Order (as Slicer's own effects do): check the segment is visible -> ``saveStateForUndo()`` ->
        fill ``defaultModifierLabelmap()`` -> ``modifySelectedSegmentByLabelmap(modifier, Set)``. The
        mask is carried onto the editor's geometry before anything is saved, so a failure leaves the
        segmentation and the undo stack as they were. ``base`` (a labelmap from :meth:`segmentLabelmap`,
        or None) is kept under the mask: the voxels the segment had before the current object.
        Returns False if the user declined.
        """
        parameterSetNode = scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        self._checkSegment(segmentationNode, parameterSetNode.GetSelectedSegmentID())
        self._checkMaskFits(mask, sourceVolumeNode)
        labelmap = self.maskToSegmentLabelmap(mask.array, sourceVolumeNode, segmentationNode, mask.start)
        return self._setThroughSegmentEditor(scriptedEffect, [labelmap, base], modificationModeSet)

    def restoreThroughSegmentEditor(self, scriptedEffect, labelmap, modificationModeSet) -> bool:
        """Set the selected segment to ``labelmap`` (from :meth:`segmentLabelmap`; None: empty) through the
        Segment Editor, its masking and undo applying; False if the user declined."""
        parameterSetNode = scriptedEffect.parameterSetNode()
        self._checkSegment(parameterSetNode.GetSegmentationNode(), parameterSetNode.GetSelectedSegmentID())
        return self._setThroughSegmentEditor(scriptedEffect, [labelmap], modificationModeSet)

    def _setThroughSegmentEditor(self, scriptedEffect, labelmaps, modificationModeSet) -> bool:
        """Write the union of ``labelmaps`` (None entries skipped) as the selected segment, as Slicer's effects do."""
        if not scriptedEffect.confirmCurrentSegmentVisible():
            return False
        scriptedEffect.saveStateForUndo()
        modifier = scriptedEffect.defaultModifierLabelmap()
        self.fillModifierLabelmap(modifier, labelmaps[0])
        for labelmap in labelmaps[1:]:
            if labelmap is not None:
                self.fillModifierLabelmap(modifier, labelmap, keep=True)
        scriptedEffect.modifySelectedSegmentByLabelmap(modifier, modificationModeSet)
        return True

    @staticmethod
    def fillModifierLabelmap(modifier, labelmap, keep: bool = False) -> None:
        """Set the editor's modifier labelmap (its full extent) to ``labelmap`` (same frame), 1 inside;
        with ``keep``, add ``labelmap`` to what the modifier holds instead."""
        if modifier.GetPointData().GetScalars() is None or modifier.GetScalarType() != vtk.VTK_UNSIGNED_CHAR:
            modifier.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            keep = False
        target = _orientedImageArray(modifier)
        if not keep:
            target[...] = 0
        if labelmap is None:
            modifier.Modified()
            return
        if not np.allclose(_imageToWorld(labelmap), _imageToWorld(modifier), atol=1e-6):
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, modifier, resampled)
            labelmap = resampled
        labelmap = _cropToExtent(labelmap, modifier.GetExtent())
        if labelmap is not None:
            own, ext = labelmap.GetExtent(), modifier.GetExtent()
            window = target[own[4] - ext[4]: own[5] - ext[4] + 1, own[2] - ext[2]: own[3] - ext[2] + 1,
                            own[0] - ext[0]: own[1] - ext[0] + 1]
            window |= (_orientedImageArray(labelmap) > 0).astype(window.dtype)
        modifier.Modified()

    # -- prompts from markups (GUI and effect) -------------------------------------------------------

    @staticmethod
    def pointsFromMarkups(positiveNode, negativeNode) -> Tuple[np.ndarray, List[int]]:
        """World RAS positions of the defined control points: positives first, then negatives.

        Within each node the points keep their order, so adding a point appends to the prompt list
        (and costs only a decode) while moving or deleting one restarts the segment's prompts.
        """
        points: List[Tuple[float, float, float]] = []
        labels: List[int] = []
        for node, label in ((positiveNode, 1), (negativeNode, 0)):
            if node is None:
                continue
            for n in range(node.GetNumberOfControlPoints()):
                if hasattr(node, "GetNthControlPointPositionStatus") and \
                        node.GetNthControlPointPositionStatus(n) != node.PositionDefined:
                    continue
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(n, position)
                points.append(tuple(position))
                labels.append(label)
        return np.asarray(points, dtype=np.float64).reshape(-1, 3), labels

    @staticmethod
    def createPromptNodes(scene, baseName: str = "FastSAM3D"):
        """Two point-list nodes for include (green) and exclude (red) clicks."""
        nodes = []
        for suffix, color in (("include", POSITIVE_COLOR), ("exclude", NEGATIVE_COLOR)):
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{baseName} {suffix}")
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if display is not None:
                display.SetSelectedColor(*color)
                display.SetColor(*color)
                display.SetActiveColor(*color)
                display.SetTextScale(0.0)
            node.SetMarkupLabelFormat("+%d" if suffix == "include" else "-%d")
            nodes.append(node)
        return nodes[0], nodes[1]



_shared: Optional[FastSAM3DLogic] = None


def sharedLogic() -> FastSAM3DLogic:
    """The logic shared by the module panel and the Segment Editor effect (one model in memory)."""
    global _shared
    if _shared is None:
        _shared = FastSAM3DLogic()
    return _shared
