"""ExtremeAug: delineate one scan, get a working segmentation model, correct, retrain.

Module, parameter node, Widget (GUI only), Logic (console API) and self-test. Everything
below Qt lives in ``ExtremeAugLib`` (tested in CI against the real MRML core); training and
prediction run in a background process through the engine's command line.

Name clash, on purpose: the engine package is called ``ExtremeAugLogic`` and, by Slicer
convention, so is this module's Logic class. In this file the name ``ExtremeAugLogic`` is the
class. The engine is never imported under that name here: it runs as
``python -m ExtremeAugLogic`` in a subprocess, and the self-test reaches its phantom with
``importlib.import_module("ExtremeAugLogic.demo.phantom")``, which resolves through ``sys.modules``
/ ``sys.path`` to the engine package (the class defined here does not shadow it there).
"""

import importlib
import importlib.util
import inspect
import logging
import os
import pathlib
import re
import sys
import tempfile
import time
import unittest
from typing import Annotated

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, Decimals, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

    def translate(context, text):
        return text

from ExtremeAugLib import mrml_bridge, status_text
from ExtremeAugLib.engine_cli import findEngineRoot
from ExtremeAugLib.loop_logic import LoopLogic, cleanPath
from ExtremeAugLib.training_process import defaultPythonExecutable

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS_FILE = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
DEFAULT_WORKSPACE = pathlib.Path.home() / "ExtremeAug-workspace"


def importEngineModule(name):
    """An engine submodule, e.g. ``importEngineModule("demo.phantom")`` (engine folder added to sys.path)."""
    root = str(findEngineRoot(MODULE_DIR))
    if root not in sys.path:
        sys.path.append(root)
    return importlib.import_module(f"ExtremeAugLogic.{name}")


#
# Module
#

class ExtremeAug(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ExtremeAug")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ExtremeAug contributors"]
        self.parent.helpText = _(
            "Delineate one scan, get a working segmentation model. A background process trains a "
            "residual U-Net with extreme augmentation; its prediction for the next scan appears as an "
            "editable segmentation; correct it, accept it and retrain. "
            "See <a href='https://github.com/ExtremeAug/SlicerExtremeAug#readme'>the documentation</a>.")
        self.parent.acknowledgementText = _(
            "Implements the extreme augmentation method of Gaonkar et al. and a 3D residual "
            "encoder-decoder after Rippel et al. (MSD 2018), with MONAI building blocks.")


#
# Parameter node
#

@parameterNodeWrapper
class ExtremeAugParameterNode:
    """The panel's state, saved with the scene.

    workspace - folder with the training set and models.
    inputVolume - the scan to add, segment or correct.
    segmentation - its delineation (or the prediction being corrected).
    modelVersion - version used to segment ("" = the best one).
    modelType, level, minutes, device - training settings.
    processes - training processes (1; more: torchrun, one per GPU or several on the CPU).
    pythonExecutable - Python that runs the engine (Slicer's own by default).
    """

    workspace: pathlib.Path = DEFAULT_WORKSPACE
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    modelVersion: str = ""
    modelType: Annotated[str, Choice(["2d", "3d"])] = "2d"
    level: Annotated[int, WithinRange(0, 1000)] = 50
    minutes: Annotated[float, WithinRange(0.5, 1440.0), Decimals(1)] = 8.0
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    processes: Annotated[int, WithinRange(1, 64)] = 1
    pythonExecutable: pathlib.Path = pathlib.Path(defaultPythonExecutable())


#
# Widget
#

class ExtremeAugWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: wires the panel to the Logic and polls the training status every second."""

    POLL_INTERVAL_MS = 1000
    CHART_INTERVAL_S = 5.0
    VERSION_REFRESH_POLLS = 5

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._predictionJob = None
        self._versionRows = None
        self._pollCount = 0
        self._lastPhase = None
        self._chartPoints = 0
        self._chartDrawnAt = 0.0
        self._roundRows = None
        self._roundsChartStamp = None
        self._defaultToolTips = {}

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ExtremeAug.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ExtremeAugLogic()
        self.logic.logCallback = self.showMessage

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.addTrainingScanButton.connect("clicked(bool)", self.onAddTrainingScan)
        self.ui.addToWorklistButton.connect("clicked(bool)", self.onAddToWorklist)
        self.ui.nextScanButton.connect("clicked(bool)", self.onNextScan)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainOrStop)
        self.ui.retrainButton.connect("clicked(bool)", self.onRetrain)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentOrCancel)
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.acceptCorrectionButton.connect("clicked(bool)", self.onAcceptCorrection)
        self.ui.modelVersionComboBox.connect("currentIndexChanged(int)", self.onModelVersionChanged)
        self.ui.versionsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.ResizeToContents)
        self.ui.roundsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.ResizeToContents)
        for button in self._actionButtons().values():
            self._defaultToolTips[button.objectName] = button.toolTip

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPoll)
        self.initializeParameterNode()

    def _actionButtons(self):
        return {"add": self.ui.addTrainingScanButton, "worklist": self.ui.addToWorklistButton,
                "next": self.ui.nextScanButton,
                "train": self.ui.trainButton,
                "retrain": self.ui.retrainButton, "segment": self.ui.segmentButton,
                "edit": self.ui.openSegmentEditorButton, "accept": self.ui.acceptCorrectionButton}

    def cleanup(self):
        """Module closing: stop polling. A running training keeps going (reopen the module to follow it)."""
        self.pollTimer.stop()
        if self._predictionJob is not None:
            self._predictionJob.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        self.pollTimer.start()
        self.onPoll()

    def exit(self):
        self.pollTimer.stop()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        if self._predictionJob is not None:
            self._predictionJob.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        """Pass workspace and Python choices to the Logic; refresh what depends on them."""
        p = self._parameterNode
        if p is None:
            return
        try:
            if cleanPath(p.workspace) != self.logic.workspace:
                self.logic.setWorkspace(p.workspace)
                self._versionRows = self._roundRows = self._roundsChartStamp = None
            self.logic.setPythonExecutable(p.pythonExecutable)
        except ValueError as error:
            self.showMessage(str(error))
        self.updateVersions()
        self.updateRounds()
        self.updateButtonStates()

    # ------------------------------------------------------------ actions

    def onAddTrainingScan(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to add the training scan."), waitCursor=True):
            p = self._parameterNode
            caseId = self.logic.addTrainingScan(p.inputVolume, p.segmentation)
            self.showMessage(_("'{name}' is training case {caseId}. Press Train (first model) or Retrain.").format(
                name=p.inputVolume.GetName(), caseId=caseId))
        self.updateVersions(force=True)
        self.updateButtonStates()

    def onAddToWorklist(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to add the scan to the worklist."), waitCursor=True):
            p = self._parameterNode
            caseId = self.logic.addToWorklist(p.inputVolume)
            self.showMessage(_("'{name}' waits in the worklist as {caseId} ({count} scan(s) without a label).").format(
                name=p.inputVolume.GetName(), caseId=caseId, count=len(self.logic.worklist())))
        self.updateButtonStates()

    def onNextScan(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to load the next worklist scan."), waitCursor=True):
            volumeNode, segmentationNode = self.logic.loadNextScan(slicer.mrmlScene)
            p = self._parameterNode
            p.inputVolume = volumeNode
            if segmentationNode is not None:
                p.segmentation = segmentationNode
                slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
            self.showMessage(_("'{name}' loaded{what}. Correct it, then press Accept correction.").format(
                name=volumeNode.GetName(),
                what=_(" with its prediction") if segmentationNode is not None else _(" (its prediction is not ready)")))
        self.updateButtonStates()

    def onTrainOrStop(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to start or stop the training."), waitCursor=True):
            if self.logic.isTraining():
                self.logic.stopTraining()
            else:
                self._startTraining(initFrom=None)
        self.onPoll()

    def onRetrain(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to start the training."), waitCursor=True):
            self._startTraining(initFrom="best")
        self.onPoll()

    def _startTraining(self, initFrom):
        p = self._parameterNode
        self.logic.ensureDependencies()
        minutes = LoopLogic.retrainMinutes(p.minutes) if initFrom else p.minutes
        self.logic.startTraining(minutes=minutes, level=p.level, modelType=p.modelType, device=p.device,
                                 initFrom=initFrom, processes=p.processes)
        self._chartPoints = 0
        self.ui.chartLabel.clear()
        self.ui.chartLabel.text = _("Waiting for the first training iterations...")

    def onSegmentOrCancel(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to segment the scan."), waitCursor=True):
            if self._predictionJob is not None and self._predictionJob.isRunning():
                self._predictionJob.cancel()
                return
            p = self._parameterNode
            self.logic.ensureDependencies()
            self._predictionJob = self.logic.startSegmentScan(
                p.inputVolume, callback=self.onSegmentFinished, version=p.modelVersion or None,
                device=None if p.device == "auto" else p.device)
        self.updateButtonStates()

    def onSegmentFinished(self, job):
        if job is self._predictionJob:
            self._predictionJob = None
        if job.cancelled:
            self.showMessage(_("Segmentation cancelled."))
        else:
            with slicer.util.tryWithErrorDisplay(_("Segmentation failed.")):
                segmentationNode = job.result()
                self._parameterNode.segmentation = segmentationNode
                slicer.util.setSliceViewerLayers(background=job.volumeNode, fit=True)
                self.showMessage(_("Correct '{name}' with Open Segment Editor, then press Accept correction.").format(
                    name=segmentationNode.GetName()))
        self.updateButtonStates()

    def onOpenSegmentEditor(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to open the Segment Editor."), waitCursor=True):
            p = self._parameterNode
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(p.segmentation)
            if p.inputVolume:
                setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
                setSource(p.inputVolume)

    def onAcceptCorrection(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to accept the correction."), waitCursor=True):
            p = self._parameterNode
            caseId, changed = self.logic.acceptCorrection(p.inputVolume, p.segmentation)
            self.showMessage(_("Correction accepted as case {caseId} ({changed} voxels changed; queued: {queued}). "
                               "Press Retrain to learn from it.").format(caseId=caseId, changed=changed,
                                                                         queued=len(self.logic.queued())))
        self.updateVersions(force=True)
        self.updateRounds()
        self.updateButtonStates()

    def onModelVersionChanged(self, index):
        if self._parameterNode is None or index < 0:
            return
        text = self.ui.modelVersionComboBox.currentText
        self._parameterNode.modelVersion = "" if text == "best" else text

    # ------------------------------------------------------------- display

    def onPoll(self):
        """Every second while the module is shown: training status, chart, versions, buttons."""
        if self.logic is None or self._parameterNode is None:
            return
        status = self.logic.trainingStatus()
        self.ui.trainingProgressBar.value = status_text.progressPercent(status)
        self.ui.trainingPhaseLabel.text = status_text.describeStatus(status)
        self.ui.etaLabel.text = status_text.formatDuration(status.get("eta_s")) if status["running"] else "-"
        self.ui.lossLabel.text = status_text.formatNumber(status.get("loss"), 4)
        self.ui.diceLabel.text = status_text.formatNumber(status.get("val_dice"))
        phaseChanged = status["phase"] != self._lastPhase
        self._lastPhase = status["phase"]
        self._pollCount += 1
        self.updateChart(force=phaseChanged)
        if phaseChanged or self._pollCount % self.VERSION_REFRESH_POLLS == 0:
            self.updateVersions()
            self.updateRounds()
        self.updateButtonStates(status)

    def updateChart(self, force=False):
        history = self.logic.trainingHistory
        if len(history) == self._chartPoints:
            return
        if not force and time.time() - self._chartDrawnAt < self.CHART_INTERVAL_S:
            return
        from ExtremeAugLib.training_chart import renderChart

        self._chartPoints, self._chartDrawnAt = len(history), time.time()
        try:
            path = renderChart(history, os.path.join(slicer.app.temporaryPath, "ExtremeAug", "chart.png"))
        except ImportError:
            self.ui.chartLabel.text = _("Install matplotlib to see the training chart.")
            return
        if path:
            self.ui.chartLabel.setPixmap(qt.QPixmap(str(path)))

    def updateVersions(self, force=False):
        rows = self.logic.modelVersions()
        if rows == self._versionRows and not force:
            return
        self._versionRows = rows
        table = self.ui.versionsTable
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            texts = (row["name"], row["status"], status_text.describeScore(row), status_text.describeBest(row))
            for c, text in enumerate(texts):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        combo = self.ui.modelVersionComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem("best")
        for row in rows:
            if row["status"] == "done":
                combo.addItem(row["name"])
        wanted = self._parameterNode.modelVersion if self._parameterNode else ""
        combo.setCurrentIndex(max(0, combo.findText(wanted)) if wanted else 0)
        combo.blockSignals(wasBlocked)

    def updateRounds(self):
        """The rounds table, the queued count and rounds.png (reloaded when the engine redrew it)."""
        rows = self.logic.rounds()
        queued = self.logic.queued()
        self.ui.queuedLabel.text = _("queued: {count}{ids}").format(
            count=len(queued), ids=f" ({', '.join(queued)})" if queued else "")
        if rows != self._roundRows:
            self._roundRows = rows
            table = self.ui.roundsTable
            table.setRowCount(len(rows))
            for r, row in enumerate(rows):
                for c, text in enumerate(status_text.roundCells(row)):
                    table.setItem(r, c, qt.QTableWidgetItem(text))
        path = self.logic.roundsChart()
        stamp = (str(path), path.stat().st_mtime_ns) if path else None
        if stamp != self._roundsChartStamp:
            self._roundsChartStamp = stamp
            if path:
                self.ui.roundsChartLabel.setPixmap(qt.QPixmap(str(path)))
            else:
                self.ui.roundsChartLabel.clear()
                self.ui.roundsChartLabel.text = _("Dice and correction effort per round appear here once a "
                                                  "correction is accepted.")

    def updateButtonStates(self, status=None):
        """Enable what can run now; a disabled button's tooltip says why."""
        p = self._parameterNode
        if p is None:
            return
        predicting = self._predictionJob is not None and self._predictionJob.isRunning()
        training = status["running"] if status else self.logic.isTraining()
        blockers = self.logic.actionBlockers(p.inputVolume, p.segmentation, predicting=predicting)
        for action, button in self._actionButtons().items():
            reason = blockers[action]
            button.enabled = reason is None
            button.toolTip = reason or self._defaultToolTips.get(button.objectName, "")
        self.ui.trainButton.text = _("Stop") if training else _("Train")
        if training:
            self.ui.trainButton.toolTip = _("Stop the training; the last checkpoint is kept.")
        self.ui.segmentButton.text = _("Cancel") if predicting else _("Segment this scan")

    def showMessage(self, message):
        self.ui.statusLabel.text = message
        slicer.util.showStatusMessage(message, 5000)


#
# Logic
#

class ExtremeAugLogic(ScriptedLoadableModuleLogic, LoopLogic):
    """Console API (see README-console.md). Usable without the Widget:

    logic = slicer.util.getModuleLogic("ExtremeAug") or ExtremeAug.ExtremeAugLogic()
    logic.setWorkspace("/data/spine-ws")
    caseId = logic.addTrainingScan(volumeNode, segmentationNode)
    logic.startTraining(minutes=5); logic.waitForTraining()
    segmentationNode = logic.segmentScan(nextVolumeNode)
    caseId, changedVoxels = logic.acceptCorrection(nextVolumeNode, segmentationNode)
    volumeNode, segmentationNode = logic.loadNextScan(slicer.mrmlScene)  # the suggested worklist scan
    logic.rounds(); logic.queued(); logic.roundsChart()
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        LoopLogic.__init__(self, tempDirectory=os.path.join(slicer.app.temporaryPath, "ExtremeAug"))
        self._jobTimers = {}
        self._dependenciesChecked = False

    def getParameterNode(self):
        return ExtremeAugParameterNode(super().getParameterNode())

    # ---------------------------------------------------- dependencies

    def usesSlicerPython(self):
        def canonical(path):
            return os.path.normcase(os.path.realpath(str(path)))
        return canonical(self.pythonExecutable) == canonical(defaultPythonExecutable())

    def ensureDependencies(self):
        """Install torch (PyTorch extension) and the engine's packages into Slicer's Python, with consent.

        Nothing is installed for another Python executable: that environment is the user's.
        """
        if self._dependenciesChecked or not self.usesSlicerPython():
            return
        if importlib.util.find_spec("torch") is None:
            self._installTorch()
        self._installRequirements()
        self._dependenciesChecked = True

    def _installTorch(self):
        try:
            import PyTorchUtils
        except ImportError:
            raise ValueError(_("ExtremeAug needs PyTorch: install the 'PyTorch' extension from the "
                               "Extensions Manager and restart Slicer.")) from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)
        if torch is None:
            raise ValueError(_("PyTorch is required to train and segment; installation was cancelled."))

    def _installRequirements(self):
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.12
            options = {"requester": "ExtremeAug"}
            if "skip_packages" in inspect.signature(packaging.pip_ensure).parameters:
                options["skip_packages"] = ["torch"]  # torch only ever comes from the PyTorch extension
            packaging.pip_ensure(packaging.load_requirements(REQUIREMENTS_FILE), **options)
            return
        missing = [line for line in readRequirements(REQUIREMENTS_FILE) if not isImportable(line)]
        if not missing:
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("ExtremeAug needs these Python packages: {packages}. Install them now?").format(
                    packages=", ".join(missing)), windowTitle="ExtremeAug"):
            raise ValueError(_("The required Python packages were not installed."))
        slicer.util.pip_install(missing)

    # ---------------------------------------------------- prediction

    def startSegmentScan(self, volumeNode, callback=None, version=None, device=None):
        """As LoopLogic.startSegmentScan, polled by a Qt timer so the callback runs without anyone waiting."""
        job = LoopLogic.startSegmentScan(self, volumeNode, callback, version, device)
        timer = qt.QTimer()
        timer.setInterval(500)

        def poll():
            if job.poll():
                timer.stop()
                self._jobTimers.pop(id(job), None)

        timer.connect("timeout()", poll)
        self._jobTimers[id(job)] = timer
        timer.start()
        return job


def readRequirements(path):
    """Requirement lines of a requirements.txt (comments and blanks dropped)."""
    with open(path, encoding="utf-8") as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


IMPORT_NAMES = {"simpleitk": "SimpleITK", "scikit-image": "skimage", "pillow": "PIL"}


def isImportable(requirement):
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()
    return importlib.util.find_spec(IMPORT_NAMES.get(name, name.replace("-", "_"))) is not None


#
# Test
#

class ExtremeAugTest(ScriptedLoadableModuleTest):
    """The whole loop on the phantom: add -> train -> segment -> accept -> retrain -> segment.

    Budgets and the Dice bar can be changed with EXTREMEAUG_SELFTEST_ITERATIONS,
    EXTREMEAUG_SELFTEST_RETRAIN_ITERATIONS, EXTREMEAUG_SELFTEST_MIN_DICE and
    EXTREMEAUG_SELFTEST_DEVICE.
    """

    ITERATIONS = int(os.environ.get("EXTREMEAUG_SELFTEST_ITERATIONS", "300"))
    RETRAIN_ITERATIONS = int(os.environ.get("EXTREMEAUG_SELFTEST_RETRAIN_ITERATIONS", "150"))
    MIN_DICE = float(os.environ.get("EXTREMEAUG_SELFTEST_MIN_DICE", "0.4"))
    DEVICE = os.environ.get("EXTREMEAUG_SELFTEST_DEVICE", "auto")
    TIMEOUT_S = 1800

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ExtremeAugLoop()

    def test_ExtremeAugLoop(self):
        missing = [name for name in ("torch", "monai", "scipy") if importlib.util.find_spec(name) is None]
        if missing:
            raise unittest.SkipTest(f"ExtremeAug self-test needs {', '.join(missing)} in Slicer's Python")
        self.delayDisplay("Making three phantom scans")
        phantom = importEngineModule("demo.phantom")
        names = phantom.phantom_names()
        scans, truths = [], []
        for index, seed in enumerate((11, 12, 13)):
            image, label = phantom.make_phantom(seed)
            scans.append(mrml_bridge.imageToVolumeNode(image, slicer.mrmlScene, f"Phantom {index + 1}"))
            truths.append(label)
        delineation = mrml_bridge.labelImageToSegmentation(truths[0], scans[0], names, nodeName="Phantom 1 delineation")

        logic = ExtremeAugLogic()
        logic.setWorkspace(tempfile.mkdtemp(prefix="ExtremeAugTest-", dir=slicer.app.temporaryPath))
        caseId = logic.addTrainingScan(scans[0], delineation)
        self.assertEqual(logic.caseIds(), [caseId])
        self.assertEqual(logic.structureNames(), names)

        self.delayDisplay(f"Training {self.ITERATIONS} iterations")
        logic.startTraining(iterations=self.ITERATIONS, modelType="2d", device=self.DEVICE)
        status = logic.waitForTraining(timeout=self.TIMEOUT_S)
        self.assertEqual(status["phase"], "done", status.get("error"))

        self.delayDisplay("Segmenting phantom 2")
        prediction = logic.segmentScan(scans[1], timeout=self.TIMEOUT_S)
        self.assertEqual(mrml_bridge.segmentNames(prediction), list(names.values()))
        predictedLabel = self._labelOf(prediction, scans[1], names)
        dice = meanDice(predictedLabel, truths[1], names)
        logging.info(f"ExtremeAug self-test: Dice after one scan {dice:.3f}")
        self.assertGreater(dice, self.MIN_DICE)

        self.delayDisplay("Correcting the prediction and accepting it")
        truthArray = _array(truths[1])
        for value, name in names.items():
            segmentId = prediction.GetSegmentation().GetSegmentIdBySegmentName(name)
            slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                mrml_bridge.maskToOrientedImage(truthArray == value, scans[1]), prediction, segmentId,
                slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
        correctedCase, changed = logic.acceptCorrection(scans[1], prediction)
        self.assertEqual(changed, mrml_bridge.countChangedVoxels(predictedLabel, truths[1]))
        self.assertIn(correctedCase, logic.caseIds())
        rounds = logic.rounds()  # round 1: v1's prediction scored against the correction (test-then-train)
        self.assertEqual([(r["id"], r["predicted_by"], r["changed_voxels"]) for r in rounds], [(correctedCase, "v1", changed)])
        self.assertTrue(0.0 <= rounds[0]["mean_dice"] <= 1.0)
        self.assertEqual(logic.queued(), [correctedCase])
        self.assertIsNotNone(logic.roundsChart())

        self.delayDisplay(f"Retraining {self.RETRAIN_ITERATIONS} iterations from the best model")
        logic.startTraining(iterations=self.RETRAIN_ITERATIONS, modelType="2d", device=self.DEVICE, initFrom="best")
        status = logic.waitForTraining(timeout=self.TIMEOUT_S)
        self.assertEqual(status["phase"], "done", status.get("error"))
        self.assertEqual(len(logic.modelVersions()), 2)
        self.assertEqual(logic.queued(), [])  # the retrained model took the correction

        self.delayDisplay("Segmenting phantom 3 with the retrained model")
        third = logic.segmentScan(scans[2], version="latest", timeout=self.TIMEOUT_S)
        dice3 = meanDice(self._labelOf(third, scans[2], names), truths[2], names)
        logging.info(f"ExtremeAug self-test: Dice after the correction {dice3:.3f}")
        self.assertGreater(dice3, self.MIN_DICE)
        self.delayDisplay("ExtremeAug loop test passed")

    @staticmethod
    def _labelOf(segmentationNode, volumeNode, names):
        try:
            return mrml_bridge.segmentationToLabelImage(
                segmentationNode, volumeNode, {name: value for value, name in names.items()})[0]
        except ValueError:  # nothing predicted at all
            return None


def _array(image):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


def meanDice(prediction, truth, names):
    """Mean Dice over the structures of ``names`` (SimpleITK label images; None = empty prediction)."""
    import numpy as np

    truthArray = _array(truth)
    predicted = _array(prediction) if prediction is not None else np.zeros_like(truthArray)
    scores = []
    for value in names:
        a, b = predicted == value, truthArray == value
        total = a.sum() + b.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total)
    return float(np.mean(scores))
