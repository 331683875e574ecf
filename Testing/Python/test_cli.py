"""The command line: every bad input gives one clear line, a non-zero exit, no traceback,
and leaves the workspace byte-for-byte unchanged."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ExtremeAugLogic", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".manifest.lock")}


def write(array, path, spacing=(1.0, 1.0, 2.0), vector=False):
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    scan = rng.random((8, 16, 16)).astype(np.float32)
    label = np.zeros((8, 16, 16), np.uint8)
    label[2:6, 4:12, 4:12] = 1
    nan_scan = scan.copy()
    nan_scan[0, 0, 0] = np.nan
    f = {
        "image": write(scan, d / "scan.nii.gz"),
        "label": write(label, d / "label.nii.gz"),
        "other_grid": write(label[:, :, :12], d / "label_small.nii.gz"),
        "empty": write(np.zeros_like(label), d / "empty.nii.gz"),
        "image2d": write(scan[0], d / "flat.nii.gz"),
        "image4d": write(np.stack([scan, scan, scan], -1), d / "four.nrrd", vector=True),
        "nan": write(nan_scan, d / "nan.nrrd"),
        "fraction": write(label.astype(np.float32) * 0.5, d / "fraction.nii.gz"),
        "garbage": d / "garbage.nii.gz",
        "missing": d / "nope.nii.gz",
    }
    f["garbage"].write_bytes(b"this is not an image" * 10)
    return f


@pytest.fixture
def workspace(tmp_path, files):
    ws = tmp_path / "ws"
    assert run("init", ws).returncode == 0
    done = run("add", ws, "--image", files["image"], "--label", files["label"], "--case-id", "first")
    assert done.returncode == 0, done.stderr
    return ws


BAD_ADDS = [
    ("missing image", ["--image", "{missing}", "--label", "{label}"], "nope.nii.gz", "not found"),
    ("unreadable image", ["--image", "{garbage}", "--label", "{label}"], "garbage.nii.gz", ""),
    ("label on another grid", ["--image", "{image}", "--label", "{other_grid}"], "label_small.nii.gz", "grid"),
    ("empty label", ["--image", "{image}", "--label", "{empty}"], "empty.nii.gz", "empty"),
    ("2D image", ["--image", "{image2d}", "--label", "{label}"], "flat.nii.gz", "2D"),
    ("4D image", ["--image", "{image4d}", "--label", "{label}"], "four.nrrd", ""),
    ("NaN intensities", ["--image", "{nan}", "--label", "{label}"], "nan.nrrd", "NaN"),
    ("non-integer label", ["--image", "{image}", "--label", "{fraction}"], "fraction.nii.gz", "integer"),
    ("case id with a separator", ["--image", "{image}", "--label", "{label}", "--case-id", "a/b"], "a/b", ""),
    ("case id with ..", ["--image", "{image}", "--label", "{label}", "--case-id", ".."], "..", ""),
    ("duplicate case id", ["--image", "{image}", "--label", "{label}", "--case-id", "first"], "first", ""),
]


@pytest.mark.parametrize("what,args,names,says", BAD_ADDS, ids=[b[0] for b in BAD_ADDS])
def test_bad_add_is_one_clear_line_and_changes_nothing(workspace, files, what, args, names, says):
    before = snapshot(workspace)
    result = run("add", workspace, *[a.format(**files) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert names in lines[0] and says.lower() in lines[0].lower(), lines[0]
    assert snapshot(workspace) == before


def test_folder_that_is_not_a_workspace(tmp_path, files):
    (tmp_path / "random").mkdir()
    for args in (["add", tmp_path / "random", "--image", files["image"], "--label", files["label"]],
                 ["train", tmp_path / "random"], ["predict", tmp_path / "random", "--image", files["image"],
                                                  "--output", tmp_path / "o.nii.gz"]):
        result = run(*args)
        assert result.returncode == 2 and "not an ExtremeAug workspace" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert list((tmp_path / "random").iterdir()) == []


def test_predict_without_a_model_and_evaluate_with_a_missing_file(workspace, files, tmp_path):
    result = run("predict", workspace, "--image", files["image"], "--output", tmp_path / "p.nii.gz")
    assert result.returncode == 2 and "no trained model" in result.stderr
    result = run("evaluate", "--prediction", files["missing"], "--reference", files["label"])
    assert result.returncode == 2 and "nope.nii.gz" in result.stderr and "Traceback" not in result.stderr
    result = run("evaluate", "--prediction", files["other_grid"], "--reference", files["label"])
    assert result.returncode == 2 and "grid" in result.stderr


def test_bad_training_options(workspace, capsys):
    """The first refusal in a child process as a user runs it (nothing else on stderr); the rest in
    this process through the same ``main`` (a child costs seconds of imports each)."""
    from ExtremeAugLogic.cli import main

    before = snapshot(workspace)
    result = run("train", workspace, "--minutes", "-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == ["error: --minutes -1.0: must be positive"], result.stderr
    for args in (["--iterations", "0"], ["--resume"], ["--init-from", "v9"], ["--device", "tpu"],
                 ["--set", "nonsense"]):
        code = main(["train", str(workspace), *args])
        stderr = capsys.readouterr().err
        assert code == 2, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr
    after = snapshot(workspace)
    after.pop("status.json", None)
    before.pop("status.json", None)
    assert after == before


def test_evaluate_prints_dice_and_hd95(files):
    result = run("evaluate", "--prediction", files["label"], "--reference", files["label"])
    assert result.returncode == 0
    assert "1.000" in result.stdout
