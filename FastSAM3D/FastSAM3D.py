"""FastSAM3D Slicer module: click in a CT or MR volume and get the 3D segment, refined click by click.

The widget collects prompts (include / exclude points as markups, an optional ROI box) and shows
progress; :mod:`FastSAM3DLogic` does all MRML <-> engine work. Engine calls run on a worker thread
and their results are applied on the main thread from a timer, so Slicer never freezes while a volume
is embedded. The module also registers the "FastSAM3D" Segment Editor effect at startup.
"""

import logging
import os
import sys
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.3

    def _(text):
        return text


_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _addModulePaths():
    """Make the helper modules and the engine importable in both layouts.

    Installed (see FastSAM3D/CMakeLists.txt): the helpers live in ``FastSAM3DHelpers/`` next to this
    file, because Slicer would try to load every ``.py`` beside a module as a module of its own; the
    engine package ``FastSAM3DLib`` lies beside this file. In the source tree the helpers sit beside
    this file and the engine one folder up.
    """
    for folder in (_MODULE_DIR, os.path.join(_MODULE_DIR, "FastSAM3DHelpers")):
        if os.path.exists(os.path.join(folder, "FastSAM3DLogic.py")) and folder not in sys.path:
            sys.path.insert(0, folder)
    for folder in (_MODULE_DIR, os.path.dirname(_MODULE_DIR)):
        if os.path.isdir(os.path.join(folder, "FastSAM3DLib")) and folder not in sys.path:
            sys.path.append(folder)
            break


_addModulePaths()

from FastSAM3DLogic import (  # noqa: E402
    DEVICES,
    MODEL_SOURCES,
    REFERENCE_ROLES,
    FastSAM3DLogic,
    PredictionQueue,
    sharedLogic,
    shownCandidate,
)


def resourceFile(*parts):
    """A file under ``Resources/``: beside this file when installed, one folder up in the source tree."""
    for base in (_MODULE_DIR, os.path.dirname(_MODULE_DIR)):
        path = os.path.join(base, "Resources", *parts)
        if os.path.exists(path):
            return path
    return os.path.join(_MODULE_DIR, "Resources", *parts)


class _MarkupsState(NamedTuple):
    """What made a result: the include and exclude points (world RAS), the ROI box (its
    object-to-node matrix, 16 values row by row, and size; None: no box), the candidate asked for
    (None: the model's pick), and the candidates the result offered with the one shown."""

    include: Tuple[Tuple[float, float, float], ...] = ()
    exclude: Tuple[Tuple[float, float, float], ...] = ()
    requested: Optional[int] = None
    candidates: List[float] = []
    shown: Optional[int] = None
    roi: Optional[Tuple[Tuple[float, ...], Tuple[float, float, float]]] = None


#
# FastSAM3D
#


class FastSAM3D(ScriptedLoadableModule):
    """Module description and the Segment Editor effect's registration."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FastSAM3D")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["FastSAM3D contributors"]
        self.parent.helpText = _(
            "Interactive 3D segmentation: click inside a structure (include points) or where the segment "
            "leaked (exclude points), optionally draw a box, and the selected segment updates after every "
            "click. Accept keeps it, Undo restores the previous result, Reset restores the segment from "
            "before the first click. The same is available in the Segment Editor as the 'FastSAM3D' effect, "
            "where the editor's masking and undo apply."
        )
        self.parent.acknowledgementText = _(
            "Uses the FastSAM3D model: Shen Y. et al., 'FastSAM3D: An Efficient Segment Anything Model for 3D "
            "Volumetric Medical Images', MICCAI 2024 (arXiv:2403.09827), distilled from SAM-Med3D; and the "
            "interaction design of FastSAM-3DSlicer (arXiv:2407.12658)."
        )
        self.parent.icon = qt.QIcon(resourceFile("Icons", "FastSAM3D.png"))
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        """Register the Segment Editor effect the way Slicer's scripted effects are registered."""
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        path = os.path.join(_MODULE_DIR, "SegmentEditorFastSAM3DLib", "SegmentEditorEffect.py")
        instance = effects.qSlicerSegmentEditorScriptedEffect(None)
        instance.setPythonSource(path.replace("\\", "/"))
        instance.self().register()


#
# FastSAM3DWidget
#


class FastSAM3DWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: node selectors, prompt placement, model choice, progress."""

    POLL_MS = 100
    MARKUPS_EVENTS = (  # (event, handler name); VTK passes custom events to Python without their id
        (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, "onPromptsModified"),
        (slicer.vtkMRMLMarkupsNode.PointModifiedEvent, "onPromptsModified"),
        (slicer.vtkMRMLMarkupsNode.PointRemovedEvent, "onPromptsModified"),
    )

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._observedPromptNodes = []
        self._undoActions = []  # per result written, what the markups and candidate were for the one before (Undo restores it)
        self._shownMarkups = _MarkupsState()  # what made the result the segment shows now
        self._promptTarget = None  # (segmentation, segment ID) the points were placed for
        self._candidates = []  # predicted IoUs of the candidate masks of the last result (a lone click)
        self._shownCandidate = None  # the candidate the last result shows (None: the model's pick)
        self._blockPromptEvents = False
        self._lastPrompts = None
        self.queue = None
        self.timer = None
        self._download = None

    # -- setup / teardown ---------------------------------------------------------------------------

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourceFile("UI", "FastSAM3D.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = sharedLogic()
        self.logic.logCallback = self.showStatus
        self.queue = PredictionQueue()
        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_MS)
        self.timer.connect("timeout()", self.onPoll)

        for source, title in zip(MODEL_SOURCES, (_("Bundled model"), _("Local checkpoint"), _("Public SAM-Med3D-turbo weights"))):
            self.ui.modelSourceComboBox.addItem(title, source)
        for device in DEVICES:
            self.ui.deviceComboBox.addItem(device, device)
        for placeWidget, multiple in ((self.ui.includePointsPlaceWidget, True), (self.ui.excludePointsPlaceWidget, True),
                                      (self.ui.roiPlaceWidget, False)):
            placeWidget.buttonsVisible = False
            placeWidget.placeButton().show()
            placeWidget.deleteButton().show()
            if multiple:
                placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # GUI -> parameter node
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self._onSegmentChanged)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.uncertaintyVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.liveUpdateCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.refineBoundaryCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.showUncertaintyCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.uncertaintySamplesSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.modelSourceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)

        # Actions
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.candidateButton.connect("clicked(bool)", self.onCandidateButton)
        self.ui.acceptButton.connect("clicked(bool)", self.onAccept)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.resetButton.connect("clicked(bool)", self.onReset)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelButton)
        self.ui.downloadButton.connect("clicked(bool)", self.onDownload)
        self.ui.showUncertaintyCheckBox.connect("toggled(bool)", self.onShowUncertaintyToggled)
        self.ui.refineBoundaryCheckBox.connect("toggled(bool)", self.onRefineBoundaryToggled)
        self.ui.modelSourceComboBox.connect("currentIndexChanged(int)", self.onModelSettingsChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onModelSettingsChanged)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onModelSettingsChanged)

        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.timer is not None:
            self.timer.stop()
        if self.queue is not None:
            self.queue.shutdown()
        if self.logic is not None:
            self.logic.logCallback = None

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        for placeWidget in (self.ui.includePointsPlaceWidget, self.ui.excludePointsPlaceWidget, self.ui.roiPlaceWidget):
            placeWidget.setPlaceModeEnabled(False)
        if self._parameterNode is not None and self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._observePromptNodes([])

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self._observePromptNodes([])
        self.logic.forgetScene()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ---------------------------------------------------------------------------------

    def initializeParameterNode(self):
        """Ensure the parameter node exists, has defaults and prompt nodes, and is observed."""
        node = self.logic.getParameterNode()
        self.logic.setDefaultParameters(node)
        with slicer.util.NodeModify(node):
            if not node.GetNodeReference(REFERENCE_ROLES["InputVolume"]):
                volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
                if volume is not None:
                    node.SetNodeReferenceID(REFERENCE_ROLES["InputVolume"], volume.GetID())
            if not node.GetNodeReference(REFERENCE_ROLES["PositivePoints"]):
                include, exclude = FastSAM3DLogic.createPromptNodes(slicer.mrmlScene)
                node.SetNodeReferenceID(REFERENCE_ROLES["PositivePoints"], include.GetID())
                node.SetNodeReferenceID(REFERENCE_ROLES["NegativePoints"], exclude.GetID())
        self.setParameterNode(node)

    def setParameterNode(self, inputParameterNode):
        if inputParameterNode is not None:
            self.logic.setDefaultParameters(inputParameterNode)
        if self._parameterNode is not None and self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def _reference(self, role):
        return self._parameterNode.GetNodeReference(REFERENCE_ROLES[role]) if self._parameterNode else None

    def updateGUIFromParameterNode(self, caller=None, event=None):
        """Show the parameter node in the GUI; the guard stops GUI signals writing back (no loops)."""
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            get = lambda name: self.logic.getParameter(self._parameterNode, name)  # noqa: E731
            self.ui.inputVolumeSelector.setCurrentNode(self._reference("InputVolume"))
            self.ui.segmentSelector.setCurrentNode(self._reference("Segmentation"))
            if get("SegmentID"):
                self.ui.segmentSelector.setCurrentSegmentID(get("SegmentID"))
            self.ui.includePointsPlaceWidget.setCurrentNode(self._reference("PositivePoints"))
            self.ui.excludePointsPlaceWidget.setCurrentNode(self._reference("NegativePoints"))
            self.ui.roiSelector.setCurrentNode(self._reference("ROI"))
            self.ui.roiPlaceWidget.setCurrentNode(self._reference("ROI"))
            self.ui.uncertaintyVolumeSelector.setCurrentNode(self._reference("Uncertainty"))
            self.ui.liveUpdateCheckBox.checked = get("LiveUpdate")
            self.ui.refineBoundaryCheckBox.checked = get("RefineBoundary")
            if self.logic.refineBoundary != get("RefineBoundary"):  # e.g. a saved scene's setting
                self.logic.setRefineBoundary(get("RefineBoundary"))
            self.ui.showUncertaintyCheckBox.checked = get("ShowUncertainty")
            self.ui.uncertaintySamplesSpinBox.value = get("UncertaintySamples")
            self.ui.modelSourceComboBox.setCurrentIndex(max(0, self.ui.modelSourceComboBox.findData(get("ModelSource"))))
            self.ui.deviceComboBox.setCurrentIndex(max(0, self.ui.deviceComboBox.findData(get("Device"))))
            self.ui.checkpointPathLineEdit.currentPath = get("CheckpointPath")

            source = get("ModelSource")
            self.ui.checkpointPathLineEdit.enabled = source == "checkpoint"
            self.ui.downloadButton.enabled = source == "public" and self._download is None
            ready = self._reference("InputVolume") is not None and self._reference("Segmentation") is not None \
                and bool(get("SegmentID"))
            for button in (self.ui.segmentButton, self.ui.acceptButton, self.ui.resetButton):
                button.enabled = ready
            self.ui.undoButton.enabled = ready and self.logic.canUndo(self._reference("Segmentation"), get("SegmentID"))
            self.ui.candidateButton.enabled = ready and len(self._candidates) > 1
            self._observePromptNodes([self._reference("PositivePoints"), self._reference("NegativePoints"), self._reference("ROI")])
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        """Store the GUI state in the parameter node (one modify block)."""
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        node = self._parameterNode
        with slicer.util.NodeModify(node):
            node.SetNodeReferenceID(REFERENCE_ROLES["InputVolume"], self.ui.inputVolumeSelector.currentNodeID)
            segmentation = self.ui.segmentSelector.currentNode()
            node.SetNodeReferenceID(REFERENCE_ROLES["Segmentation"], segmentation.GetID() if segmentation else None)
            self.logic.setParameter(node, "SegmentID", self.ui.segmentSelector.currentSegmentID() or "")
            node.SetNodeReferenceID(REFERENCE_ROLES["ROI"], self.ui.roiSelector.currentNodeID)
            node.SetNodeReferenceID(REFERENCE_ROLES["Uncertainty"], self.ui.uncertaintyVolumeSelector.currentNodeID)
            self.logic.setParameter(node, "LiveUpdate", self.ui.liveUpdateCheckBox.checked)
            self.logic.setParameter(node, "RefineBoundary", self.ui.refineBoundaryCheckBox.checked)
            self.logic.setParameter(node, "ShowUncertainty", self.ui.showUncertaintyCheckBox.checked)
            self.logic.setParameter(node, "UncertaintySamples", self.ui.uncertaintySamplesSpinBox.value)
            self.logic.setParameter(node, "ModelSource", self.ui.modelSourceComboBox.currentData or "bundled")
            self.logic.setParameter(node, "Device", self.ui.deviceComboBox.currentData or "auto")
            self.logic.setParameter(node, "CheckpointPath", self.ui.checkpointPathLineEdit.currentPath)

    # -- prompts ----------------------------------------------------------------------------------------

    def _observePromptNodes(self, nodes):
        nodes = [n for n in nodes if n is not None]
        if nodes == self._observedPromptNodes:
            return
        for node in self._observedPromptNodes:
            for event, handler in self._promptEvents(node):
                if self.hasObserver(node, event, getattr(self, handler)):
                    self.removeObserver(node, event, getattr(self, handler))
        for node in nodes:
            for event, handler in self._promptEvents(node):
                self.addObserver(node, event, getattr(self, handler))
        self._observedPromptNodes = nodes

    def _promptEvents(self, node):
        if node.IsA("vtkMRMLMarkupsFiducialNode"):
            return self.MARKUPS_EVENTS
        return ((vtk.vtkCommand.ModifiedEvent, "onPromptsModified"),)  # the ROI box

    def onPromptsModified(self, caller, event):
        """A point was added, moved or removed (or the ROI changed): update live if enabled."""
        if self._blockPromptEvents or self._parameterNode is None:
            return
        if self.logic.getParameter(self._parameterNode, "LiveUpdate"):
            self.requestSegmentation()

    def _segmentTarget(self):
        return self._reference("InputVolume"), self._reference("Segmentation"), \
            self.logic.getParameter(self._parameterNode, "SegmentID")

    def _currentPrompts(self):
        """(points RAS, labels, box corners or None, a key that changes whenever any of them does)."""
        volume, segmentation, segmentId = self._segmentTarget()
        points, labels = FastSAM3DLogic.pointsFromMarkups(self._reference("PositivePoints"), self._reference("NegativePoints"))
        roi = self._reference("ROI")
        box = FastSAM3DLogic.roiCornersRAS(roi) if roi is not None and roi.GetNumberOfControlPoints() else None
        key = (volume.GetID() if volume else None, segmentation.GetID() if segmentation else None, segmentId,
               np.round(points, 6).tobytes(), tuple(labels), None if box is None else np.round(np.ravel(box), 6).tobytes(),
               self.logic.getParameter(self._parameterNode, "Candidate"))
        return points, labels, box, key

    @staticmethod
    def _markupsState(points, labels, candidate, roiNode) -> "_MarkupsState":
        """A request's prompts (``_currentPrompts``'s points and labels, read with the ROI in one
        event) and the candidate asked for (-1: none)."""
        include = tuple(tuple(float(v) for v in p) for p, label in zip(points, labels) if label)
        exclude = tuple(tuple(float(v) for v in p) for p, label in zip(points, labels) if not label)
        roi = None
        if roiNode is not None and roiNode.GetNumberOfControlPoints():
            matrix = roiNode.GetObjectToNodeMatrix()
            roi = (tuple(matrix.GetElement(i, j) for i in range(4) for j in range(4)), tuple(roiNode.GetSize()))
        return _MarkupsState(include, exclude, None if candidate < 0 else candidate, roi=roi)

    def _restoreMarkups(self, state: "_MarkupsState"):
        """Put the points and the ROI box back as ``state`` recorded them (no live update)."""
        self._blockPromptEvents = True
        try:
            for role, positions in (("PositivePoints", state.include), ("NegativePoints", state.exclude)):
                node = self._reference(role)
                if node is not None:
                    node.RemoveAllControlPoints()
                    for position in positions:
                        node.AddControlPointWorld(vtk.vtkVector3d(*position))
            roi = self._reference("ROI")
            if roi is not None and state.roi is None:
                roi.RemoveAllControlPoints()
            elif roi is not None:
                matrix = vtk.vtkMatrix4x4()
                matrix.DeepCopy(state.roi[0])
                roi.SetAndObserveObjectToNodeMatrix(matrix)
                roi.SetSize(*state.roi[1])
        finally:
            self._blockPromptEvents = False

    def _setCandidate(self, candidate):
        if self._parameterNode is not None:
            self.logic.setParameter(self._parameterNode, "Candidate", -1 if candidate is None else candidate)

    def _onSegmentChanged(self, *args):
        """Another segment: its own clicks. The points placed belong to the segment they segmented,
        which keeps its result as if accepted; the new one starts from no points (the editor effect
        does the same). The GUI showing the parameter node's own segment changes nothing."""
        if self._updatingGUIFromParameterNode or self._promptTarget is None:
            return
        _volume, segmentation, segmentId = self._segmentTarget()
        if (segmentation, segmentId) == self._promptTarget:
            return
        self.logic.accept(*self._promptTarget)
        self._clearPrompts()

    def _forgetCandidates(self, *args):
        """Another segment, volume or model: its first click starts from the model's pick."""
        self._setCandidate(None)
        self._candidates = []
        self._shownCandidate = None

    def onSegmentButton(self):
        self.requestSegmentation(force=True)

    def onCandidateButton(self):
        """Show the next candidate mask of the lone click (undoable like a click)."""
        if len(self._candidates) < 2:
            return
        requested = self.logic.getParameter(self._parameterNode, "Candidate")
        current = shownCandidate(self._candidates, requested if requested >= 0 else None)
        self._setCandidate((current + 1) % len(self._candidates))
        self.requestSegmentation(force=True)

    def requestSegmentation(self, force=False):
        """Queue a prediction from the current prompts (runs on the worker; applied in onPoll).

        Events that leave the prompts as they were (display changes, hovering) queue nothing; when
        the last point is deleted the segment returns to how it was before the first click.
        """
        volume, segmentation, segmentId = self._segmentTarget()
        if volume is None or segmentation is None or not segmentId:
            return
        points, labels, box, key = self._currentPrompts()
        if key == self._lastPrompts and not force:
            return
        self._lastPrompts = key
        if len(points) == 0 and box is None:
            self._forgetCandidates()
            # Also when nothing was written yet: a first result still computing must not land.
            if self.logic.reset(segmentation, segmentId):
                self.showStatus(_("No points left: the segment is as it was before the first click."))
            self._undoActions, self._shownMarkups = [], _MarkupsState()
            return
        if not self._ensureModel():
            self._lastPrompts = None  # try again on the next event, once weights are chosen
            return
        try:
            candidate = self.logic.getParameter(self._parameterNode, "Candidate")
            request = self.logic.prepareSegmentation(volume, segmentation, segmentId, points, labels, box,
                                                     candidate=candidate if candidate >= 0 else None)
            request.markups = self._markupsState(points, labels, candidate, self._reference("ROI"))
            self._promptTarget = (segmentation, segmentId)
        except ValueError as error:  # FastSAM3DInputError: the user's input, explained
            self.showStatus(str(error))
            return
        self.queue.submit(request)
        self.ui.progressBar.visible = True
        self.timer.start()

    def onPoll(self):
        """Main-thread timer: show progress and apply finished results."""
        volume = self._reference("InputVolume")
        progress = self.logic.sessionProgress(volume)
        if progress.get("stage") not in ("ready", "idle"):
            self.ui.progressBar.setFormat(f"{progress.get('stage', '')} %p%")
            self.ui.progressBar.value = int(100 * float(progress.get("fraction", 0.0)))
        finished = self.queue.poll()
        for request, result, error, superseded in finished:
            if error is not None:
                self.showStatus(_("FastSAM3D failed: {error}").format(error=error))
                logging.error("FastSAM3D request failed", exc_info=error)
                continue
            if superseded or request.kind == "embed" or self.logic.isStale(request):
                continue
            try:
                if request.kind == "segment":
                    outcome = self.logic.applyPrediction(request, result)
                    # Recorded once written, beside the logic's own undo entry (superseded results wrote nothing).
                    self._undoActions.append(self._shownMarkups)
                    if len(self._undoActions) > self.logic.maxUndo:
                        del self._undoActions[1]  # as the logic trims its history
                    self._candidates, self._shownCandidate = outcome.candidates, outcome.candidate
                    self._shownMarkups = request.markups._replace(candidates=list(outcome.candidates), shown=outcome.candidate)
                    status = _("{voxels} voxels ({ml:.1f} ml) in {seconds:.2f} s").format(
                        voxels=outcome.voxels, ml=outcome.volumeMl, seconds=outcome.timings.get("total_s", 0.0))
                    if outcome.candidates:
                        status += " " + _("(candidate {n} of {count}: 'Other candidate' shows the next)").format(
                            n=shownCandidate(outcome.candidates, outcome.candidate) + 1, count=len(outcome.candidates))
                    self.showStatus(status)
                    if self.logic.getParameter(self._parameterNode, "ShowUncertainty"):
                        self._queueUncertainty()
                else:
                    overlay = self.logic.applyUncertainty(request, result, self._reference("Uncertainty"))
                    self._showOverlay(overlay)
            except Exception as error:  # shown to the user; the segmentation was restored by the logic
                self.showStatus(_("FastSAM3D could not apply the result: {error}").format(error=error))
                logging.exception("applying a FastSAM3D result failed")
        if finished:
            self.updateGUIFromParameterNode()
        if not self.queue.busy and progress.get("stage") in ("ready", "idle"):
            self.timer.stop()
            self.ui.progressBar.visible = False

    def _queueUncertainty(self):
        volume, segmentation, segmentId = self._segmentTarget()
        if not self._ensureModel():  # the weights chosen, not a default loaded by the logic
            return
        try:
            request = self.logic.prepareUncertainty(volume, segmentation, segmentId,
                                                    self.logic.getParameter(self._parameterNode, "UncertaintySamples"))
        except ValueError as error:
            self.showStatus(str(error))
            return
        self.queue.submit(request)
        self.timer.start()

    def _showOverlay(self, overlay):
        if self._reference("Uncertainty") is None:
            self._parameterNode.SetNodeReferenceID(REFERENCE_ROLES["Uncertainty"], overlay.GetID())
        slicer.util.setSliceViewerLayers(foreground=overlay, foregroundOpacity=0.5)

    def onRefineBoundaryToggled(self, checked):
        """The same clicks, decided with or without the volume's intensities near the boundary."""
        if self._updatingGUIFromParameterNode:
            return
        self.logic.setRefineBoundary(checked)
        if self.ui.liveUpdateCheckBox.checked:
            self.requestSegmentation(force=True)

    def onShowUncertaintyToggled(self, checked):
        if self._updatingGUIFromParameterNode:
            return
        overlay = self._reference("Uncertainty")
        if checked:
            self._queueUncertainty()
        elif overlay is not None:
            slicer.util.setSliceViewerLayers(foreground=None)

    # -- accept / undo / reset ----------------------------------------------------------------------------

    def _clearPrompts(self):
        """No points and no box: the next structure starts from nothing (an old box would clip it)."""
        self._restoreMarkups(_MarkupsState())
        self._undoActions = []
        self._shownMarkups = _MarkupsState()
        self._promptTarget = None
        self._forgetCandidates()
        self._lastPrompts = None

    def onAccept(self):
        """Keep the segment and start the next structure in a new segment: in the accepted one,
        the next point would replace what was just accepted."""
        _volume, segmentation, segmentId = self._segmentTarget()
        self.logic.accept(segmentation, segmentId)
        self._clearPrompts()
        if segmentation is not None:
            accepted = segmentation.GetSegmentation().GetSegment(segmentId)
            nextId = segmentation.GetSegmentation().AddEmptySegment("")
            self.logic.setParameter(self._parameterNode, "SegmentID", nextId)
            self.showStatus(_("{accepted} accepted. Place points for the next structure (in {next}).").format(
                accepted=accepted.GetName() if accepted else segmentId,
                next=segmentation.GetSegmentation().GetSegment(nextId).GetName()))
        self.updateGUIFromParameterNode()

    def onUndo(self):
        """Restore the previous result exactly (the logic's undo) and the points, ROI box and
        candidate that made it, whatever changed since: a point placed, moved or deleted, the box
        drawn, moved or resized, or a candidate chosen."""
        _volume, segmentation, segmentId = self._segmentTarget()
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            if self.logic.undo(segmentation, segmentId):
                state = self._undoActions.pop() if self._undoActions else _MarkupsState()
                self._restoreMarkups(state)
                self._setCandidate(state.requested)
                self._candidates, self._shownCandidate, self._shownMarkups = list(state.candidates), state.shown, state
            self._lastPrompts = self._currentPrompts()[3]  # the restored result matches the restored points
        self.updateGUIFromParameterNode()

    def onReset(self):
        _volume, segmentation, segmentId = self._segmentTarget()
        with slicer.util.tryWithErrorDisplay(_("Reset failed."), waitCursor=True):
            self.logic.reset(segmentation, segmentId)
            self._clearPrompts()
        self.updateGUIFromParameterNode()

    # -- model -------------------------------------------------------------------------------------------

    def onInputVolumeChanged(self, node):
        """Start embedding as soon as a volume is chosen, if a model is already loaded."""
        self._forgetCandidates()
        if node is not None and self.logic._model is not None:
            try:
                self.queue.submit(self.logic.prepareVolume(node))
                self.ui.progressBar.visible = True
                self.timer.start()
            except ValueError as error:
                self.showStatus(str(error))

    def onModelSettingsChanged(self, *args):
        """Other weights or device chosen: the model (and its sessions) reload on the next click."""
        if self._updatingGUIFromParameterNode or self.logic._model is None:
            return
        self.logic.setModel(None)
        self._forgetCandidates()
        self._lastPrompts = None  # a result dropped as stale is asked for again, with the new weights
        self.ui.modelInfoLabel.text = _("The chosen weights load on the next click (or press Load model).")

    def _ensureModel(self):
        """Install missing packages (with consent) and load the chosen weights; False if not possible."""
        if self.logic._model is not None:
            return True
        return self.onLoadModel()

    def onLoadModelButton(self):
        """Load the chosen weights now and, with live update on, show their result for the current points."""
        if self.onLoadModel() and self.logic.getParameter(self._parameterNode, "LiveUpdate"):
            self.requestSegmentation(force=True)

    def onLoadModel(self):
        import FastSAM3DDependencies

        try:
            with slicer.util.tryWithErrorDisplay(_("FastSAM3D could not load its model."), waitCursor=True):
                FastSAM3DDependencies.ensureDependencies(log=self.showStatus)
                node = self._parameterNode
                source = self.logic.getParameter(node, "ModelSource")
                path = self.logic.getParameter(node, "CheckpointPath")
                if source == "public":
                    path = str(self.logic.publicWeightsPath())
                    if not os.path.exists(path):
                        raise ValueError(_("Download the public weights first (Download public weights)."))
                model = self.logic.loadModel(source, path, self.logic.getParameter(node, "Device"))
        except Exception as error:  # already shown to the user by tryWithErrorDisplay
            self.showStatus(str(error))
            return False
        self.ui.modelInfoLabel.text = _("Model: {source}").format(source=model.config.get("source", source))
        return True

    def onDownload(self):
        """Download the public weights on a worker thread; progress shown from a timer."""
        import concurrent.futures
        import threading

        state = {"done": 0, "total": None}
        cancel = threading.Event()
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        import FastSAM3DDownload

        source = FastSAM3DDownload.PUBLIC_WEIGHTS[FastSAM3DDownload.DEFAULT_PUBLIC_WEIGHTS]
        future = executor.submit(self.logic.downloadPublicWeights, source.key,
                                 lambda done, total: state.update(done=done, total=total), cancel)
        executor.shutdown(wait=False)
        dialog = slicer.util.createProgressDialog(labelText=_("Downloading {title}...").format(title=source.title), maximum=100)
        dialog.setWindowModality(qt.Qt.NonModal)  # Slicer stays usable during a long download
        dialog.connect("canceled()", cancel.set)
        self._download = (future, dialog)
        self.ui.downloadButton.enabled = False

        def poll():
            total = state["total"]
            dialog.value = int(100 * state["done"] / total) if total else 0
            if not future.done():
                return
            downloadTimer.stop()
            dialog.close()
            self._download = None
            error = future.exception()
            if error is not None:
                slicer.util.errorDisplay(_("Download failed: {error}").format(error=error))
            else:
                self.showStatus(_("Weights ready: {path}").format(path=future.result()))
            self.updateGUIFromParameterNode()

        downloadTimer = qt.QTimer()
        downloadTimer.setInterval(200)
        downloadTimer.connect("timeout()", poll)
        downloadTimer.start()
        self._downloadTimer = downloadTimer

    def showStatus(self, text):
        logging.info(text)
        self.ui.statusLabel.text = text


#
# FastSAM3DTest
#


class FastSAM3DTest(ScriptedLoadableModuleTest):
    """What needs the Slicer application: the widget, views, markups placement and the Segment Editor.

    Run it in Slicer with Developer mode on (Edit > Application Settings > Developer): the module
    panel's "Reload and Test" button, or from the Python console
    ``slicer.util.selectModule("FastSAM3D"); slicer.modules.FastSAM3DWidget.onReloadAndTest()``;
    in a build tree ``ctest -R FastSAM3D`` (registered by FastSAM3D/CMakeLists.txt).
    The MRML-level behaviour (geometry, transforms, undo, errors) is tested without the application by
    ``Testing/tests/test_slicer_logic.py``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LogicOnSample()
        self.setUp()
        self.test_WidgetLiveUpdate()
        self.setUp()
        self.test_SegmentEditorEffect()

    # helpers

    def _sample(self):
        """The bundled Colin27 sample (64^3, 2 mm) with its left-putamen click; None if absent."""
        import json

        sample = resourceFile("Sample", "colin27_sample.json")
        if not os.path.exists(sample):
            self.skipTest("the Colin27 sample is not installed")
        with open(sample) as handle:
            info = json.load(handle)
        volume = slicer.util.loadVolume(resourceFile("Sample", info["image"]))
        clickRAS = [-info["click_point_lps_mm"][0], -info["click_point_lps_mm"][1], info["click_point_lps_mm"][2]]
        return volume, clickRAS

    def _model(self):
        """The bundled model, or a tiny random one (bookkeeping checks only) if this install has none."""
        import FastSAM3DLib

        if FastSAM3DLib.bundled_model_path() is not None:
            return FastSAM3DLib.load_model(None, device="cpu"), True
        import torch

        torch.manual_seed(0)
        return FastSAM3DLib.build_model("tiny"), False

    def _waitFor(self, queue, seconds=120):
        import time

        deadline = time.time() + seconds
        while queue.busy and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.02)
        slicer.app.processEvents()
        self.assertFalse(queue.busy, "FastSAM3D did not finish in time")

    # tests

    def test_LogicOnSample(self):
        self.delayDisplay("Logic: one click on the sample's left putamen")
        volume, clickRAS = self._sample()
        model, trained = self._model()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        target = segmentation.GetSegmentation().AddEmptySegment("putamen")
        other = segmentation.GetSegmentation().AddEmptySegment("other")
        logic = FastSAM3DLogic(model=model, device="cpu")
        logic.segmentFromPoints(volume, segmentation, other, [clickRAS], [1])
        before = logic.segmentArray(segmentation, other).copy()
        result = logic.segmentFromPoints(volume, segmentation, target, [clickRAS], [1])
        self.assertGreater(result.voxels, 0)
        self.assertTrue((logic.segmentArray(segmentation, other) == before).all())
        if trained:
            self.assertLess(result.volumeMl, 30.0)
        self.assertTrue(logic.undo(segmentation, target))
        self.assertEqual(int(logic.segmentArray(segmentation, target).sum()), 0)
        self.delayDisplay("Logic test passed")

    def test_WidgetLiveUpdate(self):
        self.delayDisplay("Widget: a placed point updates the segment on the worker, GUI responsive")
        volume, clickRAS = self._sample()
        model, _trained = self._model()
        slicer.util.selectModule("FastSAM3D")
        widget = slicer.modules.FastSAM3DWidget
        widget.logic.setModel(model)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentId = segmentation.GetSegmentation().AddEmptySegment("putamen")
        widget.ui.inputVolumeSelector.setCurrentNode(volume)
        widget.ui.segmentSelector.setCurrentNode(segmentation)
        widget.ui.segmentSelector.setCurrentSegmentID(segmentId)
        include = widget._reference("PositivePoints")
        include.AddControlPoint(*clickRAS)  # fires PointPositionDefinedEvent like a click in a view
        self._waitFor(widget.queue)
        self.assertGreater(int(widget.logic.segmentArray(segmentation, segmentId).sum()), 0)
        widget.onUndo()
        self.assertEqual(int(widget.logic.segmentArray(segmentation, segmentId).sum()), 0)
        self.assertEqual(include.GetNumberOfControlPoints(), 0)
        include.AddControlPoint(*clickRAS)
        self._waitFor(widget.queue)
        accepted = widget.logic.segmentArray(segmentation, segmentId).copy()
        widget.onAccept()  # the next structure goes to a new segment, selected in the GUI
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)
        self.assertNotEqual(widget.ui.segmentSelector.currentSegmentID(), segmentId)
        self.assertTrue((widget.logic.segmentArray(segmentation, segmentId) == accepted).all())
        self.delayDisplay("Widget test passed")

    def test_SegmentEditorEffect(self):
        self.delayDisplay("Segment Editor: the FastSAM3D effect is registered and writes through the editor")
        volume, clickRAS = self._sample()
        model, _trained = self._model()
        sharedLogic().setModel(model)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentId = segmentation.GetSegmentation().AddEmptySegment("putamen")
        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentation)
        editorWidget.setSourceVolumeNode(volume)
        editorWidget.setCurrentSegmentID(segmentId)
        editorWidget.setActiveEffectByName("FastSAM3D")
        effect = editorWidget.activeEffect()
        self.assertIsNotNone(effect, "the FastSAM3D effect is not registered")
        effect.self().addClick(clickRAS, True)
        self._waitFor(effect.self().queue)
        self.assertGreater(int(sharedLogic().segmentArray(segmentation, segmentId).sum()), 0)
        editorWidget.undo()
        self.assertEqual(int(sharedLogic().segmentArray(segmentation, segmentId).sum()), 0)
        editorWidget.setActiveEffect(None)
        self.delayDisplay("Segment Editor test passed")
