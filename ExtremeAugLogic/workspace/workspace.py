"""The workspace folder: training cases, fixed validation split, model versions.

``extremeaug.json`` (the manifest) is the single source of truth. Every change re-reads
it from disk under an advisory lock, writes any image files first and rewrites the
manifest atomically last, so a crash at any moment leaves the previous manifest valid.
Files that exist without a manifest entry are leftovers of an interrupted change; they
are ignored and overwritten when the change is retried. ``dataset.json`` (nnU-Net v2) is
derived from the manifest and rewritten right after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import SimpleITK as sitk

from ExtremeAugLogic import contract
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.workspace import atomic, imageio, locking, rounds_chart, waiting_predictions
from ExtremeAugLogic.workspace.overlap import correction_effort, dice_scores
from ExtremeAugLogic.manifest_check import check_manifest, check_version_record, contained
from ExtremeAugLogic.workspace.status import now_iso

FORMAT_VERSION = 1
MANIFEST_NAME = contract.MANIFEST_NAME
DATASET_JSON_NAME = contract.DATASET_JSON_NAME
STATUS_NAME = contract.STATUS_NAME
TRAIN_LOCK_NAME = contract.TRAIN_LOCK_NAME
MANIFEST_LOCK_NAME = contract.MANIFEST_LOCK_NAME
IMAGES_DIR, LABELS_DIR = contract.IMAGES_DIR, contract.LABELS_DIR
PREDICTIONS_DIR, MODELS_DIR = contract.PREDICTIONS_DIR, contract.MODELS_DIR
FILE_ENDING = contract.FILE_ENDING
MAX_CASE_ID_LENGTH = contract.MAX_CASE_ID_LENGTH
MIN_CASES_FOR_VALIDATION = 3
VALIDATION_FRACTION = 0.2
NO_VALIDATION_REASON = "no validation cases: newest model used"
WORKLIST = contract.WORKLIST_SPLIT  # the split of a scan without a label yet

ImageOrPath = Union[str, os.PathLike, sitk.Image]

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gz")
_NAME_TAILS = ("_0000", "_image", "_img", "_scan", "_volume", "_vol", "-image", "-scan")


@dataclass
class CaseData:
    """One training or validation case in memory (SimpleITK images on the same grid)."""

    case_id: str
    image: sitk.Image  # float32, 3D
    label: sitk.Image  # integer labels 0..K, same grid


def validate_case_id(case_id) -> str:
    """Return ``case_id`` if it is a safe file-name stem (the contract's rule), else raise InputError."""
    problem = contract.name_problem(case_id, "case id")
    if problem:
        raise InputError(f"{case_id!r}: {problem}" if not isinstance(case_id, str) or not case_id
                         else f"{case_id}: {problem}")
    return case_id


def case_id_from_filename(path: str | os.PathLike) -> Optional[str]:
    """Derive a case id from a scan's file name (``spine_03_0000.nii.gz`` -> ``spine_03``)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for tail in _NAME_TAILS:
        if name.lower().endswith(tail) and len(name) > len(tail):
            name = name[: -len(tail)]
            break
    name = contract.safe_name_stem(name)
    try:
        return validate_case_id(name)
    except InputError:
        return None


def auto_split(order: int, validation_count: int) -> str:
    """Split for the ``order``-th case (1-based) given how many validation cases exist.

    Case 3 is the first validation case, then one more whenever the validation share
    would drop below 20 % (case 8, 13, ...). Decided once; never revisited.
    """
    wanted = round(VALIDATION_FRACTION * order)
    if order >= MIN_CASES_FOR_VALIDATION and validation_count < wanted:
        return "validation"
    return "train"


class Workspace:
    """A workspace folder (see docs/architecture.md for the layout)."""

    def __init__(self, path: str | os.PathLike):
        """Open an existing workspace; prefer :meth:`open` / :meth:`create`."""
        self.path = Path(path)
        self._manifest: dict = {}
        self._lock_depth = 0
        self._lock_handle = None
        self._reload()

    # ------------------------------------------------------------ creating / opening

    @classmethod
    def create(cls, path: str | os.PathLike, modality: str = "MRI",
               structure_names: Optional[dict] = None) -> "Workspace":
        """Create a workspace at ``path`` (or open it if it already is one)."""
        folder = Path(path)
        if cls.is_workspace(folder):
            ws = cls(folder)
            ws._ensure_layout()
            return ws
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{path}: is a file, not a folder")
        if folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):
            raise InputError(f"{path}: folder is not empty and is not an ExtremeAug workspace; "
                             "choose a new or empty folder")
        if not isinstance(modality, str) or not modality.strip():
            raise InputError(f"{modality!r}: modality must be a non-empty name such as 'MRI' or 'CT'")
        names = _clean_structure_names(structure_names or {}, "structure names")
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_at": now_iso(),
            "modality": modality.strip(),
            "structures": {str(k): v for k, v in sorted(names.items())},
            "cases": [],
            "versions": [],
            "best_version": None,
        }
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / MANIFEST_LOCK_NAME).touch()
            (folder / TRAIN_LOCK_NAME).touch()
            atomic.write_json(folder / MANIFEST_NAME, manifest)
        except PermissionError as exc:
            raise InputError(f"{path}: cannot create a workspace here ({exc.strerror})") from None
        ws = cls(folder)
        ws._ensure_layout()
        return ws

    def _ensure_layout(self) -> None:
        """Create missing sub-folders and dataset.json (after an interrupted ``create``)."""
        for sub in (IMAGES_DIR, LABELS_DIR, PREDICTIONS_DIR, MODELS_DIR):
            (self.path / sub).mkdir(exist_ok=True)
        if not self.dataset_json_path.is_file():
            self._write_dataset_json()

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Workspace":
        """Open an existing workspace; InputError if ``path`` is not one."""
        folder = Path(path)
        if not cls.is_workspace(folder):
            raise InputError(f"{path}: not an ExtremeAug workspace (no {MANIFEST_NAME}); "
                             f"run 'python -m ExtremeAugLogic init {path}' first")
        return cls(folder)

    @staticmethod
    def is_workspace(path: str | os.PathLike) -> bool:
        """True if ``path`` holds a manifest."""
        return (Path(path) / MANIFEST_NAME).is_file()

    # ------------------------------------------------------------ paths

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def dataset_json_path(self) -> Path:
        return self.path / DATASET_JSON_NAME

    @property
    def status_path(self) -> Path:
        """Live training status file (written by ``status.py``)."""
        return self.path / STATUS_NAME

    @property
    def lock_path(self) -> Path:
        """``train.lock``: pid of the running training process."""
        return self.path / TRAIN_LOCK_NAME

    @property
    def manifest_lock_path(self) -> Path:
        return self.path / MANIFEST_LOCK_NAME

    @property
    def models_dir(self) -> Path:
        return self.path / MODELS_DIR

    def image_path(self, case_id: str) -> Path:
        return contained(self.path, self.case(case_id)["image"])

    def label_path(self, case_id: str) -> Path:
        return contained(self.path, self.case(case_id)["label"])

    def prediction_path(self, case_id: str) -> Optional[Path]:
        rel = self.case(case_id)["prediction"]
        return contained(self.path, rel) if rel else None

    def model_dir(self, name: str) -> Path:
        """``models/<name>``; the name must pass the contract's name rule (so it stays inside)."""
        problem = contract.name_problem(name, "version name")
        if problem:
            raise InputError(f"{name!r}: {problem}")
        return self.models_dir / name

    def version_record_file(self, name: str) -> dict:
        """``models/<name>/version.json``, checked against the manifest's record (None if absent)."""
        path = self.model_dir(name) / contract.VERSION_RECORD_NAME
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise InputError(f"{path}: damaged ({exc})") from None
        return check_version_record(record, path, self._find_version(self._reload(), name))

    def __repr__(self) -> str:
        return f"Workspace({str(self.path)!r})"

    # ------------------------------------------------------------ manifest I/O

    def _reload(self) -> dict:
        """Re-read the manifest from disk (another process may have changed it)."""
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{self.path}: not an ExtremeAug workspace (no {MANIFEST_NAME}); "
                             f"run 'python -m ExtremeAugLogic init {self.path}' first") from None
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{self.manifest_path}: damaged manifest ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(manifest, dict):
            raise InputError(f"{self.manifest_path}: damaged manifest (not a JSON object)")
        version = manifest.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InputError(f"{self.manifest_path}: written by a newer ExtremeAug "
                             f"(format {version}, this one reads up to {FORMAT_VERSION})")
        manifest.setdefault("format_version", FORMAT_VERSION)
        manifest.setdefault("created_at", None)
        manifest.setdefault("modality", "MRI")
        manifest.setdefault("structures", {})
        manifest.setdefault("cases", [])
        manifest.setdefault("versions", [])
        manifest.setdefault("best_version", None)
        check_manifest(manifest, self.manifest_path)  # a workspace is untrusted input: names stay inside it
        self._manifest = manifest
        return manifest

    def _save(self) -> None:
        """Atomically rewrite the manifest, then the derived dataset.json."""
        atomic.write_json(self.manifest_path, self._manifest)
        self._write_dataset_json()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """Hold the manifest lock, reload, and yield the fresh manifest (re-entrant)."""
        if self._lock_depth == 0:
            self._lock_handle = locking.acquire_blocking(self.manifest_lock_path)
        self._lock_depth += 1
        try:
            yield self._reload()
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                locking.release(self._lock_handle)
                self._lock_handle = None

    def manifest(self) -> dict:
        """A fresh copy of the whole manifest."""
        return json.loads(json.dumps(self._reload()))

    # ------------------------------------------------------------ structures

    @property
    def modality(self) -> str:
        return self._reload()["modality"]

    def structure_names(self) -> dict[int, str]:
        """Names per label value, e.g. ``{1: "L1", 2: "L2"}``."""
        return _structures_from_manifest(self._reload())

    def set_structure_names(self, names: dict) -> dict[int, str]:
        """Rename (or add) structures; other names stay. Returns the full mapping."""
        names = _clean_structure_names(names, "structure names")
        with self._locked() as manifest:
            merged = {**_structures_from_manifest(manifest), **names}
            _check_unique_names(merged)
            manifest["structures"] = {str(k): v for k, v in sorted(merged.items())}
            self._save()
        return merged

    # ------------------------------------------------------------ cases

    def cases(self) -> list[dict]:
        """All cases in the order they were added (copies)."""
        return [dict(c) for c in sorted(self._reload()["cases"], key=lambda c: c["order"])]

    def case_ids(self, split: Optional[str] = None) -> list[str]:
        return [c["id"] for c in self.cases() if split is None or c["split"] == split]

    def case(self, case_id: str) -> dict:
        """The manifest entry of ``case_id``; InputError if absent."""
        for c in self._reload()["cases"]:
            if c["id"] == case_id:
                return dict(c)
        raise InputError(f"{case_id}: no such case in workspace {self.path}")

    def worklist_cases(self) -> list[dict]:
        """Scans added without a label, in the order they were added."""
        return [c for c in self.cases() if c["split"] == WORKLIST]

    def add_to_worklist(self, image: ImageOrPath, case_id: Optional[str] = None,
                        source_image: Optional[str] = None) -> dict:
        """Validate and add one scan without a label; it waits in the worklist until it is labelled.

        Never in ``labelsTr/`` nor counted as a training case in ``dataset.json``; adding its
        label later (``add_case`` with the same case id) moves it into the training set.
        """
        if case_id is not None:
            validate_case_id(case_id)
            self._check_new_id(case_id, self._reload())
        img, _, src_img = _load_image(image, source_image)
        with self._locked() as manifest:
            if case_id is None:
                case_id = self._default_case_id(src_img, manifest)
            self._check_new_id(case_id, manifest)
            entry = {
                "id": case_id, "status": WORKLIST, "split": WORKLIST,
                "image": f"{IMAGES_DIR}/{case_id}_0000{FILE_ENDING}", "label": None, "prediction": None,
                "source_image": src_img, "source_label": None, "added_at": now_iso(), "changed_voxels": None,
                "order": max((c["order"] for c in manifest["cases"]), default=0) + 1,
            }
            imageio.write_image(img, self.path / entry["image"])
            manifest["cases"].append(entry)
            self._save()
        return dict(entry)

    def worklist_prediction_files(self, case_id: str) -> tuple[Path, Path]:
        """(label map, record) of the prediction waiting for a worklist scan (``predictions/worklist/``)."""
        validate_case_id(case_id)
        return contract.worklist_prediction_files(self.path, case_id)

    def waiting_prediction(self, case_id: str) -> Optional[dict]:
        """The record of the prediction waiting for ``case_id`` (its model version, uncertainty), or None."""
        validate_case_id(case_id)
        return contract.read_waiting_prediction(self.path, case_id)

    def worklist_state(self, order: str = "added") -> list[dict]:
        """Every worklist scan with its waiting prediction's state (``contract.worklist_rows``)."""
        if order not in contract.WORKLIST_ORDERS:
            raise InputError(f"{order}: worklist order must be one of {', '.join(contract.WORKLIST_ORDERS)}")
        return contract.worklist_rows(self.path, self.cases(), self.best_version(), order)

    # ------------------------------------------------------------ the loop, round by round

    @property
    def rounds_chart_path(self) -> Path:
        """``rounds.png``: Dice and correction effort round by round (``write_rounds_chart``)."""
        return self.path / contract.ROUNDS_CHART_NAME

    def rounds(self) -> list[dict]:
        """One row per accepted correction, in the order they were accepted (``contract.round_rows``)."""
        manifest = self._reload()
        return contract.round_rows(manifest["cases"], manifest["versions"], manifest["best_version"])

    def queued(self) -> list[str]:
        """Training cases the best model has not trained on yet (``contract.queued_cases``)."""
        manifest = self._reload()
        return contract.queued_cases(manifest["cases"], manifest["versions"], manifest["best_version"])

    def test_then_train_scores(self) -> dict:
        """Each version's test-then-train score over the corrected scans it predicted."""
        return contract.test_then_train_scores(self._reload()["cases"])

    def write_rounds_chart(self) -> bool:
        """Redraw ``rounds.png`` from the manifest as it stands (under the manifest lock, so the
        newest state is drawn last); False, writing nothing, before the first accepted correction."""
        with self._locked() as manifest:
            rows = contract.round_rows(manifest["cases"], manifest["versions"], manifest["best_version"])
            queued = len(contract.queued_cases(manifest["cases"], manifest["versions"], manifest["best_version"]))
            title = (f"{len(rows)} accepted correction{'s' if len(rows) != 1 else ''}; best model "
                     f"{manifest['best_version'] or '-'}; queued: {queued}")
            return rounds_chart.write_rounds_chart(rows, self.rounds_chart_path, title)

    def training_cases(self) -> list[dict]:
        return [c for c in self.cases() if c["split"] == "train"]

    def validation_cases(self) -> list[dict]:
        return [c for c in self.cases() if c["split"] == "validation"]

    def validation_note(self) -> str:
        """One human sentence about the validation set."""
        cases = [c for c in self.cases() if c["split"] != WORKLIST]
        val = [c["id"] for c in cases if c["split"] == "validation"]
        if val:
            return (f"validation on {len(val)} held-out case{'s' if len(val) > 1 else ''} "
                    f"({', '.join(val)}); never trained on")
        if len(cases) < MIN_CASES_FOR_VALIDATION:
            return (f"no validation case yet (need {MIN_CASES_FOR_VALIDATION} cases, have {len(cases)}); "
                    "Dice on training data is not shown as validation")
        return ("no validation case (every case was added for training); "
                "Dice on training data is not shown as validation")

    def add_case(self, image: ImageOrPath, label: ImageOrPath, case_id: Optional[str] = None,
                 corrected_from: Optional[ImageOrPath] = None, structure_names: Optional[dict] = None,
                 split: str = "auto", source_image: Optional[str] = None,
                 source_label: Optional[str] = None, predicted_by: Optional[str] = None) -> dict:
        """Validate and add one delineated (or corrected) case; return its manifest entry.

        ``image``/``label``/``corrected_from`` are paths or SimpleITK images;
        ``corrected_from`` is the unedited prediction the label was corrected from, and
        ``predicted_by`` the model version that made it (known by itself for a worklist scan's
        waiting prediction). A corrected case records its correction effort and, before it
        joins training, its test-then-train scores: the Dice of the prediction against the
        accepted correction (``test_scores``), an unseen-scan measurement of ``predicted_by``.
        Without validation cases that may decide a best model on trial (see
        ``finish_version``); the returned entry then also holds ``trial``, a sentence saying how.
        Everything is checked before anything is written.
        """
        if split not in ("auto", "train", "validation"):
            raise InputError(f"{split}: split must be 'auto', 'train' or 'validation'")
        names = _clean_structure_names(structure_names or {}, "structure names")
        waiting = None
        if case_id is not None:
            validate_case_id(case_id)
            waiting = self._worklist_entry(case_id, self._reload())
            if waiting is None:
                self._check_new_id(case_id, self._reload())
        made_by = None
        record = self.waiting_prediction(case_id) if waiting is not None else None
        if record is not None:  # the prediction the clinician corrected: the effort is measured against it
            waiting_file = self.worklist_prediction_files(case_id)[0]
            if corrected_from is None:
                corrected_from = waiting_file
            if isinstance(corrected_from, (str, os.PathLike)) and Path(corrected_from).resolve() == waiting_file.resolve():
                made_by = record["version"]
        if predicted_by is not None:
            made_by = self._check_predicted_by(predicted_by, corrected_from, made_by, case_id)
        img, img_name, src_img = _load_image(image, source_image)
        if waiting is not None:  # the scan is already in the workspace: the one given must be the same
            stored = imageio.read_image(self.path / waiting["image"])
            difference = imageio.grid_difference(img, stored)
            if difference or not np.array_equal(sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(stored)):
                raise InputError(f"{img_name}: not the scan {case_id} in the worklist "
                                 f"({difference or 'other intensities'})")
        lab, _, src_lab = _load_label(label, source_label, "label", img, img_name, allow_empty=False)
        pred = None
        if corrected_from is not None:
            pred, _, _ = _load_label(corrected_from, None, "prediction", img, img_name, allow_empty=True)
        lab.CopyInformation(img)  # exact grid, not merely within tolerance
        if pred is not None:
            pred.CopyInformation(img)
        changed, effort, tested = None, {}, None
        if pred is not None:
            effort = correction_effort(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(lab),
                                       _slice_axis(img))
            changed = effort["changed_voxels"]
            tested = _test_scores(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(lab))
        previous_scores = None
        if tested is not None and record is not None and made_by == record["version"]:
            previous_scores = self._previous_model_scores(case_id, made_by, lab, img, img_name)

        with self._locked() as manifest:
            if case_id is None:
                case_id = self._default_case_id(src_img, manifest)
            if waiting is None or self._worklist_entry(case_id, manifest) is None:
                self._check_new_id(case_id, manifest)
            structures = _structures_from_manifest(manifest)
            merged = {**structures, **names}
            for value in imageio.label_values(lab):
                merged.setdefault(value, f"structure_{value}")
            _check_unique_names(merged)

            cases = [c for c in manifest["cases"] if c["id"] != case_id]  # a worklist entry is replaced
            order = max((c["order"] for c in manifest["cases"]), default=0) + 1
            if split == "auto":
                n_val = sum(1 for c in cases if c["split"] == "validation")
                labelled = sum(1 for c in cases if c["split"] != WORKLIST) + 1
                split = auto_split(labelled, n_val)
            entry = {
                "id": case_id,
                "status": "corrected" if pred is not None else "delineated",
                "split": split,
                "image": f"{IMAGES_DIR}/{case_id}_0000{FILE_ENDING}",
                "label": f"{LABELS_DIR}/{case_id}{FILE_ENDING}",
                "prediction": f"{PREDICTIONS_DIR}/{case_id}{FILE_ENDING}" if pred is not None else None,
                "source_image": src_img,
                "source_label": src_lab,
                "added_at": now_iso(),
                "changed_voxels": changed,
                **({"slices_touched": effort["slices_touched"], "structures_changed": effort["structures_changed"]}
                   if effort else {}),
                **({"predicted_by": made_by} if made_by else {}),
                **({"test_scores": tested} if tested else {}),
                **({"previous_model_scores": previous_scores} if previous_scores else {}),
                "order": order,
            }
            imageio.write_image(img, self.path / entry["image"])
            imageio.write_image(lab, self.path / entry["label"])
            if pred is not None:
                imageio.write_image(pred, self.path / entry["prediction"])
            cases.append(entry)
            manifest["cases"] = cases
            manifest["structures"] = {str(k): v for k, v in sorted(merged.items())}
            best_before = manifest.get("best_version")
            trial, judged = self._judge_trial(manifest)
            self._save()
            for judged_record in judged:
                self._write_version_json(judged_record)
            if waiting is not None:  # no longer waiting: its worklist prediction is kept as the case's own
                for path in self.worklist_prediction_files(case_id):
                    path.unlink(missing_ok=True)
                waiting_predictions.forget(self.path, case_id)
            if manifest.get("best_version") not in (None, best_before):  # dropped after its trial
                restored = waiting_predictions.restore_previous(
                    self.path, [c["id"] for c in cases if c["split"] == WORKLIST], manifest["best_version"])
                if restored:
                    trial += f"; its waiting predictions of {len(restored)} worklist scan(s) are back"
        return dict(entry, **({"trial": trial} if trial else {}))

    def _previous_model_scores(self, case_id: str, made_by: str, label: sitk.Image, image: sitk.Image,
                               image_name: str) -> Optional[dict]:
        """The Dice of the kept prediction of another model (``waiting_predictions``) against the same
        correction: ``{"version", "mean_dice", "binary_dice"}``, or None when none was kept."""
        kept = contract.read_previous_prediction(self.path, case_id)
        if kept is None or kept["version"] == made_by:
            return None
        kept_file = contract.previous_prediction_files(self.path, case_id)[0]
        kept_labels, _, _ = _load_label(kept_file, None, "prediction", image, image_name, allow_empty=True)
        kept_labels.CopyInformation(image)
        scores = _test_scores(sitk.GetArrayViewFromImage(kept_labels), sitk.GetArrayViewFromImage(label))
        return {"version": kept["version"], "mean_dice": scores["mean_dice"], "binary_dice": scores["binary_dice"]}

    def _check_predicted_by(self, predicted_by, corrected_from, made_by, case_id) -> str:
        """``predicted_by`` if it names a version of this workspace that can have made ``corrected_from``."""
        problem = contract.name_problem(predicted_by, "version name")
        if problem:
            raise InputError(f"{predicted_by!r}: {problem}")
        self.version(predicted_by)  # InputError for an unknown version
        if corrected_from is None:
            raise InputError(f"{predicted_by}: names the model of a prediction; give the prediction the "
                             "label was corrected from too (--corrected-from)")
        if made_by is not None and made_by != predicted_by:
            raise InputError(f"{predicted_by}: the prediction waiting for {case_id} was made by {made_by}")
        return predicted_by

    @staticmethod
    def _worklist_entry(case_id: str, manifest: dict) -> Optional[dict]:
        """The worklist entry named ``case_id`` (same spelling), or None."""
        return next((c for c in manifest["cases"] if c["id"] == case_id and c["split"] == WORKLIST), None)

    def _check_new_id(self, case_id: str, manifest: dict) -> None:
        """InputError if ``case_id`` (compared case-insensitively) is already used."""
        taken = {c["id"].lower() for c in manifest["cases"]}
        if case_id.lower() in taken:
            raise InputError(f"{case_id}: case id already in the workspace {self.path}; choose another id")

    @staticmethod
    def _default_case_id(source: Optional[str], manifest: dict) -> str:
        """Id from the scan's file name, else the first free ``case_NNN``."""
        taken = {c["id"].lower() for c in manifest["cases"]}
        if source:
            derived = case_id_from_filename(source)
            if derived and derived.lower() not in taken:
                return derived
        n = len(manifest["cases"]) + 1
        while f"case_{n:03d}" in taken:
            n += 1
        return f"case_{n:03d}"

    def load_case(self, case_id: str) -> tuple[sitk.Image, sitk.Image]:
        """The case's scan (float32) and label map, on the same grid."""
        entry = self.case(case_id)
        image = imageio.read_image(contained(self.path, entry["image"]))
        label = imageio.read_label(contained(self.path, entry["label"]), reference=image,
                                   reference_name=entry["image"], allow_empty=True)
        return image, label

    def load_prediction(self, case_id: str) -> Optional[sitk.Image]:
        """The unedited prediction a corrected case came from, or None."""
        path = self.prediction_path(case_id)
        return imageio.read_label(path, allow_empty=True) if path else None

    def load_cases(self, split: Optional[str] = None) -> list:
        """``CaseData`` for every labelled case in ``split`` ("train", "validation" or None = both)."""
        if split not in (None, "train", "validation"):
            raise InputError(f"{split}: split must be 'train', 'validation' or None")
        return [CaseData(c["id"], *self.load_case(c["id"])) for c in self.cases()
                if c["split"] != WORKLIST and (split is None or c["split"] == split)]

    # ------------------------------------------------------------ dataset.json

    def dataset_json(self) -> dict:
        """The nnU-Net v2 dataset description derived from the manifest."""
        manifest = self._manifest
        labels = {"background": 0}
        for value, name in sorted(_structures_from_manifest(manifest).items()):
            labels[name] = value
        return {
            "name": self.path.name,
            "description": "ExtremeAug workspace (nnU-Net v2 raw layout)",
            "channel_names": {"0": manifest.get("modality", "MRI")},
            "labels": labels,
            "numTraining": sum(1 for c in manifest["cases"] if c["split"] != WORKLIST),
            "file_ending": FILE_ENDING,
        }

    def _write_dataset_json(self) -> None:
        atomic.write_json(self.dataset_json_path, self.dataset_json())

    # ------------------------------------------------------------ model versions

    def versions(self) -> list[dict]:
        """Every version's record, oldest first, with its status as it stands now.

        A version recorded as ``training`` whose trainer is gone (killed, power loss: no live
        process holds ``train.lock`` and its recording process has ended) is shown as
        ``interrupted``.
        """
        return [self._shown(v) for v in self._reload()["versions"]]

    def version(self, name: str) -> dict:
        """The record of model version ``name`` (status as in :meth:`versions`); InputError if absent."""
        return self._shown(self._find_version(self._reload(), name))

    def best_version(self) -> Optional[str]:
        return self._reload()["best_version"]

    def _shown(self, record: dict) -> dict:
        shown = dict(record)
        shown["status"] = contract.shown_version_status(record, self.lock_path)
        return shown

    def training_pid(self) -> Optional[int]:
        """The pid of the live training that owns this workspace, or None."""
        return contract.lock_holder(self.lock_path)

    def resolve_version(self, version: Optional[str]) -> str:
        """``version`` itself, the best version for None/"best", or the newest finished for "latest"."""
        if version in (None, "", "best"):
            best = self.best_version()
            if best is None:
                raise InputError(f"{self.path}: no trained model yet; run 'train' first")
            return best
        if version == "latest":
            done = [v["name"] for v in self.versions() if v.get("status") == contract.VERSION_DONE]
            if not done:
                raise InputError(f"{self.path}: no finished model version yet")
            return done[-1]
        self.version(version)  # raises InputError for an unknown name
        return version

    def mark_interrupted(self) -> list[str]:
        """Record every version still marked ``training`` as ``interrupted``.

        Only a process that holds the training lock may call this: then no other trainer
        can be alive, and those records were left by one that died.
        """
        with self._locked() as manifest:
            stale = [v for v in manifest["versions"] if v.get("status") == contract.VERSION_TRAINING
                     and v.get("pid") != os.getpid()]
            for record in stale:
                record["status"] = contract.VERSION_INTERRUPTED
            if stale:
                self._save()
                for record in stale:
                    self._write_version_json(record)
        return [v["name"] for v in stale]

    def new_version(self, settings: dict, cases_seen: list[str], parent: Optional[str] = None,
                    world_size: int = 1) -> str:
        """Register a new model version in training; returns its name ("v1", "v2", ...).

        ``world_size``: how many processes train it (torchrun; 1 without).
        """
        with self._locked() as manifest:
            if parent is not None:
                self._find_version(manifest, parent)
            name = f"v{self._next_version_number(manifest)}"
            record = {
                "name": name,
                "created_at": now_iso(),
                "settings": dict(settings or {}),
                "cases_seen": list(cases_seen),
                "parent": parent,
                "status": contract.VERSION_TRAINING,
                "pid": os.getpid(),
                "world_size": int(world_size),
                "val_scores": None,
                "iterations": 0,
            }
            self.model_dir(name).mkdir(parents=True, exist_ok=True)
            manifest["versions"].append(record)
            self._save()
            self._write_version_json(record)
        return name

    def update_version(self, name: str, **fields) -> dict:
        """Change fields of a version's record (atomic manifest rewrite); returns the record."""
        if "name" in fields:
            raise ValueError("a version's name cannot change")
        with self._locked() as manifest:
            record = self._find_version(manifest, name)
            record.update(fields)
            self._save()
            self._write_version_json(record)
        return dict(record)

    def finish_version(self, name: str, val_scores: Optional[dict], status: str = "done") -> bool:
        """Record the final scores; make it the best model if it beats the current best.

        Higher ``val_scores["mean_dice"]`` wins. Without validation on either side, the
        newest finished model becomes best. A failed version never becomes best.
        Returns whether ``name`` is now the best version.

        Without any validation case in the workspace, a new version cannot be scored when it
        finishes (it trained on every labelled scan). If the best model already has a
        test-then-train score, the new version becomes best *on trial* against it (or against
        the version the best was on trial against): the first corrected scan the new version
        predicted decides, in ``add_case``, which of the two stays (``_judge_trial``).
        """
        with self._locked() as manifest:
            record = self._find_version(manifest, name)
            record.update(status=status, val_scores=val_scores, finished_at=now_iso())
            best_name = manifest.get("best_version")
            best = None
            if best_name and best_name != name:
                best = next((v for v in manifest["versions"] if v["name"] == best_name), None)
            rival = _trial_rival(manifest, best) if val_scores is None else None
            is_best, reason = _compare_to_best(record, best, rival)
            record["best_reason"] = reason if is_best else None
            record["comparison"] = reason
            record["trial_against"] = rival["name"] if is_best and rival else None
            replaced = best if is_best and best is not None and best.get("trial_against") else None
            if replaced is not None:  # its trial passes to the new best (above)
                replaced["trial_against"] = None
            if is_best:
                manifest["best_version"] = name
            self._save()
            self._write_version_json(record)
            if replaced is not None:
                self._write_version_json(replaced)
        return is_best

    def _judge_trial(self, manifest: dict) -> tuple[Optional[str], list]:
        """Decide a best version on trial once a scan it predicted was corrected (no validation cases).

        It stays best if its test-then-train mean Dice is at least its rival's: over the same
        corrected scans where the rival's prediction of them was kept (``previous_model_scores``),
        else over the scans each predicted; otherwise the rival is the best model again.
        Returns (a sentence or None, the version records changed).
        """
        best = next((v for v in manifest["versions"] if v["name"] == manifest.get("best_version")), None)
        if best is None or not best.get("trial_against") or _has_validation(manifest):
            return None, []
        tested = contract.test_then_train_scores(manifest["cases"])
        mine = tested.get(best["name"])
        if mine is None:
            return None, []
        rival = next((v for v in manifest["versions"] if v["name"] == best["trial_against"]), None)
        theirs = tested.get(best["trial_against"])
        paired = _paired_scores(manifest["cases"], best["name"], best["trial_against"])
        if paired is not None:  # both models' predictions of the same corrected scans
            mine, theirs = paired
        best["trial_against"] = None
        if rival is None or theirs is None or rival.get("status") != contract.VERSION_DONE \
                or mine["mean_dice"] >= theirs["mean_dice"]:
            if theirs is not None and rival is not None:
                reason = (f"test-then-train mean Dice {mine['mean_dice']:.4f} over {_scans(mine)} >= "
                          f"{theirs['mean_dice']:.4f} of {rival['name']} over {_scans(theirs)}")
            else:
                reason = f"test-then-train mean Dice {mine['mean_dice']:.4f} over {_scans(mine)}; no rival to compare"
            best["best_reason"] = best["comparison"] = reason
            return f"{best['name']} stays the best model: {reason}", [best]
        reason = (f"test-then-train mean Dice {theirs['mean_dice']:.4f} over {_scans(theirs)} > "
                  f"{mine['mean_dice']:.4f} of {best['name']} over {_scans(mine)}")
        best["best_reason"] = None
        best["comparison"] = f"dropped after its trial: {reason}"
        rival["best_reason"] = reason
        manifest["best_version"] = rival["name"]
        return f"{rival['name']} is the best model again: {reason}", [best, rival]

    def set_best_version(self, name: Optional[str], reason: str = "chosen by the user") -> None:
        """Make ``name`` the model used for prediction (or None for none)."""
        with self._locked() as manifest:
            record = None
            if name is not None:
                record = self._find_version(manifest, name)
                record.update(best_reason=reason, trial_against=None)
            manifest["best_version"] = name
            self._save()
            if record is not None:
                self._write_version_json(record)

    def _find_version(self, manifest: dict, name: str) -> dict:
        for record in manifest["versions"]:
            if record["name"] == name:
                return record
        raise InputError(f"{name}: no such model version in workspace {self.path}")

    def _next_version_number(self, manifest: dict) -> int:
        """One more than any version in the manifest or any leftover ``models/vN`` folder."""
        numbers = [0]
        for record in manifest["versions"]:
            m = re.fullmatch(r"v(\d+)", record["name"])
            if m:
                numbers.append(int(m.group(1)))
        if self.models_dir.is_dir():
            for entry in self.models_dir.iterdir():
                m = re.fullmatch(r"v(\d+)", entry.name)
                if m:
                    numbers.append(int(m.group(1)))
        return max(numbers) + 1

    def _write_version_json(self, record: dict) -> None:
        """Mirror a version's record into ``models/vN/version.json``."""
        atomic.write_json(self.model_dir(record["name"]) / "version.json", record)


# ---------------------------------------------------------------- helpers

def _slice_axis(image: sitk.Image) -> int:
    """The numpy axis a clinician draws slice by slice: the acquisition plane (largest spacing, then fewest voxels)."""
    spacing = imageio.case_spacing_zyx(image)
    size = imageio.case_shape_zyx(image)
    return min(range(3), key=lambda a: (-round(spacing[a], 3), size[a]))



def _compare_to_best(record: dict, best: Optional[dict], rival: Optional[dict] = None) -> tuple[bool, str]:
    """Whether ``record`` should replace ``best``, and why (a short sentence).

    ``rival``: without validation, the version a new best model is on trial against.
    """
    if record["status"] == contract.VERSION_FAILED:
        return False, "training failed"
    new = _mean_dice(record)
    if best is None:
        if new is None:
            return True, NO_VALIDATION_REASON
        return True, f"first model with validation mean Dice {new:.4f}"
    old = _mean_dice(best)
    if new is None and old is None:
        if rival is not None:
            return True, f"{NO_VALIDATION_REASON}, on trial against {rival['name']} (test-then-train)"
        return True, NO_VALIDATION_REASON
    if new is None:
        return False, f"no validation score; {best['name']} has validation mean Dice {old:.4f}"
    if old is None:
        return True, f"validation mean Dice {new:.4f}; {best['name']} had no validation score"
    if new > old:
        return True, f"validation mean Dice {new:.4f} > {old:.4f} of {best['name']}"
    return False, f"validation mean Dice {new:.4f} <= {old:.4f} of {best['name']}"


def _has_validation(manifest: dict) -> bool:
    return any(c["split"] == "validation" for c in manifest["cases"])


def _trial_rival(manifest: dict, best: Optional[dict]) -> Optional[dict]:
    """Without validation cases: the version a new best would be on trial against, or None.

    The best model itself once a scan it predicted was corrected (it has a test-then-train
    score), else the version the best model is still on trial against.
    """
    if best is None or _has_validation(manifest):
        return None
    tested = contract.test_then_train_scores(manifest["cases"])
    name = best["name"] if best["name"] in tested else best.get("trial_against")
    return next((v for v in manifest["versions"] if v["name"] == name), None) if name else None


def _scans(scores: dict) -> str:
    same = "the same " if scores.get("paired") else ""
    return f"{same}{scores['scans']} scan{'s' if scores['scans'] != 1 else ''}"


def _paired_scores(cases: list, name: str, rival: str) -> Optional[tuple[dict, dict]]:
    """(``name``'s, ``rival``'s) test-then-train means over the corrected scans both predicted:
    those ``name`` predicted whose kept previous prediction was ``rival``'s; None if there are none."""
    rows = [c for c in cases if c.get("predicted_by") == name and isinstance(c.get("test_scores"), dict)
            and isinstance(c.get("previous_model_scores"), dict) and c["previous_model_scores"].get("version") == rival]
    if not rows:
        return None

    def means(key: str) -> dict:
        return {**{field: float(np.mean([c[key][field] for c in rows])) for field in ("mean_dice", "binary_dice")},
                "scans": len(rows), "cases": [c["id"] for c in rows], "paired": True}

    return means("test_scores"), means("previous_model_scores")


def _test_scores(prediction: np.ndarray, corrected: np.ndarray) -> dict:
    """Test-then-train: the Dice of a prediction against its accepted correction (binary, per structure)."""
    labels = [int(v) for v in np.union1d(np.unique(prediction), np.unique(corrected)) if v != 0]
    scores = dice_scores(prediction, corrected, labels)
    return {"mean_dice": float(scores["mean_dice"]), "binary_dice": float(scores["binary_dice"]),
            "per_structure": {str(k): float(v) for k, v in scores["per_structure"].items()}}


def _mean_dice(record: dict) -> Optional[float]:
    scores = record.get("val_scores") or {}
    value = scores.get("mean_dice")
    if value is None:
        return None
    value = float(value)
    return None if not np.isfinite(value) else value


def _structures_from_manifest(manifest: dict) -> dict[int, str]:
    return {int(k): v for k, v in sorted(manifest.get("structures", {}).items(), key=lambda kv: int(kv[0]))}


def _clean_structure_names(names: dict, what: str) -> dict[int, str]:
    """Validate ``{value: name}`` (values 1..65535, non-empty unique names)."""
    if not isinstance(names, dict):
        raise InputError(f"{what}: expected a mapping of label value to name, got {type(names).__name__}")
    clean: dict[int, str] = {}
    for key, name in names.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise InputError(f"{key!r}: structure label value must be a whole number") from None
        if str(value) != str(key).strip() and not isinstance(key, int):
            raise InputError(f"{key!r}: structure label value must be a whole number")
        if not 1 <= value <= imageio.MAX_LABEL_VALUE:
            raise InputError(f"{key}: structure label value must be 1..{imageio.MAX_LABEL_VALUE}")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{key}: structure name must be non-empty text")
        name = name.strip()
        if name.lower() == "background":
            raise InputError(f"{name}: 'background' is reserved for label value 0")
        clean[value] = name
    _check_unique_names(clean)
    return clean


def _check_unique_names(names: dict[int, str]) -> None:
    seen: dict[str, int] = {}
    for value, name in names.items():
        if name in seen and seen[name] != value:
            raise InputError(f"{name}: structure name used for label values {seen[name]} and {value}")
        seen[name] = value


def _load_image(image: ImageOrPath, source: Optional[str]) -> tuple[sitk.Image, str, Optional[str]]:
    """(validated float32 image, name for messages, source string for the manifest)."""
    if isinstance(image, sitk.Image):
        name = source or "image"
        return imageio.check_image(image, name=name), name, source
    src = source or os.path.abspath(os.fspath(image))
    return imageio.read_image(image), os.fspath(image), src


def _load_label(label: ImageOrPath, source: Optional[str], what: str, reference: sitk.Image,
                reference_name: str, allow_empty: bool) -> tuple[sitk.Image, str, Optional[str]]:
    """(validated label on ``reference``'s grid, name for messages, source string)."""
    if isinstance(label, sitk.Image):
        name = source or what
        checked = imageio.check_label_image(label, reference=reference, name=name,
                                            reference_name=reference_name, allow_empty=allow_empty)
        return checked, name, source
    src = source or os.path.abspath(os.fspath(label))
    checked = imageio.read_label(label, reference=reference, reference_name=reference_name,
                                 allow_empty=allow_empty)
    return checked, os.fspath(label), src
