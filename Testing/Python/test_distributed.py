"""Training on several processes with torchrun, on the CPU with gloo and 2 processes.

A short training whose loss falls, written by rank 0 alone (an audit hook in every process
records what each rank opens for writing in the workspace); a SIGTERM to the torchrun
launcher stops every rank within seconds with one checkpoint that ``--resume`` continues on
2 processes and on 1; two ranks draw different batches; the Slicer Logic starts torchrun as
an argument list and shows the world size.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from ExtremeAugLogic import contract, launcher
from ExtremeAugLogic.demo import phantom
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.manifest_check import check_version_record
from ExtremeAugLogic.recipes.base import stream_seed
from ExtremeAugLogic.recipes.slice2d import augment
from ExtremeAugLogic.recipes.volume3d import augment as augment3d
from ExtremeAugLogic.training.distributed import Place
from ExtremeAugLogic.workspace import Workspace
from ExtremeAugLogic.workspace.imageio import write_image
from ExtremeAugLogic.workspace.status import read_status, wait_until

REPO = Path(__file__).resolve().parents[2]
# The 2D model, small enough for 2 processes on 2 CPU cores; 5 structures, so DiceCE falls fast.
TINY = {"inplane_size": 64, "patch_size": 64, "stride": 32, "base_features": 8, "depth": 3, "max_features": 32,
        "batch_size": 4, "learning_rate": 0.005}
SETS = [x for key, value in TINY.items() for x in ("--set", f"{key}={json.dumps(value)}")]

# Every process started with this folder on PYTHONPATH records, per rank, what it opens for
# writing, renames, creates or removes under EXTREMEAUG_AUDIT_ROOT (Python's audit hooks).
AUDIT_HOOK = textwrap.dedent('''
    import os, sys
    _root = os.environ.get("EXTREMEAUG_AUDIT_ROOT")
    _log = os.environ.get("EXTREMEAUG_AUDIT_LOG")
    if _root and _log:
        _root = os.path.realpath(_root) + os.sep
        _out = []

        def _inside(path):
            if isinstance(path, int) or path is None:
                return False
            try:
                return os.path.realpath(os.path.abspath(os.fsdecode(path))).startswith(_root)
            except (TypeError, ValueError):
                return False

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                writes = (mode is not None and any(c in mode for c in "wax+")) or \\
                         (mode is None and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
                paths = [path] if writes else []
            elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate"):
                paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            else:
                return
            hits = [os.fsdecode(p) for p in paths if _inside(p)]
            if hits:
                if not _out:
                    _out.append(os.open(_log + "." + os.environ.get("RANK", "none"),
                                        os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
                os.write(_out[0], ("%s %s\\n" % (event, hits[0])).encode())

        sys.addaudithook(_hook)
''')


TIMEOUT_S = 900  # a safety net only: a run takes seconds on an idle machine, minutes on a crowded one


def _env(**extra):
    # one thread per process: a multi-threaded process on a crowded machine waits for its own threads
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", **extra)


def _kill_tree(pid):
    """Kill a launcher and every process under it (torchrun starts each rank in its own session)."""
    try:
        root = psutil.Process(pid)
        tree = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for process in tree:
        try:
            process.kill()
        except psutil.Error:
            pass


def _run(command, env=None):
    """``subprocess.run`` that, on a timeout, leaves no rank behind."""
    process = subprocess.Popen(command, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(process.pid)
        out, err = process.communicate()
        pytest.fail(f"{' '.join(map(str, command[:8]))} ... timed out after {TIMEOUT_S} s: {err[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _torchrun(processes, *args):
    return launcher.engineCommand(sys.executable, *map(str, args), processes=processes)


def _workspace(folder: Path, validation=True) -> Workspace:
    ws = Workspace.create(folder / "ws")
    for seed, split in ((31, "train"), (32, "validation"))[:2 if validation else 1]:
        image, label = phantom.make_phantom(seed, shape=(64, 64, 24), spacing=(3.0, 3.0, 3.0))
        paths = folder / f"p{seed}_image.nii.gz", folder / f"p{seed}_label.nii.gz"
        write_image(image, paths[0])
        write_image(label, paths[1])
        ws.add_case(*paths, split=split)
    return ws


def _log_losses(ws, version="v1"):
    with open(ws.model_dir(version) / "log.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


# ------------------------------------------------------------ each rank its own batches

def test_rank_zero_draws_what_one_process_draws_and_other_ranks_differ():
    assert stream_seed(7, 0) == 7
    assert len({stream_seed(7, r) for r in range(8)} | {stream_seed(8, r) for r in range(8)}) == 16
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((3, 1, 48, 48), generator=gen)
    labels = (images > 0.5).long()
    centres = np.array([[s, 24, 24] for s in range(3)])

    def sampler(level, rank=None):
        extra = {} if rank is None else {"rank": rank}
        return augment.OnTheFlySampler(images, labels, centres, level, augment.AugmentationRanges(), 32, 8, seed=5,
                                       **extra)

    for level in (0, 10):
        one, zero, first = sampler(level).batch(0)[0], sampler(level, 0).batch(0)[0], sampler(level, 1).batch(0)[0]
        assert torch.equal(one, zero)
        assert not torch.allclose(zero, first)
    # the level-N data set is the same on every rank: transform k of patch p does not depend on the rank
    a, b = sampler(10, 0), sampler(10, 1)
    ids, k = torch.arange(3), torch.tensor([0, 4, 9])
    fixed_a = augment.transform_parameters(a.ranges, 3, "cpu", a.seed, ids, k)
    fixed_b = augment.transform_parameters(b.ranges, 3, "cpu", b.seed, ids, k)
    assert all(torch.equal(fixed_a[name], fixed_b[name]) for name in fixed_a)

    volume = np.random.default_rng(0).random((12, 16, 16)).astype(np.float32)
    label = (volume > 0.5).astype(np.uint8)
    ranges = augment3d.Ranges3D.from_settings({"rotation_deg": 15.0, "scale": [0.9, 1.1], "translation_frac": 0.2,
                                               "elastic_mm": 0.0, "elastic_points": 4, "noise_std": 0.1,
                                               "fg_fraction": 0.5})

    def make(**rank):
        return augment3d.PatchSampler3D([volume], [label], (8, 8, 8), (1.0, 1.0, 1.0), 2, 0, ranges, "cpu", 3, **rank)

    assert torch.equal(make().batch(4)[0], make(rank=0).batch(4)[0])
    assert not torch.allclose(make(rank=0).batch(4)[0], make(rank=1).batch(4)[0])


def test_two_ranks_under_torchrun_draw_different_batches(tmp_path):
    """End to end: torchrun's RANK reaches the recipe's sampler through ``Place``; rank 0 draws as one process."""
    script = tmp_path / "draw.py"
    script.write_text(textwrap.dedent('''
        import json, sys
        import torch, torch.distributed as dist
        from ExtremeAugLogic.recipes.registry import make_recipe
        from ExtremeAugLogic.training.distributed import join
        from ExtremeAugLogic.workspace import Workspace

        ws = Workspace.open(sys.argv[1])
        cases = ws.load_cases("train")
        with join("cpu") as place:
            recipe = make_recipe("2d", json.loads(sys.argv[2]))
            config = recipe.fit_config(cases, max(ws.structure_names()) + 1)
            x, _ = recipe.make_sampler(config, cases, "cpu", 0, rank=place.rank).batch(0)
            mine = [float(x.sum()), float((x * x).sum())]
            everyone = [None] * place.world_size
            dist.all_gather_object(everyone, mine)
            if place.is_main:
                x, _ = recipe.make_sampler(config, cases, "cpu", 0).batch(0)
                print(json.dumps({"ranks": everyone, "one_process": [float(x.sum()), float((x * x).sum())]}))
    '''))
    ws = _workspace(tmp_path, validation=False)
    command = [sys.executable, "-m", launcher.TORCHRUN_MODULE, "--standalone", "--nproc-per-node", "2",
               str(script), str(ws.path), json.dumps(TINY)]
    done = _run(command)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["ranks"][0] == seen["one_process"]
    assert seen["ranks"][0] != seen["ranks"][1]


# ------------------------------------------------------------ a short training on 2 processes

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 processes, 40 iterations, every process's writes in the workspace audited per rank."""
    folder = tmp_path_factory.mktemp("ddp")
    ws = _workspace(folder)
    hook = folder / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = _env(EXTREMEAUG_AUDIT_ROOT=str(ws.path), EXTREMEAUG_AUDIT_LOG=str(folder / "writes"))
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    started = time.monotonic()
    done = _run(_torchrun(2, "train", ws.path, "--iterations", 40, "--quiet", *SETS), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return ws, done, folder, time.monotonic() - started


def test_two_processes_train_one_version_whose_loss_falls(trained):
    ws, done, _, _ = trained
    assert [v["name"] for v in ws.versions()] == ["v1"]
    record = ws.version("v1")
    assert record["status"] == "done" and record["iterations"] == 40 and record["world_size"] == 2
    stored = ws.model_dir("v1") / "version.json"
    check_version_record(json.loads(stored.read_text()), stored)
    status = read_status(ws.status_path)
    assert status["phase"] == "done" and status["iteration"] == 40 and status["world_size"] == 2
    assert status["pid"] == record["pid"]
    losses = _log_losses(ws)
    assert len(losses) >= 2 and losses[-1] < 0.8 * losses[0], losses
    for name in ("model.pt", "config.json", "checkpoint.pt", "log.csv", "version.json"):
        assert (ws.model_dir("v1") / name).is_file(), name
    # one final line from rank 0 (the other rank prints nothing), then the best model's worklist step
    assert done.stdout.count("v1 done") == 1, done.stdout


def test_only_rank_zero_writes_in_the_workspace(trained):
    ws, _, folder, _ = trained
    logs = {p.name.rsplit(".", 1)[-1]: p.read_text().splitlines() for p in folder.glob("writes.*")}
    written = {line.split(" ", 1)[1] for line in logs.get("0", [])}
    # the audit sees rank 0's writes (the hook works) ...
    assert any(p.endswith("checkpoint.pt") or "/.checkpoint." in p for p in written), sorted(written)
    assert any(p.endswith(contract.STATUS_NAME) or "/.status." in p for p in written), sorted(written)
    assert any(p.endswith(contract.TRAIN_LOCK_NAME) for p in written), sorted(written)
    # ... and rank 1 wrote nothing at all
    assert "1" not in logs, logs.get("1")[:10]


# ------------------------------------------------------------ SIGTERM to the launcher, then --resume

def _start_and_stop(ws, processes, *extra, after_iteration):
    """Train, SIGTERM the launcher at ``after_iteration``; (seconds until it ended, all ranks gone, its output)."""
    output = ws.path.parent / f"torchrun-{time.monotonic_ns()}.log"
    with open(output, "wb") as out:
        process = subprocess.Popen(_torchrun(processes, "train", ws.path, "--quiet", *extra), env=_env(),
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        status = wait_until(ws.status_path, lambda s: s.get("phase") == "training"
                            and s.get("iteration", 0) >= after_iteration, TIMEOUT_S)
        assert status and status["phase"] == "training" and status.get("world_size") == processes, status
        workers = [p for p in psutil.Process(process.pid).children(recursive=True)
                   if "ExtremeAugLogic" in " ".join(p.cmdline())]
        assert len(workers) == processes, workers
        rank0 = next(p for p in workers if p.environ().get("RANK") == "0")
        assert contract.lock_holder(ws.lock_path) == status["pid"] == rank0.pid  # rank 0 alone holds the lock
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        gone = psutil.wait_procs(workers, timeout=10)[1] == []
        return time.monotonic() - sent, gone, output.read_text(errors="replace")
    finally:
        _kill_tree(process.pid)
        process.wait()


def test_sigterm_stops_every_rank_and_resume_continues_on_two_processes_and_on_one(tmp_path):
    """SIGTERM to the torchrun launcher; then the panel's Logic resumes on 2 processes and stops; 1 process ends it."""
    from ExtremeAugLib import status_text
    from ExtremeAugLib.loop_logic import LoopLogic

    ws = _workspace(tmp_path, validation=False)
    seconds, gone, output = _start_and_stop(ws, 2, "--iterations", 100000, *SETS, after_iteration=3)
    assert gone and seconds < 20, (seconds, output[-3000:])  # ~3 s on an idle machine
    assert read_status(ws.status_path)["phase"] == "stopped"
    first = torch.load(ws.model_dir("v1") / "checkpoint.pt", weights_only=True)["iteration"]
    assert first >= 3 and ws.version("v1")["status"] == "stopped" and ws.version("v1")["iterations"] == first

    # --resume on 2 processes, started by the panel's Logic (torchrun from the chosen Python) and stopped by it
    logic = LoopLogic(pythonExecutable=sys.executable, engineRoot=REPO, tempDirectory=tmp_path / "tmp")
    logic.setWorkspace(ws.path)
    process = logic.startTraining(iterations=100000, device="cpu", resume=True, processes=2)
    try:
        assert process.args[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc-per-node", "2"]
        deadline = time.monotonic() + TIMEOUT_S
        status = logic.trainingStatus()
        while not (status["phase"] == "training" and status["iteration"] >= first + 3):
            assert logic.isTraining() and time.monotonic() < deadline, (status, process.stderrTail())
            time.sleep(0.3)
            status = logic.trainingStatus()
        assert status["world_size"] == 2 and status["version"] == "v1"
        assert "on 2 processes" in status_text.describeStatus(status)
        assert logic.stopTraining()  # SIGTERM to the whole tree; wait here without the panel's 5 s kill
        assert process.wait(TIMEOUT_S) is not None
    finally:
        _kill_tree(process.pid)
    assert logic.trainingStatus()["phase"] == "stopped"
    second = torch.load(ws.model_dir("v1") / "checkpoint.pt", weights_only=True)["iteration"]
    assert second >= first + 3 and ws.version("v1")["status"] == "stopped"

    # --resume on 1 process (no torchrun) finishes it
    done = _run(_torchrun(1, "train", ws.path, "--resume", "--iterations", second + 4, "--quiet"))
    assert done.returncode == 0, done.stderr[-3000:]
    status = read_status(ws.status_path)
    assert status["phase"] == "done" and status["iteration"] == second + 4 and status["world_size"] == 1
    assert [v["name"] for v in ws.versions()] == ["v1"] and ws.version("v1")["world_size"] == 1


# ------------------------------------------------------------ the rules, without processes

def test_place_from_the_torchrun_environment():
    assert Place.from_environment({}) == Place()
    assert not Place().active and Place().is_main
    place = Place.from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (place.rank, place.world_size, place.local_rank, place.active, place.is_main) == (1, 2, 1, True, False)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(InputError, match="torchrun"):
            Place.from_environment(bad)
    # one process: nothing collective happens
    assert Place().lead(lambda: 42) == 42
    assert Place().agree(0.5, True) == (0.5, True) and Place().mean(3) == 3.0


def test_devices_for_several_processes():
    place = Place(rank=0, world_size=2, local_rank=0, local_world_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            place.start("cuda")
    elif torch.cuda.device_count() < 2:
        with pytest.raises(InputError, match="one process per GPU"):
            place.start("cuda")
    with pytest.raises(InputError) as refused:
        place.start("mps")
    assert "\n" not in str(refused.value)


def test_launcher_builds_torchrun_argument_lists():
    python = "/opt/my python/bin/python"
    plain = launcher.engineCommand(python, "train", "/ws")
    assert plain == [python, "-m", "ExtremeAugLogic", "train", "/ws"]
    assert launcher.engineCommand(python, "train", "/ws", processes=1) == plain
    assert launcher.engineCommand(python, "train", "/ws", processes=4) == [
        python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
        "-m", "ExtremeAugLogic", "train", "/ws"]
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="processes"):
            launcher.engineCommand(python, "train", processes=bad)


def test_torchrun_report_does_not_hide_the_engine_error(tmp_path):
    code = ("import sys; print('error: /ws: training is already running; stop it first', file=sys.stderr); "
            "print('torch.distributed.elastic.multiprocessing.errors.ChildFailedError:', file=sys.stderr); "
            "print('=' * 60, file=sys.stderr); sys.exit(1)")
    process = launcher.EngineProcess([sys.executable, "-c", code], logPrefix=tmp_path / "t").start()
    process.wait(30)
    assert process.lastError() == "error: /ws: training is already running; stop it first"


def test_version_records_with_a_bad_world_size_are_refused(tmp_path):
    folder = tmp_path / "models" / "v1"
    record = {"name": "v1", "created_at": None, "settings": {}, "cases_seen": [], "parent": None,
              "status": "done", "val_scores": None, "iterations": 3}
    check_version_record(dict(record), folder / "version.json")  # written before world_size existed
    check_version_record(dict(record, world_size=4), folder / "version.json")
    for bad in (0, "2", 1.5, None):
        with pytest.raises(InputError, match="world_size"):
            check_version_record(dict(record, world_size=bad), folder / "version.json")


# ------------------------------------------------------------ the Slicer side

def test_panel_builds_the_torchrun_command_and_shows_the_world_size(tmp_path):
    from ExtremeAugLib import engine_cli, status_text, training_process

    args = engine_cli.trainCommand("/py", tmp_path, iterations=5, device="cpu", processes=2)
    assert args == ["/py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "ExtremeAugLogic", "train", str(tmp_path), "--iterations", "5", "--device", "cpu"]
    assert engine_cli.trainCommand("/py", tmp_path, iterations=5) == engine_cli.trainCommand(
        "/py", tmp_path, iterations=5, processes=1) == ["/py", "-m", "ExtremeAugLogic", "train", str(tmp_path),
                                                         "--iterations", "5"]
    training = dict(training_process.DEFAULT_STATUS, phase="training", version="v2", iteration=5, total=50)
    assert status_text.describeStatus(training) == "training v2 (5/50)"
    assert status_text.describeStatus(dict(training, world_size=4)) == "training v2 (5/50) on 4 processes"
    (tmp_path / "status.json").write_text(json.dumps(dict(training, world_size="x")))
    assert training_process.readStatus(tmp_path)["world_size"] == 1
