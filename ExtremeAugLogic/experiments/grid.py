"""The paper's grid: one model per (number of training scans, augmentation level), plus baselines.

    python -m ExtremeAugLogic experiment --data ../shared/data/spine-vb --train vb01..vb10 \
        --validate vb11..vb15 --subjects 1 3 5 7 9 --levels 5 10 20 30 40 50 --out DIR

Every cell trains a fresh model on the first ``s`` scans of ``--train`` in its own workspace
(``DIR/cells/s{s}_L{N}``, baselines ``s{s}_none`` and ``s{s}_crops``), through the engine's
``train`` command in a child process (so its peak memory is its own), then the experiment
predicts the ``--validate`` scans (and the cell's own training scans, for Table I) with
``inference.predict_array`` and scores them with ``evaluation.dice_scores``.

Compute rule (default ``--compute equal``): every cell gets the same budget (iterations or
minutes). The level N therefore changes how many *distinct* augmented samples the model draws
its batches from (base patches x N), not how long it trains. The paper trained every cell for
100 epochs of its N-fold dataset, so its 50x cells had 10x the updates of its 5x cells and
augmentation was confounded with training length. ``--compute epochs`` reproduces that rule:
the budget is multiplied by N / min(levels) (baselines get the unscaled budget).

Baselines, same budget per training-set size (both also turn the engine's intensity jitter off):

- ``none``: no augmentation (rotation 0, scale 1, no translation, level 1): the base patches
  themselves, over and over.
- ``crops``: random crops only, what MONAI Label's default trainer does: no affine (rotation 0,
  scale 1) but the crop centre moved by a fresh uniform shift of up to half a patch for every
  sample (``translation_px`` = patch/2, level 0).

Results go to ``DIR/results.json`` (written atomically after every cell; a rerun of the same
command skips finished cells, resumes a half-trained one from its checkpoint, and restarts one
killed before its first checkpoint), ``DIR/report.md`` and the figures (see
``experiment_report``).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ExtremeAugLogic import contract, launcher
from ExtremeAugLogic.devices import is_gpu, resolve_device
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.evaluation.scoring import score_model
from ExtremeAugLogic.experiments import report as experiment_report
from ExtremeAugLogic.experiments.machine import machine_description, run_measured
from ExtremeAugLogic.experiments.report import PAPER_TABLE2, REPORT_NAME  # noqa: F401 - part of this API
from ExtremeAugLogic.inference.predict import load_model
from ExtremeAugLogic.recipes.slice2d import patches
from ExtremeAugLogic.recipes.slice2d.recipe import Recipe2D
from ExtremeAugLogic.training import DEFAULT_MINUTES_CPU, DEFAULT_MINUTES_GPU, TrainRequest, train
from ExtremeAugLogic.workspace import CaseData, Workspace, atomic, imageio
from ExtremeAugLogic.workspace.locking import OwnerLock
from ExtremeAugLogic.workspace.status import format_eta, now_iso, read_status

RESULTS_NAME = "results.json"
LOCK_NAME = "experiment.lock"
FORMAT_VERSION = 1

PAPER_SUBJECTS = (1, 3, 5, 7, 9)
PAPER_LEVELS = (5, 10, 20, 30, 40, 50)
BASELINES = ("none", "crops")
COMPUTE_RULES = ("equal", "epochs")
AUGMENTATION_KEYS = ("rotation_deg", "scale", "translation_px", "level")
# The paper's patch geometry (patch statistics are also measured with it).
PAPER_GEOMETRY = {"inplane_size": 256, "inplane_fit": "stretch", "patch_size": 128, "stride": 64}


# ---------------------------------------------------------------- inputs

_RANGE = re.compile(r"^(?P<p1>.*?)(?P<n1>\d+)\.\.(?P<p2>.*?)(?P<n2>\d+)$")


def expand_cases(tokens) -> list[str]:
    """Case ids from tokens: ``vb01..vb10`` expands to vb01, vb02, ..., vb10 (zero padding kept).

    Tokens may also be comma-separated; plain ids are kept as they are. Duplicates are an error.
    """
    out: list[str] = []
    for token in tokens:
        for part in str(token).split(","):
            part = part.strip()
            if not part:
                continue
            match = _RANGE.match(part)
            if match is None:
                if ".." in part:
                    raise InputError(f"{part}: a range must look like vb01..vb10 (same prefix, numbers at the end)")
                out.append(part)
                continue
            p1, n1, p2, n2 = match.group("p1", "n1", "p2", "n2")
            if p2 and p2 != p1:
                raise InputError(f"{part}: both ends of a range need the same prefix ({p1!r} vs {p2!r})")
            first, last = int(n1), int(n2)
            if last < first:
                raise InputError(f"{part}: the range runs backwards")
            width = len(n1) if n1.startswith("0") else 0
            out.extend(f"{p1}{i:0{width}d}" for i in range(first, last + 1))
    seen = set()
    for case in out:
        if case in seen:
            raise InputError(f"{case}: listed twice")
        seen.add(case)
    return out


def case_files(data: Path, case: str) -> tuple[Path, Path]:
    """``<data>/<case>_image.nii.gz`` and ``_label.nii.gz`` (InputError naming a missing one)."""
    image, label = data / f"{case}_image.nii.gz", data / f"{case}_label.nii.gz"
    for path in (image, label):
        if not path.is_file():
            raise InputError(f"{path}: not found (cases are <id>_image.nii.gz and <id>_label.nii.gz in --data)")
    return image, label


# ---------------------------------------------------------------- plan

@dataclass
class Cell:
    """One model of the grid."""

    key: str
    subjects: int
    level: Optional[int]          # None for a baseline
    baseline: Optional[str]       # None, "none" or "crops"
    budget_iterations: Optional[int]
    budget_minutes: Optional[float]
    overrides: dict = field(default_factory=dict)

    @property
    def column(self) -> str:
        return f"{self.level}x" if self.baseline is None else self.baseline


@dataclass
class ExperimentSpec:
    data: str
    train: list
    validate: list
    out: str
    subjects: list = field(default_factory=lambda: list(PAPER_SUBJECTS))
    levels: list = field(default_factory=lambda: list(PAPER_LEVELS))
    baselines: list = field(default_factory=lambda: list(BASELINES))
    minutes_per_cell: Optional[float] = None
    iterations_per_cell: Optional[int] = None
    compute: str = "equal"
    settings: dict = field(default_factory=dict)
    device: str = "auto"
    seed: int = 0
    in_process: bool = False      # train in this process (tests; no peak-memory figure)
    train_dice_cases: Optional[int] = None   # None = all of a cell's training scans, 0 = skip Table I
    command: str = ""


def merged_settings(settings: dict) -> dict:
    """The 2D recipe's settings after ``settings`` (and any preset in them) are applied."""
    return dict(Recipe2D(dict(settings or {})).settings)


def baseline_overrides(name: str, settings: dict) -> dict:
    """Recipe settings of a baseline (see the module docstring)."""
    off = {"gamma": 1.0, "contrast": 1.0, "brightness": 0.0, "bias_field": 0.0, "noise_std": 0.0}  # intensity augmentation off too
    if name == "none":
        return {"rotation_deg": 0.0, "scale": [1.0, 1.0], "translation_px": 0.0, "level": 1, **off}
    if name == "crops":
        half = int(merged_settings(settings)["patch_size"]) // 2
        return {"rotation_deg": 0.0, "scale": [1.0, 1.0], "translation_px": float(half), "level": 0, **off}
    raise InputError(f"--baselines {name}: must be one of {', '.join(BASELINES)}")


def plan_cells(spec: ExperimentSpec) -> list[Cell]:
    """Every cell in run order: per training-set size, the levels then the baselines."""
    minutes, iterations = spec.minutes_per_cell, spec.iterations_per_cell
    reference = min(spec.levels) if spec.levels else 1
    cells = []
    for s in spec.subjects:
        for level in spec.levels:
            factor = level / reference if spec.compute == "epochs" else 1.0
            cells.append(Cell(f"s{s}_L{level}", s, int(level), None,
                              None if iterations is None else max(1, int(round(iterations * factor))),
                              None if minutes is None else minutes * factor, {"level": int(level)}))
        for name in spec.baselines:
            cells.append(Cell(f"s{s}_{name}", s, None, name, iterations, minutes,
                              baseline_overrides(name, spec.settings)))
    return cells


def check_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """Validate the inputs (InputError on the first problem); fills in defaults."""
    data = Path(spec.data)
    if not data.is_dir():
        raise InputError(f"{spec.data}: --data is not a folder")
    spec.train, spec.validate = expand_cases(spec.train), expand_cases(spec.validate)
    if not spec.train:
        raise InputError("--train: give at least one case id")
    if not spec.validate:
        raise InputError("--validate: give at least one case id")
    overlap = sorted(set(spec.train) & set(spec.validate))
    if overlap:
        raise InputError(f"{overlap[0]}: in both --train and --validate")
    for case in spec.train + spec.validate:
        case_files(data, case)
    if not spec.subjects:
        spec.subjects = [s for s in PAPER_SUBJECTS if s <= len(spec.train)] or [len(spec.train)]
    for s in spec.subjects:
        if int(s) < 1:
            raise InputError(f"--subjects {s}: must be at least 1")
        if int(s) > len(spec.train):
            raise InputError(f"--subjects {s}: only {len(spec.train)} --train case(s) given")
    spec.subjects = sorted({int(s) for s in spec.subjects})
    for level in spec.levels:
        if int(level) < 1:
            raise InputError(f"--levels {level}: must be at least 1")
    spec.levels = sorted({int(v) for v in spec.levels})
    for name in spec.baselines:
        if name not in BASELINES:
            raise InputError(f"--baselines {name}: must be one of {', '.join(BASELINES)}")
    spec.baselines = [b for b in BASELINES if b in spec.baselines]
    if not spec.levels and not spec.baselines:
        raise InputError("--levels: nothing to train (no level and no baseline)")
    if spec.compute not in COMPUTE_RULES:
        raise InputError(f"--compute {spec.compute}: must be one of {', '.join(COMPUTE_RULES)}")
    if spec.minutes_per_cell is not None and spec.iterations_per_cell is not None:
        raise InputError("--minutes-per-cell and --iterations-per-cell: give one of them")
    if spec.minutes_per_cell is not None and spec.minutes_per_cell <= 0:
        raise InputError(f"--minutes-per-cell {spec.minutes_per_cell}: must be positive")
    if spec.iterations_per_cell is not None and spec.iterations_per_cell <= 0:
        raise InputError(f"--iterations-per-cell {spec.iterations_per_cell}: must be positive")
    if spec.minutes_per_cell is None and spec.iterations_per_cell is None:
        spec.minutes_per_cell = DEFAULT_MINUTES_GPU if is_gpu(resolve_device(spec.device)) else DEFAULT_MINUTES_CPU
    bad = [k for k in spec.settings if k in ("level", "offline_dir")]
    if bad:
        raise InputError(f"--set {bad[0]}: set by the experiment itself (use --levels)")
    return spec


class _SigtermAsInterrupt:
    """While active, SIGTERM raises KeyboardInterrupt (so children are stopped cleanly)."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(*_):
                raise KeyboardInterrupt()
            self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# ---------------------------------------------------------------- the run

class Experiment:
    """Runs (or continues) the grid of ``spec``; see the module docstring."""

    def __init__(self, spec: ExperimentSpec, log: Callable[[str], None] = print):
        self.spec = check_spec(spec)
        self.log = log
        self.out = Path(spec.out)
        self.data = Path(spec.data).resolve()
        self.cells = plan_cells(self.spec)
        self._val_cache = None
        self.patch_stats: dict = {}

    @property
    def results_path(self) -> Path:
        return self.out / RESULTS_NAME

    # ------------------------------------------------------------ results file
    def _identity(self) -> dict:
        """What must match for earlier results in ``--out`` to be reused."""
        return {"data": str(self.data), "train": self.spec.train, "validate": self.spec.validate,
                "minutes_per_cell": self.spec.minutes_per_cell, "iterations_per_cell": self.spec.iterations_per_cell,
                "compute": self.spec.compute, "settings": self.spec.settings, "seed": self.spec.seed}

    def _load_results(self) -> dict:
        identity = self._identity()
        if self.results_path.is_file():
            try:
                results = json.loads(self.results_path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise InputError(f"{self.results_path}: not valid JSON ({exc}); move it away to start over") from None
            old = results.get("experiment", {}).get("identity", {})
            for key, value in identity.items():
                if json.dumps(old.get(key), sort_keys=True) != json.dumps(value, sort_keys=True):
                    raise InputError(f"{self.results_path}: made with a different {key} ({old.get(key)!r}, now "
                                     f"{value!r}); use another --out or the same options to continue")
        else:
            results = {"format_version": FORMAT_VERSION, "cells": {}, "commands": []}
        results["experiment"] = {
            "identity": identity, "subjects": sorted(set(self.spec.subjects) | set(results.get("experiment", {}).get("subjects", []))),
            "levels": sorted(set(self.spec.levels) | set(results.get("experiment", {}).get("levels", []))),
            "baselines": [b for b in BASELINES if b in set(self.spec.baselines)
                          | set(results.get("experiment", {}).get("baselines", []))],
            "device": self.spec.device, "device_used": self._device(), "command": self.spec.command,
            "in_process": self.spec.in_process,
            "baseline_settings": {b: baseline_overrides(b, self.spec.settings) for b in BASELINES},
            "defaults": merged_settings(self.spec.settings),
        }
        results.setdefault("commands", [])
        if self.spec.command and (not results["commands"] or results["commands"][-1] != self.spec.command):
            results["commands"].append(self.spec.command)
        results["machine"] = machine_description()
        results.setdefault("started_at", _now())
        results.setdefault("cells", {})
        planned = list(results.get("planned", []))  # earlier runs' cells stay in the report
        results["planned"] = planned + [c.key for c in self.cells if c.key not in planned]
        return results

    def _save(self, results: dict) -> None:
        results["updated_at"] = _now()
        atomic.write_json(self.results_path, results)
        try:
            experiment_report.write_report(self.out, results)
        except Exception as exc:  # a plotting problem must not lose the grid
            self.log(f"warning: could not write the report: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------ main loop
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        with OwnerLock(self.out / LOCK_NAME, "an experiment is already running there"), _SigtermAsInterrupt():
            results = self._load_results()
            todo = [c for c in self.cells if c.key not in results["cells"]]
            self.log(f"experiment: {len(self.cells)} cells ({len(self.cells) - len(todo)} already done), "
                     f"{self._budget_text()} per cell, compute rule '{self.spec.compute}'; results in {self.out}")
            wanted = self.spec.train[:max(results["experiment"]["subjects"])]
            old = results.get("patch_statistics") or {}
            if old.get("cases") != wanted or "geometries" not in old:
                self.log("measuring patch statistics on the preprocessed training slices ...")
                results["patch_statistics"] = self.patch_statistics(wanted)
            self.patch_stats = results["patch_statistics"]
            self._save(results)
            run_start = time.monotonic()
            spent_units = spent_s = 0.0
            for index, cell in enumerate(todo, 1):
                remaining = todo[index - 1:]
                eta = self._eta(remaining, spent_units, spent_s)
                self.log(f"[{index}/{len(todo)}] start {cell.key}: {cell.subjects} scan(s), "
                         f"{'level ' + str(cell.level) if cell.baseline is None else 'baseline ' + cell.baseline}, "
                         f"{self._cell_budget_text(cell)}; live progress in {self.out / 'cells' / cell.key / contract.STATUS_NAME}; "
                         f"grid ETA {eta}")
                began = time.monotonic()
                record = self.run_cell(cell)
                results["cells"][cell.key] = record
                self._save(results)
                spent_s += time.monotonic() - began
                spent_units += self._units(cell)
                eta = self._eta(todo[index:], spent_units, spent_s)
                peak = record.get("peak_rss_mib")
                train = record.get("train_dice") or {}
                self.log(f"[{index}/{len(todo)}] done {cell.key}: validation Dice {record['val_dice']['binary']:.3f} "
                         f"(per structure {record['val_dice']['mean']:.3f}), training Dice "
                         f"{'-' if train.get('binary') is None else format(train['binary'], '.3f')}, "
                         f"{record['iterations']} it in {record['train_seconds']:.0f} s, peak "
                         f"{'-' if peak is None else format(peak, '.0f')} MiB; grid ETA {eta}")
            results["finished_at"] = _now()
            results["run_seconds"] = round(time.monotonic() - run_start, 1)
            self._save(results)
        self.log(f"done: {self.out / REPORT_NAME}")
        return results

    def _units(self, cell: Cell) -> float:
        return float(cell.budget_iterations if cell.budget_iterations is not None else cell.budget_minutes)

    def _eta(self, remaining: list, spent_units: float, spent_s: float) -> str:
        if not remaining:
            return "0m00s"
        units = sum(self._units(c) for c in remaining)
        if spent_units > 0:
            return format_eta(units * spent_s / spent_units)
        if self.spec.minutes_per_cell is not None:
            return f">{format_eta(units * 60.0)}"
        return "? (after the first cell)"

    def _budget_text(self) -> str:
        if self.spec.iterations_per_cell is not None:
            return f"{self.spec.iterations_per_cell} iterations"
        return f"{self.spec.minutes_per_cell:g} min"

    @staticmethod
    def _cell_budget_text(cell: Cell) -> str:
        if cell.budget_iterations is not None:
            return f"{cell.budget_iterations} iterations"
        return f"{cell.budget_minutes:g} min"

    # ------------------------------------------------------------ one cell
    def run_cell(self, cell: Cell) -> dict:
        folder = self.out / "cells" / cell.key
        cases = self.spec.train[:cell.subjects]
        ws, resume = self._prepare_workspace(folder, cases)
        began = time.monotonic()
        training = {"peak_rss_mib": None, "wall_s": None}
        version = self._finished_version(ws)
        if version is None:
            training = self._train(cell, ws, resume)
            version = self._finished_version(ws)
            if version is None:
                raise RuntimeError(f"{cell.key}: training ended without a finished model (see {folder / 'train.log'})")
        record = Workspace.open(folder).version(version)
        evaluated = time.monotonic()
        val = self._score(ws, version, self._validation_cases())
        train_cases = ws.load_cases("train")
        if self.spec.train_dice_cases is not None:
            train_cases = train_cases[:self.spec.train_dice_cases]
        train = self._score(ws, version, [(c.case_id, c.image, c.label) for c in train_cases]) if train_cases else None
        settings = record.get("settings", {})
        base = sum(self._base_patches().get(c, 0) for c in cases)
        level = settings.get("level")
        return {
            "key": cell.key, "subjects": cell.subjects, "train_cases": cases, "level": cell.level,
            "baseline": cell.baseline, "overrides": cell.overrides, "version": version,
            "budget_iterations": cell.budget_iterations, "budget_minutes": cell.budget_minutes,
            "iterations": int(record.get("iterations") or 0), "train_seconds": float(record.get("seconds") or 0.0),
            "batch_size": settings.get("batch_size"),
            "samples_drawn": int(record.get("iterations") or 0) * int(settings.get("batch_size") or 0),
            "base_patches": base or None,
            "distinct_samples": (base * int(level)) if base and level else None,
            "peak_rss_mib": training.get("peak_rss_mib"), "train_wall_s": training.get("wall_s"),
            "resumed": bool(resume),
            "eval_seconds": round(time.monotonic() - evaluated, 1),
            "cell_seconds": round(time.monotonic() - began, 1),
            "val_dice": val, "train_dice": train, "finished_at": _now(),
        }

    def _prepare_workspace(self, folder: Path, cases: list):
        """A workspace holding exactly ``cases`` for training; (workspace, resume?)."""
        if Workspace.is_workspace(folder):
            ws = Workspace.open(folder)
            if ws.case_ids("train") == cases and not ws.case_ids("validation"):
                if self._finished_version(ws) is not None:
                    self.log(f"  {folder.name}: training had finished; scoring it")
                    return ws, False
                for record in reversed(ws.versions()):
                    if record.get("status") in contract.RESUMABLE_STATUSES and \
                            (ws.model_dir(record["name"]) / contract.CHECKPOINT_NAME).is_file():
                        self.log(f"  {folder.name}: resuming {record['name']} from its checkpoint "
                                 f"(iteration {record.get('iterations')})")
                        return ws, True
            self.log(f"  {folder.name}: unfinished without a checkpoint; starting it again")
        if folder.exists():
            shutil.rmtree(folder)
        ws = Workspace.create(folder)
        for case in cases:
            image, label = case_files(self.data, case)
            ws.add_case(str(image), str(label), case_id=case, split="train")
        return ws, False

    @staticmethod
    def _finished_version(ws) -> Optional[str]:
        for record in reversed(ws.versions()):
            if record.get("status") == contract.VERSION_DONE and (ws.model_dir(record["name"]) / contract.MODEL_WEIGHTS_NAME).is_file():
                return record["name"]
        return None

    def _train(self, cell: Cell, ws, resume: bool) -> dict:
        settings = {**self.spec.settings, **cell.overrides}
        if self.spec.in_process:
            start = time.monotonic()
            result = train(TrainRequest(str(ws.path), minutes=cell.budget_minutes, iterations=cell.budget_iterations,
                                        device=self.spec.device, resume=resume, settings=settings,
                                        seed=self.spec.seed, progress_bar=False))
            if result.get("phase") != "done":
                raise KeyboardInterrupt()
            return {"wall_s": time.monotonic() - start, "peak_rss_mib": None}
        cmd = launcher.engineCommand(sys.executable, "train", ws.path, "--quiet",
                                     "--device", self.spec.device, "--seed", self.spec.seed)
        if cell.budget_iterations is not None:
            cmd += ["--iterations", str(cell.budget_iterations)]
        else:
            cmd += ["--minutes", repr(float(cell.budget_minutes))]
        if resume:
            cmd.append("--resume")
        else:
            for key, value in settings.items():
                cmd += ["--set", f"{key}={json.dumps(value)}"]
        measured = run_measured(cmd, ws.path / "train.log")
        if measured["returncode"] != 0:
            raise RuntimeError(f"{cell.key}: training failed (exit {measured['returncode']}): {measured['error']}")
        state = read_status(ws.status_path) or {}
        if state.get("phase") == "stopped":
            raise KeyboardInterrupt()
        return measured

    # ------------------------------------------------------------ scoring
    def _validation_cases(self) -> list:
        if self._val_cache is None:
            cases = []
            for case in self.spec.validate:
                image_path, label_path = case_files(self.data, case)
                image = imageio.read_image(image_path)
                cases.append((case, image, imageio.read_label(label_path, reference=image)))
            self._val_cache = cases
        return self._val_cache

    def _device(self) -> str:
        return resolve_device(self.spec.device)

    def _score(self, ws, version: str, cases: list) -> dict:
        """Mean Dice over ``cases`` [(id, image, label)]: binary, per-structure mean, per structure."""
        device = self._device()
        recipe, config, model, _ = load_model(ws, version, device)
        scores = score_model(recipe, config, model, [CaseData(*case) for case in cases], device)
        return {
            "binary": scores["binary_dice"], "mean": scores["mean_dice"], "per_structure": scores["per_structure"],
            "per_case": {cid: {"binary": c["binary_dice"], "mean": c["mean_dice"], "per_structure": c["per_structure"]}
                         for cid, c in scores["per_case"].items()},
        }

    # ------------------------------------------------------------ patch statistics
    def _base_patches(self) -> dict:
        return (self.patch_stats or {}).get("base_patches_per_case", {})

    def patch_statistics(self, case_ids: Optional[list] = None) -> dict:
        """Edge-cut statistics of training patches: random crops vs foreground-aware vs the paper's grid.

        Measured on the cells' own geometry and, when that differs, on the paper's (256 px
        slices, 128 px patches, stride 64), where a random crop is a real choice of position.
        """
        cells = Recipe2D(dict(self.spec.settings)).settings
        cases = []
        for case in case_ids or self.spec.train[:max(self.spec.subjects)]:
            image_path, label_path = case_files(self.data, case)
            image = imageio.read_image(image_path)
            cases.append(CaseData(case, image, imageio.read_label(label_path, reference=image)))
        geometries = [("the cells' settings", cells)]
        paper = {**cells, **PAPER_GEOMETRY}
        if any(cells.get(k) != v for k, v in PAPER_GEOMETRY.items()):
            geometries.append(("the paper's geometry", paper))
        out = {"cases": [c.case_id for c in cases], "sampling": cells.get("sampling"), "geometries": []}
        for name, settings in geometries:
            stats, counts = self._edge_statistics(cases, settings)
            stats["name"] = name
            out["geometries"].append(stats)
            if settings is cells:
                out["base_patches_per_case"] = counts
        return out

    def _edge_statistics(self, cases: list, settings: dict) -> tuple[dict, dict]:
        recipe = Recipe2D(dict(settings))
        settings = recipe.settings
        config = recipe.fit_config(cases, 2)
        patch, stride = int(settings["patch_size"]), int(settings["stride"])
        sampling = settings.get("sampling", "grid")
        rng = np.random.default_rng(self.spec.seed)
        per_kind = {k: [] for k in ("random_crops", "foreground", "grid", "crops_baseline")}
        counts, labels_all, offset = {}, [], 0
        for i, case in enumerate(cases):
            labels = recipe.preprocess(config, case.image, case.label).label
            n, size = labels.shape[0], labels.shape[1]
            grid = patches.grid_centres(n, size, patch, stride)
            fg = patches.base_centres(labels, patch, stride, "foreground", settings["fg_fraction"], self.spec.seed + i)
            base = fg if sampling == "foreground" else grid
            counts[case.case_id] = int(len(base))
            lo, hi = patch // 2, max(size - patch // 2, patch // 2 + 1)
            random_crops = np.stack([rng.integers(0, n, len(grid)), rng.integers(lo, hi, len(grid)),
                                     rng.integers(lo, hi, len(grid))], axis=1)
            crops_baseline = base.copy()  # the crops baseline: base centres + a fresh shift of up to half a patch
            shift = rng.uniform(-patch / 2, patch / 2, size=(len(base), 2))
            crops_baseline[:, 1:] = np.rint(base[:, 1:] + shift).astype(np.int64)
            for kind, centres in (("random_crops", random_crops), ("foreground", fg), ("grid", grid),
                                  ("crops_baseline", crops_baseline)):
                centres = centres.copy()
                centres[:, 0] += offset
                per_kind[kind].append(centres)
            labels_all.append(labels)
            offset += n
        labels = np.concatenate(labels_all)
        stats = {kind: patches.edge_statistics(labels, np.concatenate(c), patch) for kind, c in per_kind.items()}
        return {"patch_size": patch, "stride": stride, "slices": int(labels.shape[0]),
                "slice_size": int(labels.shape[1]), "sampling": sampling, "kinds": stats}, counts


def _now() -> str:
    return now_iso()


def run_experiment(spec: ExperimentSpec, log: Callable[[str], None] = print) -> dict:
    """Run or continue the grid; returns the results (also in ``spec.out``/results.json)."""
    return Experiment(spec, log).run()
