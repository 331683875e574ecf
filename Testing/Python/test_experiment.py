"""The paper's grid experiment on tiny phantoms: ranges, plan, results, report, resume."""

import json
import os
from pathlib import Path

import pytest
import SimpleITK as sitk

from ExtremeAugLogic.demo import phantom
from ExtremeAugLogic.evaluation import dice_scores
from ExtremeAugLogic.inference import load_model, predict_array
from ExtremeAugLogic.workspace import imageio
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.experiments.grid import (ExperimentSpec, Experiment, baseline_overrides, expand_cases, plan_cells,
                                        run_experiment)
from ExtremeAugLogic.workspace.imageio import write_image
from ExtremeAugLogic.workspace import Workspace

SMALL = {"inplane_size": 32, "patch_size": 16, "stride": 8, "base_features": 4, "depth": 2,
         "max_features": 16, "batch_size": 4, "learning_rate": 3e-3}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models run fastest on one thread (and do not thrash when the CPU is busy)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CLI test's child process
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three small phantoms named ph01..ph03 in the shared data layout."""
    folder = tmp_path_factory.mktemp("data")
    for i in range(1, 4):
        image, label = phantom.make_phantom(40 + i, shape=(32, 32, 16), spacing=(6.0, 6.0, 4.5))
        write_image(image, folder / f"ph{i:02d}_image.nii.gz")
        write_image(label, folder / f"ph{i:02d}_label.nii.gz")
    return folder


def _spec(data, out, **kw):
    base = dict(data=str(data), train=["ph01..ph02"], validate=["ph03"], out=str(out), subjects=[1],
                levels=[2], baselines=["none", "crops"], iterations_per_cell=2, settings=dict(SMALL),
                device="cpu", in_process=True, command="test")
    base.update(kw)
    return ExperimentSpec(**base)


def test_expand_ranges_keeps_padding_and_order():
    assert expand_cases(["vb01..vb03", "vb10"]) == ["vb01", "vb02", "vb03", "vb10"]
    assert expand_cases(["ivd11", "ivd20,ivd25"]) == ["ivd11", "ivd20", "ivd25"]
    assert expand_cases(["case8..case10"]) == ["case8", "case9", "case10"]
    assert expand_cases(["vb09..10"]) == ["vb09", "vb10"]
    for bad in (["vb03..vb01"], ["vb01..ivd03"], ["vb01", "vb01"], ["vb..x"]):
        with pytest.raises(InputError):
            expand_cases(bad)


def test_plan_equal_budget_and_paper_rule(data, tmp_path):
    spec = _spec(data, tmp_path / "o", subjects=[1, 2], levels=[5, 50], iterations_per_cell=10)
    from ExtremeAugLogic.experiments.grid import check_spec

    cells = plan_cells(check_spec(spec))
    assert [c.key for c in cells] == ["s1_L5", "s1_L50", "s1_none", "s1_crops",
                                      "s2_L5", "s2_L50", "s2_none", "s2_crops"]
    assert {c.budget_iterations for c in cells} == {10}
    epochs = plan_cells(check_spec(_spec(data, tmp_path / "o", levels=[5, 50], iterations_per_cell=10,
                                         compute="epochs")))
    assert [c.budget_iterations for c in epochs] == [10, 100, 10, 10]
    assert baseline_overrides("none", {}) == {"rotation_deg": 0.0, "scale": [1.0, 1.0], "translation_px": 0.0,
                                              "level": 1, "gamma": 1.0, "contrast": 1.0, "brightness": 0.0,
                                              "bias_field": 0.0, "noise_std": 0.0}
    crops = baseline_overrides("crops", {"patch_size": 32})
    assert crops["level"] == 0 and crops["translation_px"] == 16.0 and crops["rotation_deg"] == 0.0


def test_bad_inputs_name_the_problem(data, tmp_path):
    with pytest.raises(InputError, match="ph09_image"):
        Experiment(_spec(data, tmp_path / "o", train=["ph09"]))
    with pytest.raises(InputError, match="--subjects 3"):
        Experiment(_spec(data, tmp_path / "o", subjects=[3]))
    with pytest.raises(InputError, match="both"):
        Experiment(_spec(data, tmp_path / "o", validate=["ph01"]))


def test_grid_results_report_and_resume(data, tmp_path):
    out = tmp_path / "grid"
    lines = []
    results = run_experiment(_spec(data, out), log=lines.append)
    assert set(results["cells"]) == {"s1_L2", "s1_none", "s1_crops"}
    saved = json.loads((out / "results.json").read_text())
    for key, cell in saved["cells"].items():
        assert cell["iterations"] == 2
        assert set(cell["val_dice"]["per_case"]) == {"ph03"}
        # the recorded Dice is the cell model's own, recomputed here independently
        image = imageio.read_image(data / "ph03_image.nii.gz")
        truth = sitk.GetArrayFromImage(imageio.read_label(data / "ph03_label.nii.gz"))
        cell_ws = Workspace.open(out / "cells" / key)
        recipe, config, model, _ = load_model(cell_ws, cell["version"], "cpu")
        again = dice_scores(predict_array(recipe, config, model, image, "cpu"), truth, labels=config.structure_labels)
        assert cell["val_dice"]["binary"] == pytest.approx(again["binary_dice"], abs=1e-9)
        assert cell["val_dice"]["mean"] == pytest.approx(again["mean_dice"], abs=1e-9)
        assert set(cell["train_dice"]["per_case"]) == {"ph01"}
        ws = Workspace.open(out / "cells" / key)
        assert ws.case_ids("train") == ["ph01"] and ws.case_ids("validation") == []
    assert saved["cells"]["s1_none"]["overrides"]["level"] == 1
    assert saved["cells"]["s1_L2"]["distinct_samples"] == 2 * saved["cells"]["s1_L2"]["base_patches"]
    geometries = saved["patch_statistics"]["geometries"]
    assert [g["name"] for g in geometries] == ["the cells' settings", "the paper's geometry"]
    assert geometries[1]["slice_size"] == 256 and geometries[1]["patch_size"] == 128
    for geometry in geometries:
        assert set(geometry["kinds"]) == {"random_crops", "foreground", "grid", "crops_baseline"}
        for s in geometry["kinds"].values():  # the fractions follow from the counts
            assert s["with_foreground"] + s["without_foreground"] == s["patches"] > 0
            assert s["cut_fraction"] == pytest.approx(s["cutting_a_structure"] / max(s["with_foreground"], 1))
    report = (out / "report.md").read_text()
    assert "Table I" in report and "Table II" in report and "Equal budget per cell" in report
    assert "0.729" in report and "Published claim" in report and "command: `test`" in report
    for name in ("figure6_dice_vs_level.png", "figure7_dice_vs_scans.png"):
        assert (out / name).stat().st_size > 1000
    assert any("start s1_L2" in line and "ETA" in line for line in lines)
    assert any("done s1_crops" in line for line in lines)

    # A rerun skips finished cells; a grown grid trains only the new ones.
    lines.clear()
    before = (out / "cells" / "s1_L2" / "extremeaug.json").stat().st_mtime_ns
    results = run_experiment(_spec(data, out, levels=[2, 3]), log=lines.append)
    assert "s1_L3" in results["cells"] and "3 already done" in lines[0]
    assert [line for line in lines if " start " in line] == [next(line for line in lines if "start s1_L3" in line)]
    assert (out / "cells" / "s1_L2" / "extremeaug.json").stat().st_mtime_ns == before

    # Other options in the same --out are refused.
    with pytest.raises(InputError, match="iterations_per_cell"):
        Experiment(_spec(data, out, iterations_per_cell=5)).run()


def test_half_trained_cell_resumes_and_killed_one_restarts(data, tmp_path):
    from ExtremeAugLogic.training import TrainRequest, train

    out = tmp_path / "grid"
    spec = _spec(data, out, levels=[2], baselines=[], iterations_per_cell=3)
    # A cell stopped after 2 of its 3 iterations, with a checkpoint ...
    ws = Workspace.create(out / "cells" / "s1_L2")
    ws.add_case(str(data / "ph01_image.nii.gz"), str(data / "ph01_label.nii.gz"), case_id="ph01", split="train")
    train(TrainRequest(str(ws.path), iterations=2, settings={**SMALL, "level": 2}, device="cpu", progress_bar=False))
    ws.update_version("v1", status="stopped")
    lines = []
    results = run_experiment(spec, log=lines.append)
    assert any("resuming v1" in line for line in lines)
    assert results["cells"]["s1_L2"]["iterations"] == 3 and results["cells"]["s1_L2"]["resumed"]

    # ... and one killed before its first checkpoint starts again from scratch.
    out2 = tmp_path / "grid2"
    ws = Workspace.create(out2 / "cells" / "s1_L2")
    ws.add_case(str(data / "ph01_image.nii.gz"), str(data / "ph01_label.nii.gz"), case_id="ph01", split="train")
    ws.new_version({"level": 2}, ["ph01"])
    lines = []
    results = run_experiment(_spec(data, out2, levels=[2], baselines=[], iterations_per_cell=3), log=lines.append)
    assert any("starting it again" in line for line in lines)
    assert results["cells"]["s1_L2"]["version"] == "v1" and results["cells"]["s1_L2"]["iterations"] == 3


def test_cli_runs_one_cell_in_a_child_process(data, tmp_path, capsys):
    from ExtremeAugLogic.cli import main

    settings = [x for k, v in SMALL.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    code = main(["experiment", "--data", str(data), "--train", "ph01..ph02", "--validate", "ph03",
                 "--subjects", "1", "--levels", "2", "--baselines", "--iterations-per-cell", "2",
                 "--device", "cpu", "--train-dice-cases", "0", "--out", str(tmp_path / "cli"), *settings])
    assert code == 0, capsys.readouterr().err
    cell = json.loads((tmp_path / "cli" / "results.json").read_text())["cells"]["s1_L2"]
    assert cell["peak_rss_mib"] is not None and cell["peak_rss_mib"] > 50
    assert cell["train_dice"] is None and cell["iterations"] == 2
    assert os.path.isfile(tmp_path / "cli" / "cells" / "s1_L2" / "train.log")
    assert "done s1_L2" in capsys.readouterr().out


def test_machine_line_names_the_vector_extension_that_sets_cpu_speed():
    from ExtremeAugLogic.experiments.machine import machine_description, vector_extension
    assert vector_extension("fpu sse2 avx avx2 fma avx512f avx512bw") == "AVX-512"
    assert vector_extension("fpu sse2 avx avx2 fma") == "AVX2"
    assert vector_extension("fp asimd evtstrm") == ""
    line = machine_description()
    assert "cores" in line and "torch" in line
    if os.path.exists("/proc/cpuinfo") and "avx2" in Path("/proc/cpuinfo").read_text():
        assert "AVX" in line.split(",")[0]
