"""The module widget and the Segment Editor effect, driven on real MRML with the Qt application faked.

MOCKS OF THE SLICER GUI APPLICATION (only what cannot exist without it):

* ``qt``: a timer that the test fires by hand, and inert stand-ins for labels, buttons, icons and
  cursors.
* ``slicer.ScriptedLoadableModule``: minimal module/widget/logic/test base classes (the real
  ``getParameterNode`` stores a ``vtkMRMLScriptedModuleNode`` in ``slicer.mrmlScene``; so does this one).
* ``slicer.app``, ``slicer.util.loadUI`` / ``childWidgetVariables`` / ``setSliceViewerLayers``: the UI is
  built from ``Resources/UI/FastSAM3D.ui`` as plain Python objects named like its widgets (a widget the
  code uses that the .ui lacks fails here too), which hold node selections and emit the signals the
  code connects to.
* ``SegmentEditorEffects.AbstractScriptedSegmentEditorEffect`` and the ``scriptedEffect`` wrapper: the
  wrapper forwards to Slicer's real C++ ``vtkSlicerSegmentEditorLogic``, so masking and undo are real.

Real: the MRML scene, nodes, markups events, transforms, segmentations, ``slicer.util.VTKObservationMixin``
and ``NodeModify``, the logic and its worker thread. The engine is the ball stand-in of
``test_slicer_logic.py`` (geometry known exactly); the real engine is exercised there.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402
from oracles import region_of  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "FastSAM3D"
RADIUS = 4.0


class Ball:
    """Engine stand-in: a ball of RADIUS mm around each include click, minus balls around excludes.

    A lone include click offers three candidates, balls of CANDIDATE_RADII, rated so that the
    RADIUS one is the pick; after a choice every ball has the chosen radius.
    """

    CANDIDATE_RADII = (RADIUS / 2, RADIUS, 2 * RADIUS)
    CANDIDATE_IOUS = [0.5, 0.9, 0.7]

    def __init__(self, model=None):
        self.progress = {"stage": "ready", "fraction": 1.0}
        self.last_timings = {"total_s": 0.0}
        self.chosen = {}

    def set_image(self, image, wait=False, name=None):
        self.image, self.objects, self.next = image, {0: []}, 1

    def new_object(self):
        self.next += 1
        self.objects[self.next - 1] = []
        return self.next - 1

    def reset(self, object=0):
        self.objects[object] = []
        self.chosen.pop(object, None)

    def undo(self, object=0):
        return bool(self.objects[object]) and self.objects[object].pop() is not None

    def candidates(self, object=0):
        prompts = self.objects[object]
        if len(prompts) == 1 and len(prompts[0]) == 2 and prompts[0][1]:
            return list(self.CANDIDATE_IOUS), self.chosen.get(object)
        return [], None

    def choose_candidate(self, index, object=0):
        from FastSAM3DLib.errors import PromptError

        if not self.candidates(object)[0]:
            raise PromptError("there are no candidate masks to choose from")
        self.chosen[object] = index

    def add_point(self, point, positive=True, object=0):
        self.objects[object].append((np.asarray(point, float), positive))

    def add_box(self, corner1, corner2, object=0):
        """A box (LPS corners) clips the mask to itself and, alone, fills it."""
        corners = np.array([corner1, corner2], float)
        self.objects[object].append((corners.min(0), corners.max(0), "box"))

    def predict(self, object=0):
        image = self.image
        size = image.GetSize()
        index = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3)
        physical = np.array([image.TransformIndexToPhysicalPoint(tuple(int(v) for v in i)) for i in index])
        mask = np.zeros(len(index), np.uint8)
        chosen = self.chosen.get(object)
        radius = RADIUS if chosen is None else self.CANDIDATE_RADII[chosen]  # later clicks keep the chosen size
        boxes = [(low, high) for low, high, *box in self.objects[object] if box]
        for low, high in boxes[-1:]:
            mask[np.all((physical >= low) & (physical <= high), axis=1)] = 1
        for point, positive, *box in self.objects[object]:
            if not box:
                mask[np.linalg.norm(physical - point, axis=1) <= radius] = 1 if positive else 0
        for low, high in boxes[-1:]:
            mask[~np.all((physical >= low) & (physical <= high), axis=1)] = 0
        out = sitk.GetImageFromArray(mask.reshape(size).transpose(2, 1, 0).copy())
        out.CopyInformation(image)
        return out

    def predict_region(self, object=0):
        return region_of(self.predict(object))

    def uncertainty(self, n=16, method="mc-dropout", object=0):
        mask = sitk.Cast(self.predict(object), sitk.sitkFloat32)
        return mask, mask * 0.25


# ------------------------------------------------------------------------------------------------
# Fakes of the application (see the module docstring)
# ------------------------------------------------------------------------------------------------


class Anything:
    """Inert Qt object: any attribute or call gives another inert object."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return Anything()

    def __call__(self, *args, **kwargs):
        return Anything()


class FakeTimer(Anything):
    def __init__(self, *args):
        self.active, self.slots = False, []

    def setInterval(self, ms):
        pass

    def connect(self, signal, slot):
        self.slots.append(slot)

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def fire(self):
        for slot in self.slots:
            slot()


class FakeWidget:
    """A .ui widget: remembers nodes/values and emits the signals the code connects to."""

    def __init__(self, name, cls):
        self.__dict__.update(name=name, cls=cls, slots={}, _node=None, _segment="", _items=[], _index=-1,
                             checked=False, value=0, currentPath="", enabled=True, visible=True, text="")

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        for slot in self.slots.get(signal, []):
            slot(*args)

    def setMRMLScene(self, scene):
        pass

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def currentNode(self):
        return self._node

    @property
    def currentNodeID(self):
        return self._node.GetID() if self._node is not None else None

    def setCurrentSegmentID(self, segmentId):
        if segmentId != self._segment:
            self._segment = segmentId
            self.emit("currentSegmentChanged(QString)", segmentId)

    def currentSegmentID(self):
        return self._segment

    def addItem(self, title, data):
        self._items.append(data)
        self._index = max(self._index, 0)

    def findData(self, data):
        return self._items.index(data) if data in self._items else -1

    def setCurrentIndex(self, index):
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged(int)", index)

    @property
    def currentData(self):
        return self._items[self._index] if 0 <= self._index < len(self._items) else None

    def __getattr__(self, name):  # placeButton(), setFormat(), setPlaceModeEnabled(), ...
        return Anything()


def fake_ui(path):
    root = ET.parse(path).getroot()
    return {w.get("name"): FakeWidget(w.get("name"), w.get("class")) for w in root.iter("widget")}


@pytest.fixture()
def app(monkeypatch):
    """Install the fakes, a real MRML scene as slicer.mrmlScene, and fresh copies of our modules."""
    import FastSAM3DLib.errors  # noqa: F401  (real engine errors; the engine itself is the Ball)

    scene = slicer.vtkMRMLScene()
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    for name in ("QIcon", "QCursor", "QLabel", "QProgressBar", "QCheckBox", "QPushButton", "QHBoxLayout"):
        setattr(qt, name, Anything)
    qt.Qt = Anything()
    qt.QApplication = Anything()
    monkeypatch.setitem(sys.modules, "qt", qt)

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.moduleName = type(self).__name__[: -len("Widget")]

        def setup(self):
            self.layout = Anything()

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Logic")]

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
                node.SetSingletonTag(self.moduleName)
            return node

    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = object
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)

    abstract = types.ModuleType("SegmentEditorEffects")

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

        def xyToRas(self, xy, viewWidget):
            return viewWidget.xyToRas(xy)

    abstract.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    monkeypatch.setitem(sys.modules, "SegmentEditorEffects", abstract)

    layers = []
    fake_app = Anything()
    fake_app.testingEnabled = lambda: True
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", fake_app, raising=False)
    monkeypatch.setattr(slicer, "qSlicerMarkupsPlaceWidget", types.SimpleNamespace(ForcePlaceMultipleMarkups=2), raising=False)
    monkeypatch.setattr(slicer, "qSlicerSegmentEditorAbstractEffect",
                        types.SimpleNamespace(ModificationModeSet=slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet), raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: types.SimpleNamespace(path=path, setMRMLScene=lambda s: None))
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda ui: types.SimpleNamespace(**fake_ui(ui.path)))
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: layers.append(kw))
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    for name in ("FastSAM3DLogic", "FastSAM3D", "SegmentEditorFastSAM3DLib", "SegmentEditorFastSAM3DLib.SegmentEditorEffect"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    logic_module = importlib.import_module("FastSAM3DLogic")
    logic_module.ensureSegmentationConverterRules()
    module = importlib.import_module("FastSAM3D")
    logic = logic_module.sharedLogic()
    logic.setModel(object())
    logic.sessionFactory = Ball
    yield types.SimpleNamespace(scene=scene, module=module, logic=logic, layers=layers, logicModule=logic_module)
    for name in ("FastSAM3DLogic", "FastSAM3D", "SegmentEditorFastSAM3DLib.SegmentEditorEffect"):
        sys.modules.pop(name, None)


def small_scene(scene):
    """A 24^3 volume (1.5 mm, oblique-free) under a translation, and a segmentation with two segments."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "small")
    data = vtk.vtkImageData()
    data.SetDimensions(24, 24, 24)
    data.AllocateScalars(vtk.VTK_SHORT, 1)
    data.GetPointData().GetScalars().Fill(100)
    volume.SetAndObserveImageData(data)
    volume.SetSpacing(1.5, 1.5, 1.5)
    volume.SetOrigin(-18, -18, -18)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 7.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    target = segmentation.GetSegmentation().AddEmptySegment("target")
    other = segmentation.GetSegmentation().AddEmptySegment("other")
    return volume, segmentation, target, other


def drain(queue, fire, seconds=30):
    deadline = time.time() + seconds
    fire()
    while queue.busy:
        assert time.time() < deadline, "the worker did not finish"
        time.sleep(0.01)
        fire()


def test_widget_live_update_undo_reset_uncertainty_and_scene_close(app):
    volume, segmentation, target, other = small_scene(app.scene)
    parent = types.SimpleNamespace(isEntered=True)
    widget = app.module.FastSAM3DWidget(parent)
    widget.setup()
    node = widget._parameterNode
    assert widget._reference("InputVolume") is volume  # the first volume is chosen for the user
    include, exclude = widget._reference("PositivePoints"), widget._reference("NegativePoints")
    assert include is not None and exclude is not None and include is not exclude

    widget.ui.segmentSelector.setCurrentNode(segmentation)
    widget.ui.segmentSelector.setCurrentSegmentID(target)
    assert app.logic.getParameter(node, "SegmentID") == target
    assert node.GetNodeReference("FastSAM3D.Segmentation") is segmentation

    # A placed include point (world RAS; the volume is shifted 7 mm right) updates the segment.
    include.AddControlPoint(7.0, 0.0, 0.0)
    assert widget.queue.busy
    drain(widget.queue, widget.timer.fire)
    first = app.logic.segmentArray(segmentation, target)
    assert first.sum() > 0 and app.logic.segmentArray(segmentation, other).sum() == 0
    assert widget.ui.undoButton.enabled

    # Moving the point re-segments around the new position.
    include.SetNthControlPointPositionWorld(0, 10.0, 0.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    moved = app.logic.segmentArray(segmentation, target)
    assert moved.sum() > 0 and not np.array_equal(moved, first)

    # An exclude point carves the ball.
    exclude.AddControlPoint(10.0, 3.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    carved = app.logic.segmentArray(segmentation, target)
    assert 0 < carved.sum() < moved.sum()

    # Undo restores the previous result exactly and removes the point that made this one.
    widget.onUndo()
    assert np.array_equal(app.logic.segmentArray(segmentation, target), moved)
    assert exclude.GetNumberOfControlPoints() == 0 and not widget.queue.busy

    # An event that leaves the prompts as they were queues nothing.
    include.SetNthControlPointPositionWorld(0, 10.0, 0.0, 0.0)
    assert not widget.queue.busy

    # Deleting the last point returns the segment to how it was before the first click.
    include.RemoveAllControlPoints()
    assert app.logic.segmentArray(segmentation, target).sum() == 0 and not widget.queue.busy

    # Uncertainty: shown as a foreground overlay after each update.
    widget.ui.showUncertaintyCheckBox.checked = True
    widget.updateParameterNodeFromGUI()
    include.AddControlPoint(4.0, -6.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    drain(widget.queue, widget.timer.fire)
    overlay = node.GetNodeReference("FastSAM3D.Uncertainty")
    assert overlay is not None and app.layers and app.layers[-1]["foreground"] is overlay
    assert overlay.GetTransformNodeID() == volume.GetTransformNodeID()

    # Reset: all points gone, the segment as before the first click.
    widget.onReset()
    assert app.logic.segmentArray(segmentation, target).sum() == 0
    assert include.GetNumberOfControlPoints() == 0 and not widget.queue.busy

    # Errors are shown, nothing is queued: a point outside the volume.
    include.AddControlPoint(500.0, 0.0, 0.0)
    assert not widget.queue.busy and "outside volume" in widget.ui.statusLabel.text
    include.RemoveAllControlPoints()

    # Live update off: points do not trigger work until "Segment" is pressed.
    widget.ui.liveUpdateCheckBox.checked = False
    widget.updateParameterNodeFromGUI()
    include.AddControlPoint(7.0, 0.0, 0.0)
    assert not widget.queue.busy
    widget.onSegmentButton()
    drain(widget.queue, widget.timer.fire)
    assert app.logic.segmentArray(segmentation, target).sum() > 0
    widget.onAccept()
    assert not app.logic.canUndo(segmentation, target) and include.GetNumberOfControlPoints() == 0

    # Choosing another device drops the model; without bundled weights the next click explains why.
    widget.ui.deviceComboBox.setCurrentIndex(widget.ui.deviceComboBox.findData("cpu"))
    assert app.logic._model is None and app.logic.getParameter(node, "Device") == "cpu"
    from FastSAM3DLib import bundled_model_path

    if bundled_model_path() is None:
        widget.ui.liveUpdateCheckBox.checked = True
        widget.updateParameterNodeFromGUI()
        include.AddControlPoint(7.0, 0.0, 0.0)
        assert not widget.queue.busy and "no bundled model weights yet" in widget.ui.statusLabel.text
        assert "Local checkpoint" in widget.ui.statusLabel.text  # said in the module's terms (found by review)

    # Closing the scene drops sessions; the (singleton, reset) parameter node gets defaults and new prompt nodes.
    app.scene.Clear(0)
    assert app.logic._volumes == {}
    assert widget._parameterNode is not None
    assert app.logic.getParameter(widget._parameterNode, "LiveUpdate") is True  # back to the default
    newInclude = widget._reference("PositivePoints")
    assert newInclude is not None and app.scene.IsNodePresent(newInclude) and newInclude is not include
    assert widget._reference("InputVolume") is None
    widget.exit()
    widget.cleanup()


class FakeScriptedEffect:
    """The qSlicerSegmentEditorScriptedEffect wrapper, forwarding to the real vtkSlicerSegmentEditorLogic."""

    def __init__(self, scene, segmentation, volume, segmentId):
        self.node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.node.SetAndObserveSegmentationNode(segmentation)
        self.node.SetAndObserveSourceVolumeNode(volume)
        self.node.SetSelectedSegmentID(segmentId)
        self.editor = slicer.vtkSlicerSegmentEditorLogic()
        self.editor.SetMRMLScene(scene)
        self.editor.SetSegmentEditorNode(self.node)
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetSegmentation(segmentation.GetSegmentation())
        self.editor.SetSegmentationHistory(self.history)
        self.parameters = {}

    def parameterSetNode(self):
        return self.node

    def setParameterDefault(self, name, value):
        self.parameters.setdefault(name, value)

    def setParameter(self, name, value):
        self.parameters[name] = value

    def integerParameter(self, name):
        return int(self.parameters.get(name, 0))

    def addOptionsWidget(self, widget):
        pass

    def confirmCurrentSegmentVisible(self):
        return self.editor.IsSelectedSegmentVisible()

    def saveStateForUndo(self):
        self.editor.SaveStateForUndo()

    def defaultModifierLabelmap(self):
        self.editor.ResetModifierLabelmapToDefault()
        return self.editor.GetModifierLabelmap()

    def modifySelectedSegmentByLabelmap(self, modifier, mode):
        self.editor.ModifySegmentByLabelmap(self.node.GetSegmentationNode(), self.node.GetSelectedSegmentID(),
                                            modifier, mode, True, False)


class FakeInteractor:
    def __init__(self, xy, control=False, shift=False):
        self.xy, self.control, self.shift = xy, control, shift

    def GetEventPosition(self):
        return self.xy

    def GetControlKey(self):
        return self.control

    def GetShiftKey(self):
        return self.shift

    def GetAltKey(self):
        return False


class FakeSliceWidget:
    """A slice view whose display (x, y) maps to world RAS (x, y, 0) mm."""

    def className(self):
        return "qMRMLSliceWidget"

    def xyToRas(self, xy):
        return (float(xy[0]), float(xy[1]), 0.0)


def test_other_candidate_button_steps_through_candidates_and_undo_takes_each_step_back(app):
    widget, volume, segmentation, target, other = _widget(app)
    include = widget._reference("PositivePoints")
    assert not widget.ui.candidateButton.enabled  # nothing segmented yet

    include.AddControlPoint(7.0, 0.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    picked = app.logic.segmentArray(segmentation, target)
    assert widget.ui.candidateButton.enabled and "candidate 2 of 3" in widget.ui.statusLabel.text

    widget.onCandidateButton()  # the pick is the middle ball: next is the large one
    drain(widget.queue, widget.timer.fire)
    large = app.logic.segmentArray(segmentation, target)
    assert large.sum() > picked.sum() and "candidate 3 of 3" in widget.ui.statusLabel.text
    widget.onCandidateButton()  # wraps round to the small one
    drain(widget.queue, widget.timer.fire)
    small = app.logic.segmentArray(segmentation, target)
    assert 0 < small.sum() < picked.sum() and app.logic.segmentArray(segmentation, other).sum() == 0

    widget.onUndo()
    assert np.array_equal(app.logic.segmentArray(segmentation, target), large)
    widget.onUndo()
    assert np.array_equal(app.logic.segmentArray(segmentation, target), picked)
    assert include.GetNumberOfControlPoints() == 1  # undoing a choice keeps the click
    assert app.logic.getParameter(widget._parameterNode, "Candidate") == -1

    # The next click refines the candidate shown; another segment starts from the model's pick.
    widget.onCandidateButton()
    drain(widget.queue, widget.timer.fire)
    include.AddControlPoint(10.0, 0.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    assert not widget.ui.candidateButton.enabled  # two clicks: nothing to choose
    assert app.logic.segmentArray(segmentation, target).sum() > large.sum()
    widget.ui.segmentSelector.setCurrentSegmentID(other)
    assert app.logic.getParameter(widget._parameterNode, "Candidate") == -1
    widget.exit()
    widget.cleanup()


def test_segment_editor_effect_clicks_masking_and_undo(app):
    volume, segmentation, target, other = small_scene(app.scene)
    wrapper = FakeScriptedEffect(app.scene, segmentation, volume, target)
    effectModule = importlib.import_module("SegmentEditorFastSAM3DLib.SegmentEditorEffect")
    effect = effectModule.SegmentEditorEffect(wrapper)
    effect.setupOptionsFrame()
    effect.setMRMLDefaults()
    effect.updateGUIFromMRML()
    effect.activate()
    view = FakeSliceWidget()
    vtkEvent = vtk.vtkCommand

    # Only used events are consumed: mouse moves and shift-clicks pass through.
    assert effect.processInteractionEvents(FakeInteractor((7, 0)), vtkEvent.MouseMoveEvent, view) is False
    assert effect.processInteractionEvents(FakeInteractor((7, 0), shift=True), vtkEvent.LeftButtonPressEvent, view) is False
    assert effect.processInteractionEvents(FakeInteractor((7, 0)), vtkEvent.LeftButtonPressEvent, view) is True
    drain(effect.queue, effect.timer.fire)
    ball = app.logic.segmentArray(segmentation, target)
    assert ball.sum() > 0
    assert effect.clickNodes is not None and effect.clickNodes[0].GetNumberOfControlPoints() == 1

    # A lone click's other candidate (the stand-in's large ball), written through the editor and undone by it.
    assert effect.candidateButton.enabled and "Candidate 2 of 3" in effect.statusLabel.text
    effect.onOtherCandidate()
    drain(effect.queue, effect.timer.fire)
    assert app.logic.segmentArray(segmentation, target).sum() > ball.sum() and "Candidate 3 of 3" in effect.statusLabel.text
    wrapper.editor.Undo()
    assert np.array_equal(app.logic.segmentArray(segmentation, target), ball)
    # The effect follows the editor's Undo back to the model's pick: the next step is the large one again.
    effect.onOtherCandidate()
    drain(effect.queue, effect.timer.fire)
    assert app.logic.segmentArray(segmentation, target).sum() > ball.sum() and "Candidate 3 of 3" in effect.statusLabel.text
    wrapper.editor.Undo()
    assert np.array_equal(app.logic.segmentArray(segmentation, target), ball)

    # Ctrl+click excludes.
    assert effect.processInteractionEvents(FakeInteractor((7, 3), control=True), vtkEvent.LeftButtonPressEvent, view)
    drain(effect.queue, effect.timer.fire)
    carved = app.logic.segmentArray(segmentation, target)
    assert 0 < carved.sum() < ball.sum()

    # The editor's masking applies: only outside 'other' may be edited.
    blocker = sitk.GetArrayFromImage(_ball_at(volume, (9, -3, 0)).predict())
    app.logic._setSegment(segmentation, other, app.logic.maskToSegmentLabelmap(blocker, volume, segmentation))
    otherVoxels = app.logic.segmentArray(segmentation, other)
    wrapper.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    wrapper.node.SetOverwriteMode(wrapper.node.OverwriteNone)  # "overwrite other segments: none"
    effect.processInteractionEvents(FakeInteractor((7, 0)), vtkEvent.LeftButtonPressEvent, view)
    drain(effect.queue, effect.timer.fire)
    masked = app.logic.segmentArray(segmentation, target)
    locked = otherVoxels > 0  # not editable: the target keeps what it had there before the click
    assert locked.any() and (carved[locked] > 0).any()
    assert np.array_equal(masked[locked], carved[locked])
    assert masked[~locked].sum() > 0
    assert np.array_equal(app.logic.segmentArray(segmentation, other), otherVoxels)

    # The editor's undo restores the previous state exactly.
    wrapper.editor.Undo()
    assert np.array_equal(app.logic.segmentArray(segmentation, target), carved)

    # A click outside the volume is explained and changes nothing; the effect has followed the Undo.
    effect.processInteractionEvents(FakeInteractor((400, 0)), vtkEvent.LeftButtonPressEvent, view)
    assert not effect.queue.busy and "outside volume" in effect.statusLabel.text
    assert np.array_equal(app.logic.segmentArray(segmentation, target), carved)
    assert [c[1] for c in effect.clicks] == [True, False]
    wrapper.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    # Overlap allowed from here on, so the expected masks are exact and "other" stays as it is.
    assert wrapper.node.GetOverwriteMode() == wrapper.node.OverwriteNone

    def click(xy, positive=True):
        effect.processInteractionEvents(FakeInteractor(xy, control=not positive), vtkEvent.LeftButtonPressEvent, view)
        drain(effect.queue, effect.timer.fire)
        return app.logic.segmentArray(segmentation, target)

    def balls(*clicks):
        return _balls(volume, [((x, y, 0.0), positive) for x, y, positive in clicks])

    # A click taken back by the editor's Undo is gone from the clicks: the next click re-segments without it.
    first, exclude = (7, 0, True), (7, 3, False)
    assert np.array_equal(carved, balls(first, exclude))
    with_c = click((-5, 0))
    assert np.array_equal(with_c, balls(first, exclude, (-5, 0, True)))
    wrapper.editor.Undo()
    effect._followSegment()  # what every action of the effect does first
    assert len(effect.clicks) == 2 and "back to 2 click(s)" in effect.statusLabel.text
    wrapper.editor.Redo()  # ... and Redo brings the click back
    effect._followSegment()
    assert len(effect.clicks) == 3
    wrapper.editor.Undo()
    with_d = click((15, 8))
    assert np.array_equal(with_d, balls(first, exclude, (15, 8, True)))

    # Voxels painted by another tool stay; the next click starts a new object on top of them.
    painted = with_d.copy()
    painted[2:5, 2:5, 2:5] = 1
    app.logic._setSegment(segmentation, target, app.logic.maskToSegmentLabelmap(painted, volume, segmentation))
    effect._followSegment()
    assert effect.clicks == [] and "another tool" in effect.statusLabel.text
    with_e = click((0, -10))
    assert len(effect.clicks) == 1
    assert np.array_equal(with_e, painted | balls((0, -10, True)))
    # A second click on the new object reshapes it only: the painted voxels and the first object stay.
    with_e2 = click((0, -12), positive=False)
    assert np.array_equal(with_e2, painted | balls((0, -10, True), (0, -12, False)))

    # "New object": the segment is kept as it is and the next click adds another object.
    effect.onNewObject()
    with_f = click((-5, 10))
    assert np.array_equal(with_f, with_e2 | balls((-5, 10, True))) and len(effect.clicks) == 1
    assert np.array_equal(app.logic.segmentArray(segmentation, other), otherVoxels)

    # "Remove last click" on an object's only click puts back what the segment held before the object,
    # also while that click's result is still on its way (it is dropped, not written).
    effect.onRemoveLastClick()
    assert np.array_equal(app.logic.segmentArray(segmentation, target), with_e2) and effect.clicks == []
    assert np.array_equal(click((-5, 10)), with_f)
    effect.onNewObject()
    effect.processInteractionEvents(FakeInteractor((15, -8)), vtkEvent.LeftButtonPressEvent, view)
    assert effect.queue.busy
    effect.onRemoveLastClick()
    drain(effect.queue, effect.timer.fire)
    assert np.array_equal(app.logic.segmentArray(segmentation, target), with_f) and effect.clicks == []
    effect.deactivate()
    assert effect.clickNodes is None and effect.clicks == []


def _balls(volume, clicks):
    """The Ball stand-in's mask (k, j, i) on the volume's grid for clicks ((world RAS), positive)."""
    import FastSAM3DLogic as FL

    session = Ball()
    session.set_image(FL.volumeNodeToImage(volume))
    for rasWorld, positive in clicks:
        session.add_point(FL.rasToLps(FL.worldToLocal(volume, [rasWorld]))[0], positive)
    return sitk.GetArrayFromImage(session.predict())


def _ball_at(volume, rasWorld):
    """A Ball session holding one include click at a world RAS point of the (translated) volume."""
    import FastSAM3DLogic as FL

    session = Ball()
    session.set_image(FL.volumeNodeToImage(volume))
    session.add_point(FL.rasToLps(FL.worldToLocal(volume, [rasWorld]))[0])
    return session


def _widget(app):
    volume, segmentation, target, other = small_scene(app.scene)
    widget = app.module.FastSAM3DWidget(types.SimpleNamespace(isEntered=True))
    widget.setup()
    widget.ui.segmentSelector.setCurrentNode(segmentation)
    widget.ui.segmentSelector.setCurrentSegmentID(target)
    return widget, volume, segmentation, target, other


class _Gate:
    """Holds the stand-in engine's predictions until released: a prediction still running."""

    def __init__(self):
        self.event, self.original = threading.Event(), Ball.predict_region

    def __enter__(self):
        original, event = self.original, self.event
        Ball.predict_region = lambda session, object=0: (event.wait(10), original(session, object))[1]
        return self

    def __exit__(self, *exc):
        self.event.set()
        Ball.predict_region = self.original


def test_a_result_in_flight_does_not_overwrite_undo_or_accept(app):
    """Found by review: a prediction running while the user pressed Undo (or Accept) used to land
    afterwards and overwrite the segment; and Accept waited for it on the GUI thread."""
    widget, volume, segmentation, target, _ = _widget(app)
    include = widget._reference("PositivePoints")
    include.AddControlPoint(7.0, 0.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    include.AddControlPoint(-5.0, 0.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    with _Gate() as gate:
        include.AddControlPoint(0.0, 10.0, 0.0)  # its prediction is running
        time.sleep(0.1)
        widget.onUndo()
        widget.onUndo()
        gate.event.set()
        drain(widget.queue, widget.timer.fire)
    assert app.logic.segmentArray(segmentation, target).sum() == 0  # back before the first result ...
    assert include.GetNumberOfControlPoints() == 0  # ... and so before its point
    with _Gate() as gate:
        include.AddControlPoint(-5.0, 0.0, 0.0)
        time.sleep(0.1)
        started = time.perf_counter()
        widget.onAccept()
        assert time.perf_counter() - started < 1.0  # did not wait for the prediction
        accepted = app.logic.segmentArray(segmentation, target).copy()
        gate.event.set()
        drain(widget.queue, widget.timer.fire)
    assert np.array_equal(app.logic.segmentArray(segmentation, target), accepted)
    assert not app.logic.canUndo(segmentation, target)


def test_a_waiting_click_is_not_dropped_by_an_uncertainty_request(app):
    widget, volume, segmentation, target, _ = _widget(app)
    drain(widget.queue, widget.timer.fire)
    include = widget._reference("PositivePoints")
    with _Gate() as gate:
        include.AddControlPoint(7.0, 0.0, 0.0)
        time.sleep(0.1)
        include.AddControlPoint(-5.0, 0.0, 0.0)  # waits behind the first
        widget.ui.showUncertaintyCheckBox.checked = True
        widget.ui.showUncertaintyCheckBox.emit("toggled(bool)", True)  # used to replace it in the queue
        gate.event.set()
        drain(widget.queue, widget.timer.fire)
    drain(widget.queue, widget.timer.fire)
    expected = _balls(volume, [((7.0, 0.0, 0.0), True), ((-5.0, 0.0, 0.0), True)])
    assert np.array_equal(app.logic.segmentArray(segmentation, target), expected)


def test_closing_the_scene_forgets_the_undo_history(app):
    """Node IDs are reused by the next scene: an old undo entry would overwrite a new segment."""
    widget, volume, segmentation, target, _ = _widget(app)
    widget._reference("PositivePoints").AddControlPoint(7.0, 0.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    assert app.logic.canUndo(segmentation, target)
    app.scene.Clear(0)
    volume2, segmentation2, target2, _ = small_scene(app.scene)
    assert not app.logic.canUndo(segmentation2, target2)


def test_another_segment_starts_from_no_points(app):
    """Found by review: the points placed for one segment were carried into the next one chosen."""
    widget, volume, segmentation, target, _ = _widget(app)
    other = [segmentation.GetSegmentation().GetNthSegmentID(n) for n in range(segmentation.GetSegmentation().GetNumberOfSegments())
             if segmentation.GetSegmentation().GetNthSegmentID(n) != target][0]
    include = widget._reference("PositivePoints")
    include.AddControlPoint(7.0, 0.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    first = app.logic.segmentArray(segmentation, target).copy()
    widget.ui.segmentSelector.setCurrentSegmentID(other)
    assert include.GetNumberOfControlPoints() == 0
    include.AddControlPoint(-5.0, 0.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    assert np.array_equal(app.logic.segmentArray(segmentation, other), _balls(volume, [((-5.0, 0.0, 0.0), True)]))
    assert np.array_equal(app.logic.segmentArray(segmentation, target), first)


def test_a_model_change_while_work_waits_loads_nothing_on_the_worker(app, monkeypatch):
    """Found by review: a request queued before the user picked another model made the worker load
    the bundled model (and call the GUI from there); the model is taken when the request is made."""
    widget, volume, segmentation, target, _ = _widget(app)
    drain(widget.queue, widget.timer.fire)
    loads = []

    def load(source="bundled", checkpointPath=None, device=None):
        loads.append((source, threading.current_thread().name))
        app.logic._model = object()
        return app.logic._model

    monkeypatch.setattr(app.logic, "loadModel", load)
    with _Gate() as gate:
        widget._reference("PositivePoints").AddControlPoint(7.0, 0.0, 0.0)
        time.sleep(0.1)
        second = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v2")
        second.Copy(volume)
        second.SetAndObserveImageData(volume.GetImageData())
        widget.ui.inputVolumeSelector.setCurrentNode(second)  # its embedding request waits
        widget.ui.modelSourceComboBox.setCurrentIndex(widget.ui.modelSourceComboBox.findData("checkpoint"))
        gate.event.set()
        drain(widget.queue, widget.timer.fire)
    assert all(thread == threading.main_thread().name for _, thread in loads), loads


def test_a_result_dropped_by_a_model_change_comes_back_with_the_new_model(app, monkeypatch):
    """Left over from a review: a result still computing when other weights were chosen was dropped
    (rightly), and nothing asked for it again until the points changed."""
    widget, volume, segmentation, target, _ = _widget(app)
    drain(widget.queue, widget.timer.fire)

    def load(source="bundled", checkpointPath=None, device=None):
        app.logic.setModel(object())
        return types.SimpleNamespace(config={"source": source})

    monkeypatch.setattr(app.logic, "loadModel", load)
    with _Gate() as gate:
        widget._reference("PositivePoints").AddControlPoint(7.0, 0.0, 0.0)
        time.sleep(0.1)
        widget.ui.deviceComboBox.setCurrentIndex(widget.ui.deviceComboBox.findData("cpu"))
        gate.event.set()
        drain(widget.queue, widget.timer.fire)
    assert app.logic.segmentArray(segmentation, target).sum() == 0  # the old model's result is not shown
    widget.ui.loadModelButton.emit("clicked(bool)")  # Qt calls a slot with the arguments it takes
    drain(widget.queue, widget.timer.fire)
    assert np.array_equal(app.logic.segmentArray(segmentation, target), _balls(volume, [((7.0, 0.0, 0.0), True)]))


def test_undo_restores_the_points_that_made_the_restored_result(app):
    """Found by review: Undo removed the last placed point whatever had changed, so after a drag or
    a delete (or clicks whose results were superseded) the points no longer matched the segment."""
    widget, volume, segmentation, target, _ = _widget(app)
    include = widget._reference("PositivePoints")

    def points():
        out = []
        for n in range(include.GetNumberOfControlPoints()):
            position = [0.0, 0.0, 0.0]
            include.GetNthControlPointPositionWorld(n, position)
            out.append(tuple(round(v, 3) for v in position))
        return out

    for x, y in ((7.0, 0.0), (-5.0, 0.0), (0.0, 10.0)):
        include.AddControlPoint(x, y, 0.0)
        drain(widget.queue, widget.timer.fire)
    three = app.logic.segmentArray(segmentation, target).copy()
    include.SetNthControlPointPositionWorld(1, -5.0, 8.0, 0.0)  # a drag
    drain(widget.queue, widget.timer.fire)
    include.RemoveNthControlPoint(0)  # a delete
    drain(widget.queue, widget.timer.fire)
    widget.onUndo()
    assert points() == [(7.0, 0.0, 0.0), (-5.0, 8.0, 0.0), (0.0, 10.0, 0.0)]
    widget.onUndo()
    assert points() == [(7.0, 0.0, 0.0), (-5.0, 0.0, 0.0), (0.0, 10.0, 0.0)]
    assert np.array_equal(app.logic.segmentArray(segmentation, target), three)
    # The points match the result: nothing new is asked for until the user changes them.
    assert not widget.queue.busy
    widget.onPromptsModified(include, None)
    assert not widget.queue.busy


def test_undo_restores_the_roi_box_and_the_next_structure_starts_without_it(app):
    """Left over from a review: Undo put the points back but left a moved ROI box where it was, and
    after Accept the accepted structure's box stayed to clip the next structure's clicks."""
    widget, volume, segmentation, target, _ = _widget(app)
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    widget.ui.roiSelector.setCurrentNode(roi)
    widget.updateParameterNodeFromGUI()
    assert widget._reference("ROI") is roi

    def bounds():
        values = [0.0] * 6
        roi.GetRASBounds(values)
        return np.round(values, 3).tolist()

    roi.SetCenter(7.0, 0.0, 0.0)
    roi.SetSize(6.0, 6.0, 6.0)
    drain(widget.queue, widget.timer.fire)
    boxed = app.logic.segmentArray(segmentation, target).copy()
    assert boxed.sum() > 0
    first = bounds()
    roi.SetCenter(7.0, 6.0, 0.0)  # moved
    drain(widget.queue, widget.timer.fire)
    assert not np.array_equal(app.logic.segmentArray(segmentation, target), boxed)
    widget.onUndo()
    assert bounds() == first
    assert np.array_equal(app.logic.segmentArray(segmentation, target), boxed)
    assert not widget.queue.busy  # the restored box matches the restored result
    widget.onUndo()
    assert roi.GetNumberOfControlPoints() == 0  # before the box was drawn
    assert app.logic.segmentArray(segmentation, target).sum() == 0

    roi.SetCenter(7.0, 0.0, 0.0)
    roi.SetSize(6.0, 6.0, 6.0)
    drain(widget.queue, widget.timer.fire)
    widget.onAccept()
    assert roi.GetNumberOfControlPoints() == 0
    # Found with it: the next structure's points replaced the accepted one in the same segment.
    following = app.logic.getParameter(widget._parameterNode, "SegmentID")
    assert following not in ("", target) and widget.ui.segmentSelector.currentSegmentID() == following
    widget._reference("PositivePoints").AddControlPoint(-7.0, 0.0, 0.0)  # outside the old box
    drain(widget.queue, widget.timer.fire)
    assert np.array_equal(app.logic.segmentArray(segmentation, target), boxed)
    assert app.logic.segmentArray(segmentation, following).sum() > 0


def _effect_after_one_click(app, volume, segmentation, target):
    """The Segment Editor effect on ``target`` after a first click at (7, 0) has been written;
    ``click(xy)`` clicks again."""
    wrapper = FakeScriptedEffect(app.scene, segmentation, volume, target)
    effect = importlib.import_module("SegmentEditorFastSAM3DLib.SegmentEditorEffect").SegmentEditorEffect(wrapper)
    effect.setupOptionsFrame()
    effect.setMRMLDefaults()
    effect.updateGUIFromMRML()
    effect.activate()
    view = FakeSliceWidget()

    def click(xy):
        effect.processInteractionEvents(FakeInteractor(xy), vtk.vtkCommand.LeftButtonPressEvent, view)

    click((7, 0))
    drain(effect.queue, effect.timer.fire)
    return wrapper, effect, click


def test_the_editors_undo_during_a_click_is_not_overwritten(app):
    """Found by review: Ctrl+Z in the Segment Editor while a click computed was overwritten by the
    click's result when it arrived."""
    volume, segmentation, target, _ = small_scene(app.scene)
    wrapper, effect, click = _effect_after_one_click(app, volume, segmentation, target)
    assert app.logic.segmentArray(segmentation, target).sum() > 0
    with _Gate() as gate:
        click((-5, 0))
        time.sleep(0.1)
        wrapper.editor.Undo()
        assert app.logic.segmentArray(segmentation, target).sum() == 0
        gate.event.set()
        drain(effect.queue, effect.timer.fire)
    assert app.logic.segmentArray(segmentation, target).sum() == 0


def test_a_saved_scene_keeps_its_points_and_a_switched_segment_keeps_its_result(app):
    """Review of the widget changes: showing the parameter node's own segment erased saved points;
    a click still computing for the previous segment landed in the new segment's undo history."""
    volume, segmentation, target, other = small_scene(app.scene)
    node = app.logic.getParameterNode()
    app.logic.setDefaultParameters(node)
    include, exclude = app.logicModule.FastSAM3DLogic.createPromptNodes(app.scene)
    include.AddControlPoint(7.0, 0.0, 0.0)
    roles = app.logicModule.REFERENCE_ROLES
    for role, referenced in (("InputVolume", volume), ("Segmentation", segmentation), ("PositivePoints", include),
                             ("NegativePoints", exclude)):
        node.SetNodeReferenceID(roles[role], referenced.GetID())
    app.logic.setParameter(node, "SegmentID", target)
    widget = app.module.FastSAM3DWidget(types.SimpleNamespace(isEntered=True))
    widget.setup()  # as when a saved scene is opened in the module
    assert widget._reference("PositivePoints") is include and include.GetNumberOfControlPoints() == 1

    widget.requestSegmentation(force=True)
    drain(widget.queue, widget.timer.fire)
    first = app.logic.segmentArray(segmentation, target).copy()
    with _Gate() as gate:
        include.AddControlPoint(-5.0, 0.0, 0.0)  # still computing when the user switches segment
        time.sleep(0.1)
        widget.ui.segmentSelector.setCurrentSegmentID(other)
        gate.event.set()
        drain(widget.queue, widget.timer.fire)
    assert np.array_equal(app.logic.segmentArray(segmentation, target), first)  # kept as it was, as if accepted
    assert widget._undoActions == [] and not app.logic.canUndo(segmentation, target)
    include.AddControlPoint(0.0, 10.0, 0.0)
    drain(widget.queue, widget.timer.fire)
    widget.onUndo()
    assert include.GetNumberOfControlPoints() == 0 and app.logic.segmentArray(segmentation, other).sum() == 0


def test_the_effect_keeps_a_click_when_another_segment_of_its_layer_changes(app):
    """Segments share a labelmap layer: editing another one moves the clicked segment's stamp, and
    the click's result was dropped although its voxels were untouched."""
    volume, segmentation, target, other = small_scene(app.scene)
    _, effect, click = _effect_after_one_click(app, volume, segmentation, target)
    with _Gate() as gate:
        click((-5, 0))
        time.sleep(0.1)
        painted = np.zeros(volume.GetImageData().GetDimensions()[::-1], np.uint8)
        painted[0:3, 0:3, 0:3] = 1
        app.logic._setSegment(segmentation, other, app.logic.maskToSegmentLabelmap(painted, volume, segmentation))
        gate.event.set()
        drain(effect.queue, effect.timer.fire)
    expected = _balls(volume, [((7.0, 0.0, 0.0), True), ((-5.0, 0.0, 0.0), True)])
    assert np.array_equal(app.logic.segmentArray(segmentation, target), expected)


def test_the_effect_switches_the_boundary_refinement_and_decides_its_clicks_again(app):
    """Left over from a review: the Segment Editor effect had no control of the boundary refinement."""
    volume, segmentation, target, _ = small_scene(app.scene)
    wrapper, effect, click = _effect_after_one_click(app, volume, segmentation, target)
    effect.updateGUIFromMRML()
    assert effect.refineCheckBox.checked is True and app.logic.refineBoundary is True
    ball = app.logic.segmentArray(segmentation, target).copy()
    effect.onRefineBoundaryToggled(False)
    assert app.logic.refineBoundary is False and effect.queue.busy  # the same click, decided again
    drain(effect.queue, effect.timer.fire)
    assert np.array_equal(app.logic.segmentArray(segmentation, target), ball)  # the stand-in ignores the setting
    effect.updateGUIFromMRML()
    assert effect.refineCheckBox.checked is False
    # Found by review: the module's parameter node kept its own value and set the logic back.
    module = app.module.FastSAM3DWidget(types.SimpleNamespace(isEntered=True))
    module.setup()
    assert app.logic.refineBoundary is False and module.ui.refineBoundaryCheckBox.checked is False


def test_the_downloaded_public_weights_are_the_ones_loaded(app, monkeypatch, tmp_path):
    """Found by review: the download kept sam_med3d_turbo.safetensors, while the module looked for
    FastSAM3D.safetensors and kept asking for the download."""
    widget, *_ = _widget(app)
    monkeypatch.setattr(app.logic, "weightsDirectory", lambda: tmp_path)
    loads = []

    def load(source="bundled", checkpointPath=None, device=None):
        loads.append((source, checkpointPath))
        return types.SimpleNamespace(config={"source": checkpointPath})

    monkeypatch.setattr(app.logic, "loadModel", load)
    widget.ui.modelSourceComboBox.setCurrentIndex(widget.ui.modelSourceComboBox.findData("public"))
    assert widget.onLoadModel() is False and "Download the public weights first" in widget.ui.statusLabel.text
    app.logic.publicWeightsPath().write_bytes(b"converted weights")  # what downloadPublicWeights leaves
    assert widget.onLoadModel() is True
    assert loads == [("public", str(tmp_path / "sam_med3d_turbo.safetensors"))]
