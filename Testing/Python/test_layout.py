"""The engine's layout: no import cycle, one contract both sides read, libraries where they exist."""

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_hausdorff_distance
from monai.transforms import ScaleIntensityRangePercentiles

from ExtremeAugLogic import cli, contract, launcher
from ExtremeAugLogic.evaluation import hausdorff95
from ExtremeAugLogic.recipes import model_kinds
from ExtremeAugLogic.recipes.slice2d.preprocess import scale_to_unit
from ExtremeAugLogic.recipes.windows import count_windows, window_probabilities
from ExtremeAugLogic.workspace import status, workspace
from ExtremeAugLib import engine_cli, training_process, workspace_view

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "ExtremeAugLogic"
LIB = REPO / "ExtremeAug" / "ExtremeAugLib"


# ---------------------------------------------------------------- imports

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _engine_imports() -> dict:
    """``{module: {engine modules it imports}}``, from every import statement, top-level or not."""
    modules = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # "from pkg import sub" imports the submodule pkg.sub when there is one
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def test_engine_has_no_import_cycle():
    graph = _engine_imports()
    assert len(graph) > 30 and "ExtremeAugLogic.training.trainer" in graph
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_cycle_finder_finds_a_cycle(tmp_path):
    """The walk above must see a cycle when there is one (guards the test itself)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    seen = []

    def visit(node, stack):
        for nxt in graph[node]:
            if nxt in stack:
                seen.append(nxt)
                return
            visit(nxt, stack + [nxt])

    visit("a", ["a"])
    assert seen == ["a"]


def test_shared_modules_use_only_the_standard_library():
    """What the Slicer side imports from the engine loads before torch or monai are installed."""
    for name in ("contract.py", "launcher.py", "errors.py", "manifest_check.py"):
        tree = ast.parse((ENGINE / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert module.split(".")[0] not in ("torch", "monai", "numpy", "SimpleITK", "scipy"), (name, module)
    lib_imports = set()
    for path in LIB.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ExtremeAugLogic"):
                lib_imports.add(node.module)
    assert lib_imports == {"ExtremeAugLogic", "ExtremeAugLogic.errors", "ExtremeAugLogic.launcher",
                           "ExtremeAugLogic.manifest_check"}


# ---------------------------------------------------------------- the contract

def test_both_sides_read_one_contract():
    assert engine_cli.MODEL_TYPES == contract.MODEL_KINDS == model_kinds()
    assert engine_cli.DEVICES == contract.DEVICES
    parser_choices = {a.dest: a.choices for sub in cli.build_parser()._subparsers._group_actions
                      for p in sub.choices.values() for a in p._actions if a.dest == "model"}
    assert tuple(parser_choices["model"]) == contract.MODEL_KINDS
    assert training_process.STATUS_FILE == workspace.STATUS_NAME == contract.STATUS_NAME
    assert training_process.RUNNING_PHASES + training_process.TERMINAL_PHASES == status.PHASES == contract.PHASES
    assert workspace_view.MANIFEST_FILE == workspace.MANIFEST_NAME == contract.MANIFEST_NAME
    assert workspace_view.MAX_CASE_ID_LENGTH == workspace.MAX_CASE_ID_LENGTH == contract.MAX_CASE_ID_LENGTH
    assert training_process.pidExists is launcher.pidExists


@pytest.mark.parametrize("folder", [ENGINE, LIB])
def test_no_side_spells_the_contract_itself(folder):
    """File names and phase lists are written once, in contract.py; everyone else imports them."""
    spelled = re.compile(r"""["'](extremeaug\.json|status\.json|train\.lock|\.manifest\.lock)["']""")
    phases = re.compile(r"""\(\s*["']starting["']\s*,\s*["']preparing["']""")
    for path in folder.rglob("*.py"):
        if path.name == "contract.py":
            continue
        text = path.read_text(encoding="utf-8")
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not spelled.search(code), f"{path.relative_to(REPO)} spells a contract file name"
        assert not phases.search(code), f"{path.relative_to(REPO)} spells the status phases"


@pytest.mark.parametrize("name", ["scan 1 (copy).nii", "../../etc/passwd", "a" * 200, "ünïcode", "..", ""])
def test_slicer_case_ids_pass_the_engine_rule(tmp_path, name):
    case_id = workspace_view.newCaseId(tmp_path, name)
    assert workspace.validate_case_id(case_id) == case_id
    assert contract.name_problem(case_id) is None


# ---------------------------------------------------------------- libraries

@pytest.mark.parametrize("size,roi,overlap", [((40, 33), (16, 16), 0.5), ((20, 20, 9), (8, 8, 8), 0.25),
                                               ((16, 16), (16, 16), 0.5), ((100,), (30,), 0.6)])
def test_count_windows_matches_monai(size, roi, overlap):
    calls = [0]

    def predictor(t):
        calls[0] += t.shape[0]
        return t

    sliding_window_inference(torch.rand(1, 1, *size), roi, 3, predictor, overlap=overlap, mode="gaussian")
    assert count_windows(size, roi, overlap) == calls[0] > 0


def test_window_progress_counts_every_window_with_tta():
    model = torch.nn.Conv2d(1, 3, 1)
    seen = []
    x = torch.rand(2, 1, 40, 33)
    p = window_probabilities(model, x, (16, 16), "cpu", tta=True, progress=lambda d, t: seen.append((d, t)))
    assert p.shape == (2, 3, 40, 33) and torch.allclose(p.sum(1), torch.ones(2, 40, 33), atol=1e-5)
    assert seen[-1][0] == seen[-1][1] == count_windows((40, 33), (16, 16), 0.5) * 2 * 3


def test_scale_to_unit_equals_monai_percentile_scaling():
    rng = np.random.default_rng(0)
    array = rng.gamma(2.0, 50.0, size=(12, 30, 30)).astype(np.float32)
    ours = scale_to_unit(array)
    theirs = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(array)
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-6)
    assert not scale_to_unit(np.full((4, 4, 4), 7.0, np.float32)).any()


def test_hd95_crop_equals_monai_on_the_whole_volume():
    a = np.zeros((30, 40, 20), bool)
    b = np.zeros_like(a)
    a[5:15, 10:30, 4:12] = True
    b[8:19, 12:28, 6:15] = True
    spacing = (2.0, 0.8, 1.5)
    whole = compute_hausdorff_distance(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
                                       include_background=True, percentile=95, spacing=list(spacing))
    assert hausdorff95(a.astype(np.uint8), b.astype(np.uint8), spacing=spacing)[1] == pytest.approx(
        float(whole.item()), abs=1e-5)
    assert math.isfinite(float(whole.item())) and float(whole.item()) > 0
