"""The annotate-train-correct loop on MRML nodes: the Qt-free core of the module's Logic.

``ExtremeAug.ExtremeAugLogic`` (in Slicer) inherits from this class and adds only what needs
the application: dependency installation and a Qt timer that polls background predictions.
Everything that reaches the engine goes through its command line in a subprocess, so the
engine's own imports (torch, monai) never load into Slicer's process.

Nodes this class creates carry attributes so the loop can continue later:
``ExtremeAug.PredictionFile`` (the unedited prediction), ``ExtremeAug.SourceVolumeID``,
``ExtremeAug.ModelVersion`` on predicted segmentations; ``ExtremeAug.CaseID`` and
``ExtremeAug.Workspace`` on scans and segmentations that joined the training set.
"""

import logging
import os
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import SimpleITK as sitk

from ExtremeAugLib import engine_cli, mrml_bridge, workspace_view
from ExtremeAugLogic import contract
from ExtremeAugLib.prediction_job import PredictionJob
from ExtremeAugLib.training_process import (DEFAULT_STATUS, RUNNING_PHASES, EngineProcess, defaultPythonExecutable,
                                            isTerminalPhase, pidExists, psutil, readStatus)

PREDICTION_FILE_ATTRIBUTE = "ExtremeAug.PredictionFile"
SOURCE_VOLUME_ATTRIBUTE = "ExtremeAug.SourceVolumeID"
MODEL_VERSION_ATTRIBUTE = "ExtremeAug.ModelVersion"
CASE_ID_ATTRIBUTE = "ExtremeAug.CaseID"
WORKSPACE_ATTRIBUTE = "ExtremeAug.Workspace"
WORKLIST_ATTRIBUTE = "ExtremeAug.WorklistCaseID"
LOG_FOLDER = "logs"


def cleanPath(path):
    """``Path`` of a user-given folder, or None for nothing ('' or '.', which an empty path widget gives)."""
    if path is None or str(path).strip() in ("", "."):
        return None
    return Path(os.path.expanduser(str(path))).resolve()


class LoopLogic:
    """Console API of ExtremeAug (see README-console.md); raises ValueError for bad input."""

    def __init__(self, pythonExecutable=None, engineRoot=None, tempDirectory=None, logCallback=None):
        self.workspace = None
        self.pythonExecutable = pythonExecutable or defaultPythonExecutable()
        self._engineRoot = Path(engineRoot) if engineRoot else None
        self.tempDirectory = Path(tempDirectory or Path(tempfile.gettempdir()) / "ExtremeAug")
        self.logCallback = logCallback
        self.trainingHistory = []  # (iteration, loss, val_dice) of the current training, for the chart
        self._trainingProcesses = {}  # workspace -> EngineProcess (trainings keep running when switching)

    # ---------------------------------------------------------------- setup

    @property
    def engineRoot(self):
        if self._engineRoot is None:
            self._engineRoot = engine_cli.findEngineRoot()
        return self._engineRoot

    def log(self, message):
        logging.info(message)
        if self.logCallback:
            self.logCallback(message)

    def setPythonExecutable(self, path):
        """The Python that runs the engine (None or '': Slicer's own)."""
        self.pythonExecutable = str(cleanPath(path) or defaultPythonExecutable())

    def setWorkspace(self, path):
        """Use ``path`` as the workspace folder (created on the first added scan)."""
        self.workspace = cleanPath(path)
        if self.workspace is not None and self.workspace.exists() and not self.workspace.is_dir():
            raise ValueError(f"Workspace '{self.workspace}' is a file; choose a folder.")
        problem = workspace_view.manifestProblem(self.workspace) if self.workspace is not None else None
        if problem:
            self.workspace = None
            raise ValueError(problem)
        self.trainingHistory = []
        self._attachToRunningTraining()
        return self.workspace

    def _requireWorkspace(self):
        if self.workspace is None:
            raise ValueError("Choose a workspace folder first.")
        return self.workspace

    def ensureWorkspace(self):
        """Create the workspace through the engine if the folder is not one yet."""
        workspace = self._requireWorkspace()
        if not workspace_view.isWorkspace(workspace):
            self._runEngine(engine_cli.initCommand(self.pythonExecutable, workspace))
            self.log(f"Created workspace {workspace}")
        return workspace

    def _runEngine(self, args):
        return engine_cli.runEngine(args, self.engineRoot)

    def _newTempFolder(self, prefix):
        self.tempDirectory.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tempDirectory))

    # ------------------------------------------------------------ workspace

    def structureNames(self):
        return workspace_view.structureNames(self.workspace) if self.workspace else {}

    def modelVersions(self):
        """Rows ``{name, status, valDice, isBest, casesSeen, score, scoreSource, testDice, testScans,
        trialAgainst}``, oldest first; ``score`` is the validation Dice, or without one the
        test-then-train Dice (``workspace_view.versionRows``)."""
        return workspace_view.versionRows(self.workspace) if self.workspace else []

    def rounds(self):
        """The loop round by round, one row per accepted correction, as ``status`` prints it:
        ``{round, id, predicted_by, mean_dice, binary_dice, changed_voxels, slices_touched,
        structures_changed, trained_by, in_best, ...}`` (``contract.round_rows``)."""
        return workspace_view.roundRows(self.workspace) if self.workspace else []

    def queued(self):
        """Case ids of the training cases the best model has not trained on yet (the next training takes them)."""
        return workspace_view.queuedCases(self.workspace) if self.workspace else []

    def roundsChart(self):
        """The path of the workspace's ``rounds.png`` (Dice and correction effort per round), or None."""
        return workspace_view.roundsChartPath(self.workspace)

    def caseIds(self):
        return workspace_view.caseIds(self.workspace) if self.workspace else []

    # --------------------------------------------------------- training set

    def addTrainingScan(self, volumeNode, segmentationNode, caseId=None):
        """Add a delineated scan to the training set; returns its case id."""
        return self._addCase(volumeNode, segmentationNode, caseId=caseId, correctedFrom=None)[0]

    def acceptCorrection(self, volumeNode, segmentationNode):
        """Add a corrected prediction to the training set: ``(caseId, changedVoxels)``.

        The unedited prediction is the file the prediction step remembered on the
        segmentation (or, failing that, on the scan).
        """
        if segmentationNode is None:
            raise ValueError("Select the corrected segmentation first.")
        predictionFile = (segmentationNode.GetAttribute(PREDICTION_FILE_ATTRIBUTE)
                          or (volumeNode.GetAttribute(PREDICTION_FILE_ATTRIBUTE) if volumeNode else None))
        if not predictionFile:
            raise ValueError(f"Segmentation '{segmentationNode.GetName()}' is not an ExtremeAug prediction; "
                             "use 'Add as training scan' for a segmentation drawn from scratch.")
        source = segmentationNode.GetAttribute(SOURCE_VOLUME_ATTRIBUTE)
        if volumeNode is not None and source and source != volumeNode.GetID():
            raise ValueError(f"Segmentation '{segmentationNode.GetName()}' was predicted for another scan "
                             f"than '{volumeNode.GetName()}'.")
        if not Path(predictionFile).is_file():
            raise ValueError(f"The unedited prediction ({predictionFile}) is gone; "
                             "use 'Add as training scan' instead.")
        version = segmentationNode.GetAttribute(MODEL_VERSION_ATTRIBUTE)
        known = {row["name"] for row in self.modelVersions()}
        return self._addCase(volumeNode, segmentationNode, caseId=None, correctedFrom=Path(predictionFile),
                             predictedBy=version if version in known else None)

    def addToWorklist(self, volumeNode, caseId=None):
        """Add a scan without a segmentation to the workspace's worklist; returns its case id.

        Delineating it later (``addTrainingScan`` on the same volume) moves it into the
        training set under the same case id.
        """
        if volumeNode is None:
            raise ValueError("Select the scan to add to the worklist first.")
        self._requireWorkspace()
        reason = self._inWorklist(volumeNode) or self._alreadyAdded(volumeNode, None)
        if reason:
            raise ValueError(reason)
        workspace = self.ensureWorkspace()
        caseId = caseId or workspace_view.newCaseId(workspace, volumeNode.GetName())
        folder = self._newTempFolder("worklist-")
        try:
            imagePath = folder / "image.nii.gz"
            sitk.WriteImage(mrml_bridge.volumeNodeToImage(volumeNode), str(imagePath), True)
            self._runEngine(engine_cli.addCommand(self.pythonExecutable, workspace, imagePath, None, caseId=caseId))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        volumeNode.SetAttribute(WORKLIST_ATTRIBUTE, caseId)
        volumeNode.SetAttribute(WORKSPACE_ATTRIBUTE, str(workspace))
        self.log(f"Added '{volumeNode.GetName()}' to the worklist as {caseId}")
        return caseId

    def nextScan(self, order=contract.SUGGESTED_ORDER):
        """The worklist scan to correct next: ``{id, state, version, uncertainty, prediction, image}`` or None.

        ``order``: "added" (default, as ``status`` lists the worklist: the order the scans
        joined) or "uncertainty" (the most uncertain prediction first); a scan whose prediction
        is ready comes before one still waiting for it.
        """
        rows = workspace_view.worklistState(self.workspace, order) if self.workspace else []
        ready = [r for r in rows if r["state"] == "ready"]
        return (ready or rows or [None])[0]

    def loadNextScan(self, scene, order=contract.SUGGESTED_ORDER):
        """Load the next worklist scan, and its waiting prediction as an editable segmentation, into ``scene``.

        Returns ``(volumeNode, segmentationNode or None)``; accepting the edited segmentation
        (``acceptCorrection``) moves the scan into the training set under its case id, its
        correction measured against the prediction loaded here (a copy: a newer model may
        replace the waiting one meanwhile) and the model version that made it.
        """
        row = self.nextScan(order)
        if row is None:
            raise ValueError("The worklist is empty: add scans without a segmentation first.")
        volumeNode = mrml_bridge.imageToVolumeNode(sitk.ReadImage(row["image"]), scene, row["id"])
        volumeNode.SetAttribute(WORKLIST_ATTRIBUTE, row["id"])
        volumeNode.SetAttribute(WORKSPACE_ATTRIBUTE, str(self.workspace))
        segmentationNode = None
        if row["prediction"]:
            copy = self._snapshotWaitingPrediction(row)
            segmentationNode = self._predictionToSegmentation(volumeNode, copy, row["version"])
        self.log(f"Loaded worklist scan {row['id']}" + (f" with its prediction by {row['version']}"
                                                         if segmentationNode else " (no prediction yet)"))
        return volumeNode, segmentationNode

    def _snapshotWaitingPrediction(self, row):
        """A private copy of the prediction waiting for ``row``, checked to be the one its record names."""
        label = sitk.ReadImage(row["prediction"])
        record = contract.read_waiting_prediction(self.workspace, row["id"])
        if record is None or record.get("version") != row["version"]:
            raise ValueError(f"The prediction waiting for {row['id']} is being replaced by a newer model; "
                             "press Next scan again in a moment.")
        copy = self._newTempFolder("next-") / f"{row['id']}_prediction.nii.gz"
        sitk.WriteImage(label, str(copy), True)
        return copy

    def worklist(self, order=contract.SUGGESTED_ORDER):
        """The case ids of the workspace's scans without a label, in ``order`` (as ``status`` lists them)."""
        return [row["id"] for row in workspace_view.worklistState(self.workspace, order)] if self.workspace else []

    def _addCase(self, volumeNode, segmentationNode, caseId, correctedFrom, predictedBy=None):
        """Write scan and label, run the engine's ``add``: ``(caseId, changedVoxels or None)``."""
        workspace = self._requireWorkspace()
        self._refuseDuplicate(volumeNode, segmentationNode)
        label, names = mrml_bridge.segmentationToLabelImage(
            segmentationNode, volumeNode, workspace_view.valueForName(workspace))
        changed = None
        if correctedFrom is not None:
            changed = mrml_bridge.countChangedVoxels(sitk.ReadImage(str(correctedFrom)), label)
        workspace = self.ensureWorkspace()
        waiting = volumeNode.GetAttribute(WORKLIST_ATTRIBUTE)
        if not caseId and waiting and volumeNode.GetAttribute(WORKSPACE_ATTRIBUTE) == str(workspace):
            caseId = waiting  # a worklist scan, now delineated: it keeps its case id
        caseId = caseId or workspace_view.newCaseId(workspace, volumeNode.GetName())
        folder = self._newTempFolder("add-")
        try:
            imagePath, labelPath = folder / "image.nii.gz", folder / "label.nii.gz"
            sitk.WriteImage(mrml_bridge.volumeNodeToImage(volumeNode), str(imagePath), True)
            sitk.WriteImage(label, str(labelPath), True)
            self._runEngine(engine_cli.addCommand(self.pythonExecutable, workspace, imagePath, labelPath,
                                                  caseId=caseId, correctedFrom=correctedFrom, names=names,
                                                  predictedBy=predictedBy))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        volumeNode.RemoveAttribute(WORKLIST_ATTRIBUTE)
        for node in (volumeNode, segmentationNode):
            node.SetAttribute(CASE_ID_ATTRIBUTE, caseId)
            node.SetAttribute(WORKSPACE_ATTRIBUTE, str(workspace))
        if correctedFrom is None:
            self.log(f"Added '{volumeNode.GetName()}' as training case {caseId}")
        else:
            self.log(f"Accepted correction of '{volumeNode.GetName()}' as case {caseId} ({changed} voxels changed)")
        return caseId, changed

    def _refuseDuplicate(self, volumeNode, segmentationNode):
        """ValueError if this scan or segmentation already joined this workspace's training set."""
        reason = self._alreadyAdded(volumeNode, segmentationNode)
        if reason:
            raise ValueError(reason)

    # ------------------------------------------------------------- training

    @property
    def trainingProcess(self):
        return self._trainingProcesses.get(self.workspace)

    def _attachToRunningTraining(self):
        """Adopt a training started earlier (e.g. before Slicer restarted) so Stop can end it."""
        if self.workspace is None or self.trainingProcess is not None or psutil is None:
            return
        status = readStatus(self.workspace)
        pid = status.get("pid")
        if status["phase"] not in RUNNING_PHASES or not pidExists(pid):
            return
        try:
            commandLine = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            return
        if engine_cli.ENGINE_PACKAGE in commandLine and "train" in commandLine:
            self._trainingProcesses[self.workspace] = EngineProcess.attach(pid)
            self.log(f"Following the training already running in {self.workspace} (pid {pid})")

    def isTraining(self):
        process = self.trainingProcess
        return process is not None and process.isRunning()

    @staticmethod
    def retrainMinutes(firstMinutes):
        """The budget of a warm-started retrain (Retrain): a quarter of the first training's
        (``contract.RETRAIN_FRACTION``, as the engine's default for ``--init-from``)."""
        return float(firstMinutes) * contract.RETRAIN_FRACTION

    def startTraining(self, minutes=None, iterations=None, level=None, modelType="2d", device="auto",
                      initFrom=None, resume=False, processes=1):
        """Start a training in the background and return at once (see ``trainingStatus``).

        ``processes`` > 1 trains with torchrun from the same Python: one process per GPU, or
        several CPU processes; the status then shows ``world_size``.
        """
        workspace = self._requireWorkspace()
        if not workspace_view.cases(workspace):
            raise ValueError("Add at least one delineated scan before training.")
        self._attachToRunningTraining()
        if self.isTraining():
            raise ValueError(f"A training is already running in {workspace}; stop it first.")
        args = engine_cli.trainCommand(self.pythonExecutable, workspace, minutes=minutes, iterations=iterations,
                                       level=level, device=device, resume=resume, initFrom=initFrom,
                                       modelType=modelType, processes=processes)
        logPrefix = workspace / LOG_FOLDER / f"train-{datetime.now():%Y%m%d-%H%M%S}"
        process = EngineProcess(args, cwd=self.engineRoot, env=engine_cli.engineEnvironment(self.engineRoot),
                                logPrefix=logPrefix)
        process.start()
        self._trainingProcesses[workspace] = process
        self.trainingHistory = []
        budget = f"{minutes} min" if minutes is not None else (f"{iterations} iterations" if iterations else "default budget")
        on = f", {processes} processes" if processes and processes > 1 else ""
        self.log(f"Training started ({modelType}, {budget}, device {device}{on}); log: {process.stdoutPath}")
        return process

    def stopTraining(self, wait=False):
        """Ask the training to stop (it keeps its last checkpoint); ``wait`` blocks until it ended."""
        process = self.trainingProcess
        if process is None or not process.isRunning():
            return False
        if wait:
            process.stop()
        else:
            process.requestStop()
        self.log("Stopping the training")
        return True

    def trainingStatus(self):
        """The status file of the workspace, corrected by what we know about our own process.

        Adds ``running`` (bool). A status left by an earlier run while ours is starting reads
        as "starting"; an engine that died without a final status reads as "failed" with its
        last stderr line as ``error``.
        """
        if self.workspace is None:
            return dict(DEFAULT_STATUS, running=False, message="no workspace chosen")
        status = readStatus(self.workspace)
        process = self.trainingProcess
        if process is not None:
            process.killIfOverdue()
            running = process.isRunning()
            ours = _statusBelongsTo(status, process)
            if running and not ours:
                status = dict(DEFAULT_STATUS, phase="starting", message="starting the engine")
            elif not running and (not ours or not isTerminalPhase(status["phase"])):
                stopped = process.stopRequestedAt is not None
                status["phase"] = "stopped" if stopped else ("done" if process.returnCode() == 0 else "failed")
                if status["phase"] == "failed":
                    status["error"] = process.lastError(status)
            elif not running and status["phase"] == "failed" and not status.get("error"):
                status["error"] = process.lastError(status)
        else:
            running = status["phase"] in RUNNING_PHASES and pidExists(status.get("pid"))
            if status["phase"] in RUNNING_PHASES and not running and status.get("pid"):
                status["phase"] = "stopped"
                status["message"] = "the training process is no longer running"
        status["running"] = running
        self._recordHistory(status)
        return status

    def _recordHistory(self, status):
        iteration = status.get("iteration") or 0
        if status["phase"] in RUNNING_PHASES and iteration and status.get("loss") is not None:
            if not self.trainingHistory or iteration > self.trainingHistory[-1][0]:
                self.trainingHistory.append((iteration, status["loss"], status.get("val_dice")))

    def waitForTraining(self, timeout=None, interval=1.0):
        """Block until the training ends (console and self-test only, never the GUI); its final status."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            status = self.trainingStatus()
            if not status["running"]:
                return status
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"Training still running after {timeout} s ({status['phase']}).")
            time.sleep(interval)

    # ------------------------------------------------------- what is possible

    def actionBlockers(self, volumeNode, segmentationNode, predicting=False):
        """Why each panel action cannot run now: ``{action: reason or None}``.

        Actions: add, worklist (a scan without a segmentation), next (load the next worklist
        scan with its prediction), train (Train/Stop), retrain, segment (Segment/Cancel), edit, accept.
        The Widget disables a button whose reason is not None and shows the reason as tooltip.
        """
        training = self.isTraining()
        noWorkspace = None if self.workspace is not None else "Choose a workspace folder first."
        noScan = None if volumeNode is not None else "Select a scan first."
        noSegmentation = None if segmentationNode is not None else "Select or create a segmentation first."
        hasCases = any(c.get("split") != contract.WORKLIST_SPLIT for c in workspace_view.cases(self.workspace)) \
            if self.workspace else False
        hasModel = bool(self.workspace and workspace_view.bestVersion(self.workspace))
        noModel = None if hasModel else "No trained model yet: add a delineated scan and press Train."
        blockers = {
            "add": noWorkspace or noScan or noSegmentation or self._alreadyAdded(volumeNode, segmentationNode),
            "worklist": noWorkspace or noScan or self._alreadyAdded(volumeNode, None)
                        or self._inWorklist(volumeNode),
            "next": noWorkspace or (None if self.worklist() else "The worklist is empty."),
            "train": None if training else (noWorkspace or (None if hasCases else "Add a delineated scan first.")),
            "retrain": noWorkspace or ("A training is running; stop it or wait." if training else None)
                       or (None if hasCases else "Add a delineated scan first.")
                       or (None if hasModel else "No model to start from yet: use Train first."),
            "segment": None if predicting else (noWorkspace or noScan or noModel),
            "edit": noSegmentation,
            "accept": noWorkspace or noScan or noSegmentation or self._notAPrediction(segmentationNode)
                      or self._alreadyAdded(volumeNode, segmentationNode),
        }
        return blockers

    def _inWorklist(self, volumeNode):
        """Why ``volumeNode`` cannot join the worklist again, or None."""
        waiting = volumeNode.GetAttribute(WORKLIST_ATTRIBUTE) if volumeNode is not None else None
        if waiting and volumeNode.GetAttribute(WORKSPACE_ATTRIBUTE) == str(self.workspace):
            return f"'{volumeNode.GetName()}' is already in the worklist as {waiting}."
        return None

    def _alreadyAdded(self, volumeNode, segmentationNode):
        for node in (segmentationNode, volumeNode):
            if node is None:
                continue
            caseId = node.GetAttribute(CASE_ID_ATTRIBUTE)
            if caseId and node.GetAttribute(WORKSPACE_ATTRIBUTE) == str(self.workspace) and caseId in self.caseIds():
                return f"'{node.GetName()}' is already training case {caseId}."
        return None

    @staticmethod
    def _notAPrediction(segmentationNode):
        if segmentationNode is not None and not segmentationNode.GetAttribute(PREDICTION_FILE_ATTRIBUTE):
            return "This segmentation is not an ExtremeAug prediction: use 'Add as training scan'."
        return None

    # ----------------------------------------------------------- prediction

    def startSegmentScan(self, volumeNode, callback=None, version=None, device=None):
        """Predict ``volumeNode`` in the background; returns a PredictionJob (poll it, or cancel it).

        When it finishes, a NEW segmentation node holds the prediction and ``callback(job)``
        runs. ``version`` is vN, "best" (default) or "latest".
        """
        workspace = self._requireWorkspace()
        if not volumeNode:
            raise ValueError("Select the scan to segment first.")
        if not version and not workspace_view.bestVersion(workspace):
            raise ValueError("No trained model yet: train one (and let it finish) first.")
        folder = self._newTempFolder("predict-")
        imagePath, outputPath = folder / "image.nii.gz", folder / "prediction.nii.gz"
        sitk.WriteImage(mrml_bridge.volumeNodeToImage(volumeNode), str(imagePath), True)
        args = engine_cli.predictCommand(self.pythonExecutable, workspace, imagePath, outputPath,
                                         version=version, device=device)
        process = EngineProcess(args, cwd=self.engineRoot, env=engine_cli.engineEnvironment(self.engineRoot),
                                logPrefix=folder / "predict")
        usedVersion = version or workspace_view.bestVersion(workspace)

        def makeNode(path):
            return self._predictionToSegmentation(volumeNode, path, usedVersion)

        job = PredictionJob(process, volumeNode, outputPath, makeNode, callback, temporaryFiles=[imagePath])
        process.start()
        self.log(f"Segmenting '{volumeNode.GetName()}' with model {usedVersion}")
        return job

    def segmentScan(self, volumeNode, version=None, timeout=None):
        """Predict ``volumeNode`` and return the new segmentation node (blocks: console use)."""
        job = self.startSegmentScan(volumeNode, version=version)
        if not job.wait(timeout):
            job.cancel()
            job.wait(10)
            raise TimeoutError(f"Segmenting '{volumeNode.GetName()}' took longer than {timeout} s.")
        return job.result()

    def _predictionToSegmentation(self, volumeNode, predictionPath, version):
        label = sitk.ReadImage(str(predictionPath))
        node = mrml_bridge.labelImageToSegmentation(
            label, volumeNode, self.structureNames(), nodeName=f"{volumeNode.GetName()} ExtremeAug {version}")
        node.SetAttribute(PREDICTION_FILE_ATTRIBUTE, str(predictionPath))
        node.SetAttribute(SOURCE_VOLUME_ATTRIBUTE, volumeNode.GetID() or "")
        node.SetAttribute(MODEL_VERSION_ATTRIBUTE, str(version))
        volumeNode.SetAttribute(PREDICTION_FILE_ATTRIBUTE, str(predictionPath))
        return node


def _statusBelongsTo(status, process):
    """Whether the status file was written by ``process`` (or by its child: Slicer's ``PythonSlicer``
    is a launcher that runs the real interpreter as a child process)."""
    pid = status.get("pid")
    if not pid or process.pid is None:
        return False
    if pid == process.pid:
        return True
    if psutil is not None:
        try:
            if pid in {child.pid for child in psutil.Process(process.pid).children(recursive=True)}:
                return True
        except psutil.Error:
            pass
    startedAt = _isoTimestamp(status.get("started_at"))
    return startedAt is not None and process.startedAt is not None and startedAt >= process.startedAt - 2.0


def _isoTimestamp(text):
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except (TypeError, ValueError):
        return None

