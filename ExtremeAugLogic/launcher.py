"""The one launcher of engine processes: the Slicer module, the demo and the experiment grid
start ``python -m ExtremeAugLogic ...`` through it.

Standard library only (psutil when present), and named in Slicer's style (camelCase), because
the Slicer module calls it before the engine's own dependencies are installed. No Qt: the
panel polls ``isRunning()`` from a timer; nothing blocks unless asked to (``stop``, ``wait``).
The process starts in its own session (POSIX) or process group (Windows), so stopping it
ends the whole tree: the engine and anything it spawned. Output goes to log files, never to
pipes that could fill up and stall the engine. Arguments are always lists, never shell
strings.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ExtremeAugLogic import contract

ENGINE_PACKAGE = "ExtremeAugLogic"
TORCHRUN_MODULE = "torch.distributed.run"  # ``torchrun``, run from the chosen Python

try:
    import psutil
except ImportError:  # Slicer without psutil: process groups on POSIX, taskkill on Windows
    psutil = None


def engineRoot():
    """The folder that holds the ``ExtremeAugLogic`` package."""
    return Path(__file__).resolve().parent.parent


def engineCommand(pythonExecutable, *args, processes=1):
    """``[python, -m, ExtremeAugLogic, *args]`` with every argument one element.

    With ``processes`` > 1 (a training on several GPUs or CPU processes) the same engine
    command under torchrun, from the same Python: ``[python, -m, torch.distributed.run,
    --standalone, --nproc-per-node, N, -m, ExtremeAugLogic, *args]``. ``--standalone`` gives
    each training its own free port, so several trainings can share a server.
    """
    if not pythonExecutable:
        raise ValueError("No Python executable given for the engine.")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"The number of training processes must be a whole number of at least 1, got {processes!r}.")
    python = os.fspath(pythonExecutable)
    engine = ["-m", ENGINE_PACKAGE, *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args)]
    if processes == 1:
        return [python, *engine]
    return [python, "-m", TORCHRUN_MODULE, "--standalone", "--nproc-per-node", str(processes), *engine]


def engineEnvironment(root=None, baseEnvironment=None):
    """Environment for an engine process: the engine's folder first on PYTHONPATH, unbuffered output."""
    env = dict(os.environ if baseEnvironment is None else baseEnvironment)
    paths = [str(root or engineRoot())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pidExists(pid):
    """Whether a (non-zombie) process with this id exists."""
    if not pid:
        return False
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    if os.name == "nt":  # pragma: no cover - Windows without psutil
        out = subprocess.run(["tasklist", "/FI", f"PID eq {pid}"], capture_output=True, text=True).stdout
        return str(pid) in out
    return contract.pid_alive(pid)


def peakMemoryMiB(pid):
    """The process's peak resident memory so far (VmHWM on Linux, else its current RSS), MiB; None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss / 2 ** 20
        except psutil.Error:
            pass
    return None


def _treeOf(pid):
    """psutil processes of ``pid`` and all its descendants (empty without psutil)."""
    if psutil is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def signalProcessTree(pid, groupId=None, kill=False):
    """Send SIGTERM (or SIGKILL with ``kill``) to ``pid``, its descendants and its process group."""
    tree = _treeOf(pid)
    for process in tree:
        try:
            process.kill() if kill else process.terminate()
        except Exception:  # already gone or not ours
            pass
    if groupId is not None and hasattr(os, "killpg"):
        try:
            os.killpg(groupId, signal.SIGKILL if kill else signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    elif not tree:
        if os.name == "nt":  # pragma: no cover - Windows without psutil
            subprocess.run(["taskkill", "/T"] + (["/F"] if kill else []) + ["/PID", str(pid)], capture_output=True)
        else:
            try:
                os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
    return tree


class EngineProcess:
    """One engine command running in the background, with its output in log files.

    ``start()`` returns at once. ``requestStop()`` asks the whole tree to end (SIGTERM: the
    engine saves its last checkpoint) and ``killIfOverdue()`` (called from a poll) kills what
    is left after ``stopTimeout`` seconds; ``stop()`` does both, blocking, for console use.
    """

    def __init__(self, args, cwd=None, env=None, logPrefix=None, stopTimeout=5.0):
        if isinstance(args, (str, bytes)):
            raise TypeError("EngineProcess needs an argument list, not a shell string.")
        self.args = [os.fspath(a) for a in args]
        self.cwd = os.fspath(cwd) if cwd else None
        self.env = env
        self.logPrefix = Path(logPrefix) if logPrefix else None
        self.stopTimeout = float(stopTimeout)
        self.popen = None
        self.pid = None
        self.groupId = None
        self.startedAt = None
        self.stopRequestedAt = None
        self._processes = []

    @classmethod
    def attach(cls, pid, stopTimeout=5.0):
        """An EngineProcess for a running engine started elsewhere (e.g. by an earlier Slicer session)."""
        process = cls([], stopTimeout=stopTimeout)
        process.pid = int(pid)
        if hasattr(os, "getpgid"):
            try:
                groupId = os.getpgid(process.pid)
            except (ProcessLookupError, PermissionError):
                groupId = None
            # Signal the group only when the engine leads its own (never Slicer's group).
            process.groupId = groupId if groupId == process.pid else None
        return process

    @property
    def stdoutPath(self):
        return self.logPrefix.with_name(self.logPrefix.name + ".log") if self.logPrefix else None

    @property
    def stderrPath(self):
        return self.logPrefix.with_name(self.logPrefix.name + ".err.log") if self.logPrefix else None

    def start(self):
        if self.popen is not None:
            raise RuntimeError("This engine process was already started.")
        if not self.args:
            raise ValueError("No command to run.")
        if self.logPrefix is None:
            import tempfile

            self.logPrefix = Path(tempfile.mkdtemp(prefix="ExtremeAug-")) / "engine"
        self.logPrefix.parent.mkdir(parents=True, exist_ok=True)
        options = {}
        if os.name == "nt":  # pragma: no cover - Windows
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            options["start_new_session"] = True
        with open(self.stdoutPath, "wb") as out, open(self.stderrPath, "wb") as err:
            self.popen = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=err, **options)
        self.pid = self.popen.pid
        self.groupId = self.pid if os.name != "nt" else None
        self.startedAt = time.time()
        return self

    def returnCode(self):
        """Exit code, or None while running (or when attached to a process we did not start)."""
        return self.popen.poll() if self.popen is not None else None

    def isRunning(self):
        if self.popen is not None:
            return self.popen.poll() is None
        return pidExists(self.pid)

    def requestStop(self):
        """Ask the whole process tree to end (non-blocking)."""
        if self.pid is None:
            return
        if self.stopRequestedAt is None:
            self.stopRequestedAt = time.time()
        self._processes = signalProcessTree(self.pid, self.groupId) or self._processes

    def killIfOverdue(self):
        """Kill what is left of the tree once ``stopTimeout`` has passed since ``requestStop``."""
        if self.stopRequestedAt is None or time.time() - self.stopRequestedAt < self.stopTimeout:
            return False
        signalProcessTree(self.pid, self.groupId, kill=True)
        for process in self._processes:
            try:
                process.kill()
            except Exception:
                pass
        return True

    def stop(self, timeout=None):
        """End the whole tree: SIGTERM, wait up to ``timeout`` s, then SIGKILL. True if all ended."""
        timeout = self.stopTimeout if timeout is None else float(timeout)
        self.requestStop()
        deadline = time.time() + timeout
        while time.time() < deadline and self._treeAlive():
            time.sleep(0.05)
        if self._treeAlive():
            self.stopRequestedAt = time.time() - self.stopTimeout
            self.killIfOverdue()
            deadline = time.time() + 2.0
            while time.time() < deadline and self._treeAlive():
                time.sleep(0.05)
        return not self._treeAlive()

    def _treeAlive(self):
        if self.popen is not None:
            self.popen.poll()  # reap our direct child
        alive = self.isRunning()
        if psutil is not None:
            for process in self._processes:
                try:
                    alive = alive or (process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
                except psutil.Error:
                    pass
        elif self.groupId is not None and hasattr(os, "killpg"):
            try:
                os.killpg(self.groupId, 0)
                alive = True
            except (ProcessLookupError, PermissionError):
                pass
        return alive

    def wait(self, timeout=None):
        """Block until the process ends (console use); its exit code, or None on timeout."""
        if self.popen is None:
            deadline = None if timeout is None else time.time() + timeout
            while self.isRunning():
                if deadline is not None and time.time() > deadline:
                    return None
                time.sleep(0.2)
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderrTail(self, lines=20):
        """The last ``lines`` lines the engine wrote to stderr."""
        return _tail(self.stderrPath, lines)

    def stdoutTail(self, lines=20):
        return _tail(self.stdoutPath, lines)

    def lastError(self, status=None):
        """Best error text: the status file's ``error``, else the engine's last ``error:`` line (torchrun
        adds its own report after it), else the last stderr line, else the exit code."""
        if status and status.get("error"):
            return str(status["error"])
        tail = [line.strip() for line in self.stderrTail(200).splitlines() if line.strip()]
        errors = [line for line in tail if line.startswith("error:")]
        if errors:
            return errors[-1]
        if tail:
            return tail[-1]
        code = self.returnCode()
        if code not in (None, 0):
            return f"engine exited with code {code}"
        return ""


def _tail(path, lines):
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def runToEnd(args, logPrefix, pollSeconds=0.5, env=None, cwd=None, onPoll=None):
    """Run an engine command to its end; its exit code, wall time and peak memory (MiB).

    The peak is the child's VmHWM polled every ``pollSeconds``. Ctrl+C (or an exception)
    here stops the child's tree with SIGTERM first (a training then checkpoints).
    """
    process = EngineProcess(args, cwd=cwd, env=env or engineEnvironment(), logPrefix=logPrefix,
                            stopTimeout=60.0).start()
    peak = 0.0
    try:
        while True:
            code = process.wait(pollSeconds)
            if code is not None:
                break
            peak = max(peak, peakMemoryMiB(process.pid) or 0.0)
            if onPoll:
                onPoll(process)
    except BaseException:
        process.stop()
        raise
    return {"returncode": code, "wall_s": time.time() - process.startedAt, "peak_rss_mib": peak or None,
            "process": process}


def defaultPythonExecutable():
    """Slicer's own Python (``PythonSlicer``) when running in Slicer, else this interpreter."""
    import shutil

    found = shutil.which("PythonSlicer")
    return found or sys.executable
