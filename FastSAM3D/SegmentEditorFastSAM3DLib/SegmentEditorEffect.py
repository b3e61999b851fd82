"""The "FastSAM3D" Segment Editor effect: click in a slice view, the selected segment follows.

Left-click adds an include point, Ctrl+left-click an exclude point (other clicks and keys go to the
views as usual). Each click re-segments the current object of the selected segment from all its
clicks so far: the engine runs on a worker thread, and the result is written through the Segment
Editor (its editable-area masking, overwrite-other-segments setting and undo apply; only the selected
segment changes). An object is added to what the segment held when its first click came, so earlier
objects and painted voxels stay.

The editor's Undo and Redo, and other effects, change the segment behind this effect's back. Before
each action the effect compares the segment with the states it wrote: one of them (the editor went
back or forward) brings back the clicks that made it; anything else (Paint, Erase, ...) is kept, and
the next click starts a new object on top of it.

Registered by the FastSAM3D module at application startup (``FastSAM3D.registerEditorEffect``).
"""

import logging
import os

import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from FastSAM3DLogic import FastSAM3DLogic, PredictionQueue, sharedLogic, shownCandidate

SHOW_CLICKS = "FastSAM3D.ShowClicks"


def _moduleResource(*parts):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for base in (here, os.path.dirname(here)):
        path = os.path.join(base, "Resources", *parts)
        if os.path.exists(path):
            return path
    return ""


class _SegmentState:
    """The selected segment as the effect left it, and the clicks that made it."""

    def __init__(self, stamp, fingerprint, clicks, candidate, candidates):
        self.stamp = stamp  # FastSAM3DLogic.segmentStamp: cheap, changes with any edit of the layer
        self.fingerprint = fingerprint
        self.clicks = list(clicks)
        self.candidate = candidate
        self.candidates = list(candidates)


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Click-based 3D segmentation of the selected segment."""

    POLL_MS = 100

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "FastSAM3D"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.clicks = []  # (RAS world, positive) of the current object, in click order
        self.clickTarget = None  # (segmentation node ID, segment ID) the clicks belong to
        self.candidate = None  # the candidate mask asked for the first click (None: the model's pick)
        self.candidates = []  # predicted IoUs of the last result's candidates (after a lone click)
        self.base = None  # the segment's voxels when the object's first click came (kept under its masks)
        self.states = []  # _SegmentState of the object: before its first click, then after each write
        self.clickNodes = None
        self.queue = None
        self.timer = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = _moduleResource("Icons", "SegmentEditorFastSAM3D.png")
        return qt.QIcon(path) if path else qt.QIcon()

    def helpText(self):
        return (
            "<html>Segment the selected segment in 3D from clicks (FastSAM3D).<p>"
            "<b>Left-click</b>: include point. <b>Ctrl + left-click</b>: exclude point.<br>"
            "Every click re-segments the current object from its clicks so far and adds it to what the segment held "
            "before the object's first click. The editor's masking and undo apply; after the editor's Undo the clicks "
            "follow the segment back.</p>"
            "<p>The first click on a volume waits for its embedding (a progress bar shows it).</p></html>"
        )

    # -- options -------------------------------------------------------------------------------

    def setupOptionsFrame(self):
        self.statusLabel = qt.QLabel("Click in a slice view: left = include, Ctrl+left = exclude.")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.showClicksCheckBox = qt.QCheckBox("Show clicks")
        self.showClicksCheckBox.toolTip = "Show the clicks as green (include) and red (exclude) points."
        self.scriptedEffect.addOptionsWidget(self.showClicksCheckBox)
        self.refineCheckBox = qt.QCheckBox("Refine boundary")
        self.refineCheckBox.toolTip = ("Where the model is unsure of the boundary, let the volume's intensities decide "
                                       "(shared with the FastSAM3D module; the current clicks are decided again).")
        self.scriptedEffect.addOptionsWidget(self.refineCheckBox)
        buttons = qt.QHBoxLayout()
        self.undoClickButton = qt.QPushButton("Remove last click")
        self.undoClickButton.toolTip = "Re-segment without the last click (the editor's Undo restores the previous result exactly)."
        self.clearClicksButton = qt.QPushButton("New object")
        self.clearClicksButton.toolTip = ("Keep the segment as it is and forget the clicks: the next click starts another "
                                          "object, added to the segment.")
        self.candidateButton = qt.QPushButton("Other candidate")
        self.candidateButton.toolTip = ("One click can mean nested structures (a nucleus, the striatum, the brain): show the "
                                        "model's next candidate mask for it. Later clicks refine the one shown.")
        self.candidateButton.enabled = False
        buttons.addWidget(self.undoClickButton)
        buttons.addWidget(self.clearClicksButton)
        buttons.addWidget(self.candidateButton)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.showClicksCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.refineCheckBox.connect("toggled(bool)", self.onRefineBoundaryToggled)
        self.undoClickButton.connect("clicked()", self.onRemoveLastClick)
        self.clearClicksButton.connect("clicked()", self.onNewObject)
        self.candidateButton.connect("clicked()", self.onOtherCandidate)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault(SHOW_CLICKS, 1)

    def updateGUIFromMRML(self):
        for checkBox, checked in ((self.showClicksCheckBox, self.scriptedEffect.integerParameter(SHOW_CLICKS) != 0),
                                  (self.refineCheckBox, sharedLogic().refineBoundary)):
            wasBlocked = checkBox.blockSignals(True)
            try:
                checkBox.checked = checked
            finally:
                checkBox.blockSignals(wasBlocked)
        self._updateClickDisplay()

    def onRefineBoundaryToggled(self, checked):
        """The same clicks, decided with or without the volume's intensities near the boundary."""
        logic = sharedLogic()
        logic.setRefineBoundary(checked)
        if hasattr(logic, "getParameterNode"):  # the module's setting too, or opening its panel would set it back
            logic.setParameter(logic.getParameterNode(), "RefineBoundary", bool(checked))
        self._followSegment()
        if self.clicks:
            self._submit(newClick=False)

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter(SHOW_CLICKS, 1 if self.showClicksCheckBox.checked else 0)

    def createCursor(self, widget):
        return qt.QCursor(qt.Qt.CrossCursor)

    # -- activation ------------------------------------------------------------------------------

    def activate(self):
        self.logic = sharedLogic()
        if self.queue is None:
            self.queue = PredictionQueue()
        if self.timer is None:
            self.timer = qt.QTimer()
            self.timer.setInterval(self.POLL_MS)
            self.timer.connect("timeout()", self.onPoll)

    def deactivate(self):
        if self.timer is not None:
            self.timer.stop()
        self._forgetClicks()
        self._removeClickNodes()

    # -- clicks ----------------------------------------------------------------------------------

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        """Use plain and Ctrl left clicks in slice views; pass everything else on."""
        abortEvent = False
        if eventId != vtk.vtkCommand.LeftButtonPressEvent or viewWidget.className() != "qMRMLSliceWidget":
            return abortEvent
        if callerInteractor.GetShiftKey() or callerInteractor.GetAltKey():
            return abortEvent
        ras = self.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
        self.addClick(ras, positive=not callerInteractor.GetControlKey())
        abortEvent = True
        return abortEvent

    def _target(self):
        node = self.scriptedEffect.parameterSetNode()
        segmentation = node.GetSegmentationNode() if node else None
        return node, segmentation, node.GetSelectedSegmentID() if node else None

    def addClick(self, rasWorld, positive=True):
        """Add a click (world RAS) to the selected segment and queue its re-segmentation."""
        node, segmentation, segmentId = self._target()
        volume = node.GetSourceVolumeNode() if node else None
        if segmentation is None or volume is None or not segmentId:
            self._status("Select a source volume and a segment first.")
            return
        target = (segmentation.GetID(), segmentId)
        if target != self.clickTarget:  # another segment selected: its own clicks
            self._forgetClicks()
            self.clickTarget = target
        self._followSegment()
        if not self.states:  # a new object, on top of what the segment holds now
            self.base = self.logic.segmentLabelmap(segmentation, segmentId)
            self.states = [_SegmentState(self.logic.segmentStamp(segmentation, segmentId),
                                         self.logic.labelmapFingerprint(self.base), [], None, [])]
        self.clicks.append((tuple(float(v) for v in rasWorld[:3]), bool(positive)))
        self._updateClickDisplay()
        self._submit()

    def onRemoveLastClick(self):
        self._followSegment()
        if not self.clicks:
            return
        self.clicks.pop()
        self._updateClickDisplay()
        if self.clicks:
            self._submit(newClick=False)
        else:  # the object's only click: the segment goes back to what it held before the object
            self._restoreBase()

    def _restoreBase(self):
        try:
            written = self.logic.restoreThroughSegmentEditor(
                self.scriptedEffect, self.base, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
        except Exception as error:  # the segmentation is unchanged; say why
            self._status(f"FastSAM3D could not write the segment: {error}")
            logging.exception("FastSAM3D effect restore failed")
            return
        self.candidate, self.candidates = None, []
        self.candidateButton.enabled = False
        if written:  # the next click starts a new object
            self.base, self.states = None, []
            self._status("Click removed: the segment is as it was before it.")
        else:
            self._status("Segment is hidden: not changed.")

    def onOtherCandidate(self):
        """Show the next candidate mask of the lone click (the editor's Undo restores the previous one)."""
        self._followSegment()
        if len(self.candidates) < 2 or len(self.clicks) != 1:
            return
        previous, self.candidate = self.candidate, (shownCandidate(self.candidates, self.candidate) + 1) % len(self.candidates)
        if not self._submit(newClick=False):
            self.candidate = previous

    def onNewObject(self):
        node, segmentation, segmentId = self._target()
        if segmentation is not None and segmentId:
            self.logic.accept(segmentation, segmentId)
        self._forgetClicks()

    def _forgetClicks(self):
        self.clicks = []
        self.clickTarget = None
        self.candidate = None
        self.candidates = []
        self.base = None
        self.states = []
        self._updateClickDisplay()

    def _followSegment(self):
        """Bring the clicks in line with the segment, which the editor's Undo/Redo and other effects
        change without telling this effect (see the module docstring)."""
        if not self.states or self.queue is None or self.queue.busy:
            return  # no object yet, or a result is on its way (the next action looks again)
        _node, segmentation, segmentId = self._target()
        if segmentation is None or (segmentation.GetID(), segmentId) != self.clickTarget:
            return
        if segmentation.GetSegmentation().GetSegment(segmentId) is None:
            self._forgetClicks()
            return
        stamp = self.logic.segmentStamp(segmentation, segmentId)
        if stamp == self.states[-1].stamp:
            return  # untouched since the effect last looked: no need to read the voxels
        current = self.logic.segmentFingerprint(segmentation, segmentId)
        if current == self.states[-1].fingerprint:
            self.states[-1].stamp = stamp  # another segment of the same layer changed
            return
        for state in reversed(self.states):
            if state.fingerprint == current:  # the editor's Undo (or Redo) went back to this state
                self.clicks, self.candidate, self.candidates = list(state.clicks), state.candidate, list(state.candidates)
                state.stamp = stamp
                self.states.append(state)
                self._updateClickDisplay()
                self.candidateButton.enabled = len(self.candidates) > 1 and len(self.clicks) == 1
                self._status(f"Segment restored by the editor: back to {len(self.clicks)} click(s).")
                return
        # Edited otherwise (Paint, Erase, another effect): keep it; the next click starts a new object.
        self.logic.accept(segmentation, segmentId)
        target = self.clickTarget
        self._forgetClicks()
        self.clickTarget = target
        self.candidateButton.enabled = False
        self._status("The segment was edited by another tool: the next click starts a new object on top of it.")

    def _segmentState(self, segmentation, segmentId, clicks, candidate, candidates):
        return _SegmentState(self.logic.segmentStamp(segmentation, segmentId), self.logic.segmentFingerprint(segmentation, segmentId),
                             clicks, candidate, candidates)

    def _submit(self, newClick: bool = True) -> bool:
        """Queue the segmentation of the current clicks; False (and the reason shown) if it cannot be.

        ``newClick``: the last click was just added, and is taken back if the request is refused.
        """
        node, segmentation, segmentId = self._target()
        volume = node.GetSourceVolumeNode()
        points = [c[0] for c in self.clicks]
        labels = [1 if c[1] else 0 for c in self.clicks]
        qt.QApplication.setOverrideCursor(qt.Qt.BusyCursor)
        try:
            if self.logic._model is None:
                import FastSAM3DDependencies

                FastSAM3DDependencies.ensureDependencies(log=self._status)
                self.logic.loadModel("bundled")
            request = self.logic.prepareSegmentation(volume, segmentation, segmentId, points, labels, candidate=self.candidate)
        except Exception as error:  # explained to the user; nothing was changed
            if newClick:
                self.clicks.pop()
            self._updateClickDisplay()
            hint = " Choose weights in the FastSAM3D module (Model section)." if self.logic._model is None else ""
            self._status(f"{error}{hint}")
            logging.warning("FastSAM3D effect: %s", error)
            return False
        finally:
            qt.QApplication.restoreOverrideCursor()
        request.effectState = (list(self.clicks), self.candidate)  # what the result will stand for
        request.segmentStamp = self.logic.segmentStamp(segmentation, segmentId)  # what it will be written over
        self.queue.submit(request)
        self.progressBar.visible = True
        self.timer.start()
        return True

    def onPoll(self):
        """Main thread: show embedding progress and write finished masks through the editor."""
        node, segmentation, segmentId = self._target()
        volume = node.GetSourceVolumeNode() if node else None
        progress = self.logic.sessionProgress(volume)
        self.progressBar.value = int(100 * float(progress.get("fraction", 0.0)))
        self.progressBar.setFormat(f"{progress.get('stage', '')} %p%")
        for request, mask, error, superseded in self.queue.poll():
            if error is not None:
                self._status(f"FastSAM3D failed: {error}")
                continue
            if superseded or (request.segmentationNodeID, request.segmentID) != (
                    segmentation.GetID() if segmentation else None, segmentId):
                continue  # a newer click is on its way, or the user selected another segment
            if request.effectState != (self.clicks, self.candidate):
                continue  # the clicks changed since (a click removed, a new object)
            if self._changedByOthers(segmentation, segmentId, request):
                # The editor's Undo or another tool changed the segment while the click computed: that
                # change stands, and the clicks follow the segment once the queue is idle.
                self._status("The segment changed while the click was computed (the editor's Undo or another tool): "
                             "that change is kept; click again.")
                continue
            sourceVolume = request.scene.GetNodeByID(request.volumeNodeID)
            try:
                written = self.logic.applyMaskThroughSegmentEditor(
                    self.scriptedEffect, sourceVolume, mask, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet,
                    base=self.base)
                ious, shown = request.candidates
                self.candidates = ious
                self.candidateButton.enabled = len(ious) > 1
                if written:
                    clicks, candidate = request.effectState
                    self.states.append(self._segmentState(segmentation, segmentId, clicks, candidate, ious))
                status = f"{len(self.clicks)} click(s): segment updated." if written else "Segment is hidden: not changed."
                if written and ious:
                    status += f" Candidate {shownCandidate(ious, shown) + 1} of {len(ious)}."
                self._status(status)
            except Exception as error:  # the segmentation is unchanged; say why
                self._status(f"FastSAM3D could not write the segment: {error}")
                logging.exception("FastSAM3D effect apply failed")
        if not self.queue.busy and progress.get("stage") in ("ready", "idle"):
            self.timer.stop()
            self.progressBar.visible = False

    def _changedByOthers(self, segmentation, segmentId, request) -> bool:
        """Whether the segment's voxels differ from both what they were when ``request`` was made
        and what this effect last wrote. The stamp says first (it also moves when another segment
        of the same layer is edited); the voxels decide."""
        stamp = self.logic.segmentStamp(segmentation, segmentId)
        if stamp == request.segmentStamp or (self.states and stamp == self.states[-1].stamp):
            return False
        return not self.states or self.logic.segmentFingerprint(segmentation, segmentId) != self.states[-1].fingerprint

    def _status(self, text):
        if hasattr(self, "statusLabel"):
            self.statusLabel.text = text

    # -- click display ------------------------------------------------------------------------------

    def _updateClickDisplay(self):
        show = self.scriptedEffect.integerParameter(SHOW_CLICKS) != 0 if self.scriptedEffect.parameterSetNode() else True
        if not self.clicks and self.clickNodes is None:
            return
        if self.clickNodes is None:
            include, exclude = FastSAM3DLogic.createPromptNodes(slicer.mrmlScene, "FastSAM3D editor")
            for markups in (include, exclude):
                markups.SetLocked(True)  # shown only; clicks belong to the effect
                markups.SetHideFromEditors(True)
                markups.SetSaveWithScene(False)
            self.clickNodes = (include, exclude)
        include, exclude = self.clickNodes
        for markups, positive in ((include, True), (exclude, False)):
            with slicer.util.NodeModify(markups):
                markups.RemoveAllControlPoints()
                for ras, isPositive in self.clicks:
                    if isPositive == positive:
                        markups.AddControlPointWorld(list(ras))
            if markups.GetDisplayNode() is not None:
                markups.GetDisplayNode().SetVisibility(show)

    def _removeClickNodes(self):
        if self.clickNodes is not None:
            for markups in self.clickNodes:
                if slicer.mrmlScene.IsNodePresent(markups):
                    slicer.mrmlScene.RemoveNode(markups)
            self.clickNodes = None
