"""One background prediction: the engine's ``predict`` running while Slicer stays responsive.

The owner calls ``poll()`` (from a ``qt.QTimer`` in Slicer, or ``wait()`` on the console);
when the engine has finished, ``poll()`` turns its output file into a segmentation node
(through ``makeNode``) and calls ``callback(job)`` once. ``cancel()`` ends the whole process
tree. After the callback, exactly one of ``segmentationNode``, ``error`` or ``cancelled`` tells
what happened.
"""

import time
from pathlib import Path

from ExtremeAugLib.engine_cli import EngineError


class PredictionJob:
    def __init__(self, process, volumeNode, outputPath, makeNode, callback=None, temporaryFiles=()):
        self.process = process
        self.volumeNode = volumeNode
        self.outputPath = Path(outputPath)
        self.makeNode = makeNode  # outputPath -> new segmentation node
        self.callback = callback
        self.temporaryFiles = [Path(p) for p in temporaryFiles]  # deleted when finished (the scan copy)
        self.segmentationNode = None
        self.error = None
        self.cancelled = False
        self.finished = False

    def isRunning(self):
        return not self.finished

    def cancel(self):
        """Stop the prediction (whole process tree); the callback still runs, with ``cancelled``."""
        if not self.finished:
            self.cancelled = True
            self.process.requestStop()

    def poll(self):
        """Check the process; on completion build the node and call the callback. True when finished."""
        if self.finished:
            return True
        self.process.killIfOverdue()
        if self.process.isRunning():
            return False
        self.finished = True
        for path in self.temporaryFiles:
            path.unlink(missing_ok=True)
        if not self.cancelled:
            code = self.process.returnCode()
            if code != 0 or not self.outputPath.is_file():
                reason = self.process.lastError() or f"exit code {code}"
                self.error = EngineError(f"Segmenting '{self.volumeNode.GetName()}' failed: {reason}")
            else:
                try:
                    self.segmentationNode = self.makeNode(self.outputPath)
                except Exception as error:  # reported through the callback / result()
                    self.error = error
        if self.callback is not None:
            self.callback(self)
        return True

    def wait(self, timeout=None, interval=0.2):
        """Block until finished (console and tests only; the GUI polls instead). True if finished."""
        deadline = None if timeout is None else time.time() + timeout
        while not self.poll():
            if deadline is not None and time.time() > deadline:
                return False
            time.sleep(interval)
        return True

    def result(self):
        """The new segmentation node; raises the job's error (or RuntimeError if cancelled/unfinished)."""
        if not self.finished:
            raise RuntimeError("The prediction is still running.")
        if self.cancelled:
            raise RuntimeError("The prediction was cancelled.")
        if self.error is not None:
            raise self.error
        return self.segmentationNode
