"""A short real training on the phantom, prediction geometry, SIGTERM stop and resume, self-training."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ExtremeAugLogic.demo import phantom
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.evaluation import dice_scores
from ExtremeAugLogic.workspace.imageio import read_label, write_image
from ExtremeAugLogic.inference import load_model, predict_array, predict_file
from ExtremeAugLogic.workspace.status import read_status, wait_until
from ExtremeAugLogic.training import TrainRequest, train
from ExtremeAugLogic.workspace import Workspace

# A small but real configuration of the 2D model so the suite stays fast on 2 CPU cores.
SMALL = {"inplane_size": 128, "patch_size": 64, "stride": 32, "base_features": 8, "depth": 4,
         "max_features": 64, "batch_size": 8, "learning_rate": 3e-3}
TRAIN_ITERATIONS = 200
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _phantom_files(folder, seeds, shape=(64, 64, 24), contrast="t2"):
    paths = []
    for seed in seeds:
        image, label = phantom.make_phantom(seed, shape=shape, spacing=(3.0, 3.0, 3.0), contrast=contrast)
        binary = sitk.Cast(label > 0, sitk.sitkUInt8)  # all vertebrae as one structure
        img_path, lab_path = folder / f"p{seed}_image.nii.gz", folder / f"p{seed}_label.nii.gz"
        write_image(image, img_path)
        write_image(binary, lab_path)
        paths.append((img_path, lab_path))
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace with 2 training phantoms and 1 validation phantom, trained once."""
    folder = tmp_path_factory.mktemp("train")
    files = _phantom_files(folder, [11, 12, 13, 14])
    ws = Workspace.create(folder / "ws", structure_names={1: "vertebra"})
    for img, lab in files[:3]:
        ws.add_case(img, lab)
    torch.manual_seed(0)
    # 200 iterations: with today's intensity augmentation 120 left this phantom at Dice 0.49,
    # 200 reach 0.76 (about 1.5 s more), so the 0.5 floor below has a margin.
    result = train(TrainRequest(str(ws.path), iterations=TRAIN_ITERATIONS, settings=SMALL, progress_bar=False))
    return ws, files, result


def test_training_finishes_with_a_validated_best_model(trained):
    ws, _, result = trained
    assert result["phase"] == "done" and result["is_best"]
    status = read_status(ws.status_path)
    assert status["phase"] == "done" and status["iteration"] == TRAIN_ITERATIONS and status["val_dice"] is not None
    record = ws.version(result["version"])
    assert record["cases_seen"] == [c["id"] for c in ws.training_cases()]
    assert record["val_scores"]["cases"] == [c["id"] for c in ws.validation_cases()]
    folder = ws.model_dir(result["version"])
    for name in ("model.pt", "config.json", "checkpoint.pt", "log.csv", "training.png", "version.json"):
        assert (folder / name).is_file(), name
    state = torch.load(folder / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_loss_falls_and_dice_beats_the_untrained_model(trained):
    ws, files, result = trained
    with open(ws.model_dir(result["version"]) / "log.csv") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert losses[-1] < 0.8 * losses[0]
    recipe, config, model, _ = load_model(ws, None, "cpu")
    image = sitk.ReadImage(str(files[3][0]), sitk.sitkFloat32)
    truth = read_label(files[3][1])
    trained_dice = dice_scores(predict_array(recipe, config, model, image, "cpu"), truth)["mean_dice"]
    torch.manual_seed(1)
    untrained = recipe.build_model(config).eval()
    untrained_dice = dice_scores(predict_array(recipe, config, untrained, image, "cpu"), truth)["mean_dice"]
    assert trained_dice > untrained_dice + 0.2, (trained_dice, untrained_dice)
    assert trained_dice > 0.5


def test_prediction_lies_on_the_input_grid(trained, tmp_path):
    """Non-identity direction, anisotropic spacing and an odd origin survive predict exactly."""
    ws, _, _ = trained
    direction = (0.0, 0.0, 1.0, 0.6, 0.8, 0.0, -0.8, 0.6, 0.0)  # rotated and permuted axes
    image, label = phantom.make_phantom(21, shape=(60, 56, 18), spacing=(3.2, 2.7, 4.1),
                                        direction=direction, origin=(12.5, -40.25, 7.0))
    img_path = tmp_path / "scan.nrrd"
    write_image(image, img_path)
    out = tmp_path / "pred.nii.gz"
    predict_file(ws, img_path, out)
    prediction = sitk.ReadImage(str(out))
    assert prediction.GetSize() == image.GetSize()
    assert np.allclose(prediction.GetSpacing(), image.GetSpacing())
    assert np.allclose(prediction.GetOrigin(), image.GetOrigin())
    assert np.allclose(prediction.GetDirection(), image.GetDirection(), atol=1e-6)
    assert prediction.GetPixelID() == sitk.sitkUInt8
    # the segmentation is where the anatomy is, not mirrored or transposed
    truth = sitk.GetArrayFromImage(label) > 0
    assert dice_scores(sitk.GetArrayFromImage(prediction) > 0, truth)["binary_dice"] > 0.4


def _cli(*args):
    return [sys.executable, "-m", "ExtremeAugLogic", *map(str, args)]


def test_sigterm_stops_within_seconds_and_resume_continues(tmp_path):
    files = _phantom_files(tmp_path, [31])
    ws = Workspace.create(tmp_path / "ws")
    ws.add_case(*files[0])
    options = [x for key, value in SMALL.items() for x in ("--set", f"{key}={json.dumps(value)}")]
    env = dict(os.environ, PYTHONPATH=REPO)
    process = subprocess.Popen(_cli("train", ws.path, "--iterations", "100000", "--quiet", *options), env=env)
    try:
        status = wait_until(ws.status_path, lambda s: s.get("phase") == "training" and s.get("iteration", 0) >= 3, 120)
        assert status and status["phase"] == "training", status
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        assert time.monotonic() - sent < 10
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    status = read_status(ws.status_path)
    assert status["phase"] == "stopped"
    stopped_at = torch.load(ws.model_dir("v1") / "checkpoint.pt", weights_only=True)["iteration"]
    assert stopped_at >= 3 and ws.version("v1")["status"] == "stopped"

    done = subprocess.run(_cli("train", ws.path, "--resume", "--iterations", stopped_at + 4, "--quiet"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    status = read_status(ws.status_path)
    assert status["phase"] == "done" and status["version"] == "v1" and status["iteration"] == stopped_at + 4
    assert ws.best_version() == "v1"
    assert len(ws.versions()) == 1  # resumed, not restarted


def test_warm_start_after_a_correction(trained, tmp_path):
    ws, files, result = trained
    prediction = tmp_path / "pred.nii.gz"
    predict_file(ws, files[3][0], prediction)
    case = ws.add_case(files[3][0], files[3][1], corrected_from=prediction)
    assert case["status"] == "corrected" and case["split"] == "train"
    differing = np.count_nonzero(sitk.GetArrayFromImage(read_label(prediction, allow_empty=True))
                                 != sitk.GetArrayFromImage(read_label(files[3][1])))
    assert case["changed_voxels"] == differing
    again = train(TrainRequest(str(ws.path), iterations=10, init_from="best", settings=SMALL, progress_bar=False))
    record = ws.version(again["version"])
    assert record["parent"] == result["version"]
    assert case["id"] in record["cases_seen"]
    # the previous best was re-scored on the same validation cases before the comparison
    assert ws.version(result["version"])["val_scores"]["cases"] == record["val_scores"]["cases"]


def test_3d_model_trains_and_predicts_through_the_cli(tmp_path):
    """``train --model 3d`` and ``predict`` end to end, on a small anisotropic phantom."""
    files = _phantom_files(tmp_path, [41, 42], shape=(48, 48, 20))
    ws = Workspace.create(tmp_path / "ws")
    ws.add_case(*files[0])
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run(_cli("train", ws.path, "--model", "3d", "--iterations", "6", "--quiet",
                               "--set", "base_features=4", "--set", "cpu_max_voxels=32768"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config = json.loads((ws.model_dir("v1") / "config.json").read_text())
    assert config["kind"] == "3d"
    out = tmp_path / "pred3d.nii.gz"
    done = subprocess.run(_cli("predict", ws.path, "--image", files[1][0], "--output", out),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    prediction, image = sitk.ReadImage(str(out)), sitk.ReadImage(str(files[1][0]))
    assert prediction.GetSize() == image.GetSize()
    assert np.allclose(prediction.GetDirection(), image.GetDirection())


def test_self_training_on_unlabeled_scans_raises_dice_on_held_back_scans(tmp_path):
    """One delineated T2-like phantom; the worklist and the held-back phantoms are T1-like.

    With the default self-training the worklist teaches the model the other contrast: on this
    set, 800 iterations, Dice on three held-back T1 phantoms 0.34 -> 0.82 (seed 0; 0.46 -> 0.75
    with seed 1). Without a contrast shift self-training costs a little (0.875 -> 0.855); see
    docs/results/generalisation-explore/README.md. Random convolutions (a default since) are
    off here: they carry part of the contrast transfer themselves and make this gain depend on
    the seed (seeds 0 / 1 / 2: 0.52 -> 0.48, 0.41 -> 0.82, 0.52 -> 0.77), so the test would no
    longer isolate self-training. The test is the suite's slowest (140 s); shorter versions failed
    to isolate the effect (seeds 0 / 1 / 2): 400 iterations pseudo-label nothing (no scan reaches
    0.9 confidence; 0.44, 0.59, 0.43 either way), 500 at batch 4 gain once (0.40 -> 0.46), 800 at
    batch 4 gain once (0.56 -> 0.59, 0.43 -> 0.43).
    """
    delineated = _phantom_files(tmp_path, [11])[0]
    worklist = _phantom_files(tmp_path, [40, 41, 42, 43], contrast="t1")
    held_back = _phantom_files(tmp_path, [60, 61, 62], contrast="t1")
    dice = {}
    for unlabeled in (False, True):  # SMALL leaves unlabeled at the default, self-training
        ws = Workspace.create(tmp_path / f"ws-unlabeled-{unlabeled}", structure_names={1: "vertebra"})
        ws.add_case(*delineated, case_id="delineated", split="train")
        for image_path, _ in worklist:
            ws.add_to_worklist(image_path)
        torch.manual_seed(0)
        result = train(TrainRequest(str(ws.path), iterations=800, settings={**SMALL, "random_conv": 0.0},
                                    progress_bar=False, unlabeled=unlabeled, seed=0))
        assert result["phase"] == "done", result["message"]  # a SIGTERM to pytest stops the training
        if unlabeled:
            assert len(ws.version(result["version"])["pseudo_labels"]["used"]) >= 2
        recipe, config, model, _ = load_model(ws, None, "cpu")
        scores = [dice_scores(predict_array(recipe, config, model, sitk.ReadImage(str(image), sitk.sitkFloat32), "cpu"),
                              read_label(label))["binary_dice"] for image, label in held_back]
        dice[unlabeled] = sum(scores) / len(scores)
    assert dice[True] > dice[False] + 0.15, dice
    assert dice[True] > 0.65, dice


def _weights(ws, version):
    return torch.load(ws.model_dir(version) / "model.pt", weights_only=True)


def test_dropout_and_weight_averaging_change_the_saved_model_and_load(tmp_path):
    """Same seed, same data: training is repeatable, and averaging the last weights changes what is saved."""
    files = _phantom_files(tmp_path, [51, 52], shape=(48, 48, 16))
    ws = Workspace.create(tmp_path / "ws", structure_names={1: "vertebra"})
    ws.add_case(*files[0])
    small = {**SMALL, "inplane_size": 64, "depth": 3}
    runs = {}
    for name, extra in (("plain", {}), ("again", {}), ("averaged", {"average_weights": 0.5}),
                        ("dropout", {"dropout": 0.2})):
        result = train(TrainRequest(str(ws.path), iterations=12, settings={**small, **extra}, progress_bar=False))
        runs[name] = _weights(ws, result["version"])
    same = lambda a, b: all(torch.equal(runs[a][k], runs[b][k]) for k in runs[a])
    assert same("plain", "again")
    assert not same("plain", "averaged") and not same("plain", "dropout")
    assert runs["dropout"].keys() == runs["plain"].keys()  # dropout adds no weights: models stay loadable
    recipe, config, model, _ = load_model(ws, None, "cpu")  # the dropout model, the newest best
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules()) and not model.training
    image = sitk.ReadImage(str(files[1][0]), sitk.sitkFloat32)
    first, second = (predict_array(recipe, config, model, image, "cpu") for _ in range(2))
    assert np.array_equal(first, second)  # no dropout at prediction


@pytest.mark.parametrize("setting", [{"average_weights": 1.0}, {"dropout": -0.1}, {"dropout": "high"}])
def test_a_bad_dropout_or_averaging_share_is_refused_before_anything_is_written(tmp_path, setting):
    files = _phantom_files(tmp_path, [53], shape=(48, 48, 16))
    ws = Workspace.create(tmp_path / "ws", structure_names={1: "vertebra"})
    ws.add_case(*files[0])
    with pytest.raises(InputError, match=f"{next(iter(setting))} must be a number in \\[0, 1\\)"):
        train(TrainRequest(str(ws.path), iterations=5, settings={**SMALL, **setting}, progress_bar=False))
    assert ws.manifest()["versions"] == []


@pytest.mark.parametrize("setting, message", [
    ({"pseudo_label_rule": "best"}, "pseudo_label_rule must be one of ordered-largest, as-predicted, not 'best'"),
    ({"pseudo_label_check": "atlas"}, "pseudo_label_check must be 'off' or 'registration', not 'atlas'"),
    ({"pseudo_label_share": 1.5}, "pseudo_label_share must be a number in \\[0, 1\\], not 1.5"),
    ({"pseudo_label_share": True}, "pseudo_label_share must be a number"),
    ({"pseudo_label_at": 1.0}, "pseudo_label_at must be a fraction in \\(0, 1\\) or a list of increasing ones, not 1.0"),
    ({"pseudo_label_at": [0.7, 0.4]}, "pseudo_label_at must be a fraction .* not \\[0.7, 0.4\\]"),
    ({"pseudo_label_at": []}, "pseudo_label_at must be a fraction"),
    ({"pseudo_label_at": "0.5"}, "pseudo_label_at must be a fraction"),
    ({"structure_intensity": 0.5}, "structure_intensity must be a factor in \\[1, 4\\] \\(1 = off\\), not 0.5"),
    ({"structure_intensity": "1.3"}, "structure_intensity must be a factor"),
    ({"unlabeled": "mean-teacher"}, "unlabeled must be one of off, self-training, consistency, not 'mean-teacher'"),
    ({"consistency_threshold": 1.5}, "consistency_threshold must be a probability in \\[0, 1\\], not 1.5"),
    ({"consistency_from": 1.0}, "consistency_from must be a fraction in \\[0, 1\\)"),
    ({"consistency_batch": 0}, "consistency_batch must be a whole number >= 1, not 0")])
def test_a_bad_self_training_or_augmentation_setting_is_refused_before_anything_is_written(tmp_path, setting, message):
    files = _phantom_files(tmp_path, [53], shape=(48, 48, 16))
    ws = Workspace.create(tmp_path / "ws", structure_names={1: "vertebra"})
    ws.add_case(*files[0])
    with pytest.raises(InputError, match=message):
        train(TrainRequest(str(ws.path), iterations=5, settings={**SMALL, **setting}, progress_bar=False))
    assert ws.manifest()["versions"] == []
