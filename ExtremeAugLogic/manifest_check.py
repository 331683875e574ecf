"""A workspace is untrusted input: checks of what its JSON files name, before anything uses it.

A workspace may come from a colleague or a network drive, so nothing it stores may lead the
engine outside the workspace folder: case paths, version names, ``best_version`` and version
parents in ``extremeaug.json``, the settings paths in ``models/<name>/config.json`` and the
record in ``models/<name>/version.json``. Each check returns its input unchanged or raises
``InputError`` with one line ``"<file>: <field>: <reason>"``. Nothing is written; only
``contained`` and the settings paths of ``check_version_config`` look at the file system
(to follow symbolic links), the other checks only look at the dicts they are given.

Standard library, ``contract`` and ``errors`` only: the Slicer side imports it too.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable, Optional

from ExtremeAugLogic import contract
from ExtremeAugLogic.errors import InputError

CASE_SPLITS = ("train", "validation", contract.WORKLIST_SPLIT)
CASE_PATH_FIELDS = ("image", "label", "prediction")
REQUIRED_CASE_FIELDS = ("id", "image", "split", "order")
PATH_SETTING_SUFFIXES = ("_dir", "_path")
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")

# ---------------------------------------------------------------- small type checks
# Each returns why ``value`` does not fit, or None.
Check = Callable[[object], Optional[str]]


def _shown(value, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value) -> Optional[str]:
    return None if _is_int(value) else f"must be a whole number, got {_shown(value)}"


def _number(value) -> Optional[str]:
    if not _is_number(value):
        return f"must be a number, got {_shown(value)}"
    return None if math.isfinite(value) else f"must be a finite number, got {_shown(value)}"


def _text(value) -> Optional[str]:
    return None if isinstance(value, str) else f"must be a text, got {_shown(value)}"


def _bool(value) -> Optional[str]:
    return None if isinstance(value, bool) else f"must be true or false, got {_shown(value)}"


def _dict(value) -> Optional[str]:
    return None if isinstance(value, dict) else f"must be a JSON object, got {type(value).__name__}"


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _list_of(check: Check) -> Check:
    def list_check(value) -> Optional[str]:
        if not isinstance(value, list):
            return f"must be a list, got {type(value).__name__}"
        for index, item in enumerate(value):
            problem = check(item)
            if problem:
                return f"[{index}] {problem}"
        return None
    return list_check


def _case_id(value) -> Optional[str]:
    problem = contract.name_problem(value, "case id")
    return problem and f"{problem}, got {_shown(value)}"


def _version_name(value) -> Optional[str]:
    problem = contract.name_problem(value, "version name")
    return problem and f"{problem}, got {_shown(value)}"


def _case_split(value) -> Optional[str]:
    return None if value in CASE_SPLITS else f"must be one of {', '.join(CASE_SPLITS)}, got {_shown(value)}"


def _version_status(value) -> Optional[str]:
    if value in contract.VERSION_STATUSES:
        return None
    return f"must be one of {', '.join(contract.VERSION_STATUSES)}, got {_shown(value)}"


def _previous_model_scores(value) -> Optional[str]:
    """Another model's prediction of a corrected case scored like ``test_scores``, with its ``version``."""
    problem = _test_scores(value)
    if problem:
        return problem
    return _version_name(value.get("version"))  # its message names the version


def _test_scores(value) -> Optional[str]:
    """A case's test-then-train scores: ``{"mean_dice", "binary_dice", "per_structure": {label: dice}}``."""
    problem = _dict(value)
    if problem:
        return problem
    for key in ("mean_dice", "binary_dice"):
        problem = _number(value.get(key))
        if problem:
            return f"{key} {problem}"
    per_structure = value.get("per_structure", {})
    if not isinstance(per_structure, dict):
        return f"per_structure must be a JSON object, got {type(per_structure).__name__}"
    for label, dice in per_structure.items():
        problem = _number(dice)
        if problem:
            return f"per_structure[{_shown(label)}] {problem}"
    return None


def _check_fields(record: dict, checks: dict, where: str, fail) -> None:
    """``fail(field, reason)`` for the first field of ``record`` that its check refuses."""
    for field, check in checks.items():
        problem = check(record[field]) if field in record else None
        if problem:
            fail(f"{where}.{field}" if where else field, problem)


def _non_finite_number(value, where: str) -> Optional[str]:
    """The first place inside ``value`` (nested dicts and lists) holding NaN or an infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        items = ((f"{where}.{key}" if where else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{where}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for inner_where, item in items:
        found = _non_finite_number(item, inner_where)
        if found:
            return found
    return None


# ---------------------------------------------------------------- stored relative paths

def stored_path_problem(value) -> Optional[str]:
    """Why ``value`` is not a safe relative POSIX path inside a workspace, or None."""
    if not isinstance(value, str) or not value:
        return f"must be a non-empty relative path, got {_shown(value)}"
    if "\\" in value:
        return f"must use '/' and no backslash, got {_shown(value)}"
    if "\x00" in value:
        return f"must not contain a NUL character, got {_shown(value)}"
    if value.startswith("/"):
        return f"must be relative to the workspace, not absolute, got {_shown(value)}"
    if value.startswith("~"):
        return f"must not start with '~', got {_shown(value)}"
    if _DRIVE_LETTER.match(value):
        return f"must not name a drive, got {_shown(value)}"
    parts = value.split("/")
    if ".." in parts:
        return f"must not contain '..', got {_shown(value)}"
    if "" in parts or "." in parts:
        return f"must not contain empty or '.' parts, got {_shown(value)}"
    return None


def expected_case_path(field: str, case_id: str) -> Optional[str]:
    """Where ``workspace.py`` stores a case's ``field`` (None for a field with no fixed place)."""
    return {
        "image": f"{contract.IMAGES_DIR}/{case_id}_0000{contract.FILE_ENDING}",
        "label": f"{contract.LABELS_DIR}/{case_id}{contract.FILE_ENDING}",
        "prediction": f"{contract.PREDICTIONS_DIR}/{case_id}{contract.FILE_ENDING}",
    }.get(field)


def is_case_path_field(field) -> bool:
    """Whether a case field holds a path inside the workspace (image, label, prediction, *_path)."""
    return isinstance(field, str) and (field in CASE_PATH_FIELDS or field.endswith("_path"))


# ---------------------------------------------------------------- extremeaug.json

_MANIFEST_FIELD_CHECKS: dict[str, Check] = {
    "format_version": _int,
    "created_at": _optional(_text),
    "modality": _text,
    "structures": _dict,
    "cases": _list_of(lambda item: None),   # each case and version is checked below
    "versions": _list_of(lambda item: None),
    "best_version": _optional(_version_name),
}

_CASE_FIELD_CHECKS: dict[str, Check] = {
    "id": _case_id,
    "split": _case_split,
    "order": _int,
    "status": _text,
    "source_image": _optional(_text),
    "source_label": _optional(_text),
    "added_at": _optional(_text),
    "changed_voxels": _optional(_int),
    "slices_touched": _optional(_int),
    "structures_changed": _optional(_list_of(_int)),
    "predicted_by": _optional(_version_name),
    "test_scores": _optional(_test_scores),
    "previous_model_scores": _optional(_previous_model_scores),
}

# What ``Workspace.new_version``, ``update_version``, ``finish_version`` and the trainer write.
_VERSION_FIELD_CHECKS: dict[str, Check] = {
    "name": _version_name,
    "created_at": _optional(_text),
    "settings": _dict,
    "cases_seen": _list_of(_case_id),
    "parent": _optional(_version_name),
    "status": _version_status,
    "val_scores": _optional(_dict),
    "iterations": _int,
    "seconds": _number,
    "finished_at": _optional(_text),
    "best_reason": _optional(_text),
    "comparison": _optional(_text),
    "rescored_at": _optional(_text),
    "pid": _optional(_int),
    "pseudo_labels": _optional(_dict),
    "consistency": _optional(_dict),
    "world_size": lambda v: _int(v) or (None if v >= 1 else f"must be 1 or more, got {v}"),  # absent before torchrun
    "trial_against": _optional(_version_name),
}
REQUIRED_VERSION_FIELDS = ("name", "created_at", "settings", "cases_seen", "parent", "status",
                           "val_scores", "iterations")


def check_manifest(manifest: dict, manifest_path) -> dict:
    """``manifest`` unchanged if everything it names stays inside the workspace; else InputError.

    Accepts what ``workspace.py`` writes; top-level keys it fills in on reading may be missing;
    unknown extra fields are allowed, and a case field named ``*_path`` is checked as a path.
    """
    def fail(field: str, reason: str):
        raise InputError(f"{manifest_path}: {field}: {reason}")

    if not isinstance(manifest, dict):
        fail("manifest", f"must be a JSON object, got {type(manifest).__name__}")
    _check_fields(manifest, _MANIFEST_FIELD_CHECKS, "", fail)

    for key, name in manifest.get("structures", {}).items():
        if not (isinstance(key, str) and key.isdigit() and key == str(int(key)) and int(key) >= 1):
            fail(f"structures[{_shown(key)}]", "label value must be a whole number 1 or more, as text")
        if not isinstance(name, str) or not name.strip():
            fail(f"structures[{key}]", f"structure name must be a non-empty text, got {_shown(name)}")

    _check_cases(manifest.get("cases", []), fail)
    names = _check_versions(manifest.get("versions", []), fail)

    best = manifest.get("best_version")
    if best is not None and best not in names:
        fail("best_version", f"names no version in the manifest: {_shown(best)}")
    return manifest


def _check_cases(cases: list, fail) -> None:
    taken: dict[str, int] = {}
    for index, case in enumerate(cases):
        where = f"cases[{index}]"
        if not isinstance(case, dict):
            fail(where, f"must be a JSON object, got {type(case).__name__}")
        for field in REQUIRED_CASE_FIELDS:
            if field not in case:
                fail(f"{where}.{field}", "is missing")
        _check_fields(case, _CASE_FIELD_CHECKS, where, fail)
        case_id = case["id"]
        if case_id.lower() in taken:
            fail(f"{where}.id", f"{_shown(case_id)} is already used by cases[{taken[case_id.lower()]}] "
                                "(ids are compared ignoring case)")
        taken[case_id.lower()] = index
        for field, value in case.items():
            if not is_case_path_field(field) or (value is None and field != "image"):
                continue
            problem = stored_path_problem(value)
            expected = expected_case_path(field, case_id)
            if not problem and expected is not None and value != expected:
                problem = f"must be {_shown(expected)}, got {_shown(value)}"
            if problem:
                fail(f"{where}.{field}", problem)


def _check_versions(versions: list, fail) -> set:
    """Check each version record and the parent links; returns the version names."""
    index_of: dict[str, int] = {}
    taken: dict[str, int] = {}
    for index, record in enumerate(versions):
        where = f"versions[{index}]"
        if not isinstance(record, dict):
            fail(where, f"must be a JSON object, got {type(record).__name__}")
        for field in ("name", "status"):
            if field not in record:
                fail(f"{where}.{field}", "is missing")
        _check_fields(record, _VERSION_FIELD_CHECKS, where, fail)
        name = record["name"]
        if name.lower() in taken:
            fail(f"{where}.name", f"{_shown(name)} is already used by versions[{taken[name.lower()]}] "
                                  "(names are compared ignoring case)")
        taken[name.lower()] = index
        index_of[name] = index

    parent_of = {record["name"]: record.get("parent") for record in versions}
    for name, index in index_of.items():
        parent = parent_of[name]
        if parent is None:
            continue
        if parent == name:
            fail(f"versions[{index}].parent", f"{_shown(name)} is its own parent")
        if parent not in parent_of:
            fail(f"versions[{index}].parent", f"names no version in the manifest: {_shown(parent)}")
        chain, current = [name], parent
        while current is not None:
            if current in chain:
                loop = " -> ".join(chain[chain.index(current):] + [current])
                fail(f"versions[{index}].parent", f"parents form a loop: {loop}")
            chain.append(current)
            current = parent_of.get(current)
    return set(index_of)


# ---------------------------------------------------------------- models/<name>/config.json

# The keys each recipe's ``fit_config`` writes (recipe2d.py, recipe3d.py + fingerprint3d.configure).
_COMMON_CONFIG_CHECKS: dict[str, Check] = {
    "kind": lambda v: None if v in contract.MODEL_KINDS else
    f"must be one of {', '.join(contract.MODEL_KINDS)}, got {_shown(v)}",
    "num_classes": lambda v: _int(v) or (None if v >= 2 else f"must be 2 or more, got {v}"),
    "settings": _dict,
    "structure_order": _optional(_dict),
}
# Keys a config may lack (written by newer engines; older versions still open).
_OPTIONAL_CONFIG_KEYS = ("structure_order",)
_ORDER_KEYS = {"axis", "ascending", "labels"}
_CONFIG_CHECKS_BY_KIND: dict[str, dict[str, Check]] = {
    "2d": {
        "template": _optional(_list_of(_number)),
        "template_case": _case_id,
    },
    "3d": {
        "spacing": _list_of(_number),
        "median_shape": _list_of(_int),
        "axis_depths": _list_of(_int),
        "depth": _int,
        "through_plane_axis": _int,
        "strides": _list_of(_list_of(_int)),
        "kernels": _list_of(_list_of(_int)),
        "filters": _list_of(_int),
        "patch_size_full": _list_of(_int),
        "patch_size": _list_of(_int),
        "batch_size": _int,
        "device_type": _text,
        "memory_budget_mb": _number,
        "estimated_memory_mb": _number,
        "intensity": _text,
        "deep_supervision": _bool,
        "ds_weights": _list_of(_number),
    },
}


def check_version_config(config: dict, config_path, allowed_dirs=()) -> dict:
    """``config`` unchanged if it holds only what the engine writes and its paths stay inside.

    A setting named ``*_dir`` or ``*_path`` is a path; it must resolve (symbolic links
    followed, a relative one from the current folder, as the engine opens it) inside the
    workspace ``config_path`` belongs to (``<ws>/models/<name>/config.json``) or inside one
    of ``allowed_dirs``, the folders the user named on the command line.
    """
    def fail(field: str, reason: str):
        raise InputError(f"{config_path}: {field}: {reason}")

    if not isinstance(config, dict):
        fail("config", f"must be a JSON object, got {type(config).__name__}")
    if "kind" not in config:
        fail("kind", "is missing")
    kind_problem = _COMMON_CONFIG_CHECKS["kind"](config["kind"])
    if kind_problem:
        fail("kind", kind_problem)
    checks = {**_COMMON_CONFIG_CHECKS, **_CONFIG_CHECKS_BY_KIND[config["kind"]]}
    for key in config:
        if key not in checks:
            fail(str(key), f"unknown key for a {config['kind']} model (expected {', '.join(checks)})")
    for key in checks:
        if key not in config and key not in _OPTIONAL_CONFIG_KEYS:
            fail(key, "is missing")
    order = config.get("structure_order")
    if order is not None and (not _ORDER_KEYS <= set(order) <= _ORDER_KEYS | {"pitch_mm"}
                              or _int(order["axis"]) or not isinstance(order["ascending"], bool)
                              or _list_of(_int)(order["labels"])
                              or ("pitch_mm" in order and (_number(order["pitch_mm"]) or order["pitch_mm"] <= 0))):
        fail("structure_order", "must be {axis: int, ascending: bool, labels: [int, ...]}, "
                                "optionally pitch_mm: a positive number")
    _check_fields(config, checks, "", fail)
    where = _non_finite_number(config, "")
    if where:
        fail(where, "must be a finite number (not NaN or infinity)")

    workspace = Path(config_path).parent.parent.parent
    _check_setting_paths(config["settings"], "settings", workspace, allowed_dirs, fail)
    return config


def _check_setting_paths(settings: dict, where: str, workspace: Path, allowed_dirs, fail) -> None:
    for key, value in settings.items():
        field = f"{where}.{key}"
        if isinstance(value, dict):
            _check_setting_paths(value, field, workspace, allowed_dirs, fail)
        if not (isinstance(key, str) and key.endswith(PATH_SETTING_SUFFIXES)) or value in (None, ""):
            continue
        if not isinstance(value, str):
            fail(field, f"must be a path text or null, got {_shown(value)}")
        if "\x00" in value:
            fail(field, f"must not contain a NUL character, got {_shown(value)}")
        target = Path(value).resolve()
        roots = [workspace, *(Path(d) for d in allowed_dirs)]
        if not any(target.is_relative_to(Path(root).resolve()) for root in roots):
            fail(field, f"{_shown(value)} is outside the workspace {workspace} and was not given "
                        "on the command line")


# ---------------------------------------------------------------- models/<name>/version.json

def check_version_record(record: dict, record_path, manifest_record: Optional[dict] = None) -> dict:
    """``record`` unchanged if it holds only the fields the engine writes, named after its folder.

    With ``manifest_record`` (the manifest's entry for that folder) both must name the same
    version; the other fields may lag (the manifest is written first), so they are not compared.
    """
    def fail(field: str, reason: str):
        raise InputError(f"{record_path}: {field}: {reason}")

    if not isinstance(record, dict):
        fail("version", f"must be a JSON object, got {type(record).__name__}")
    for key in record:
        if key not in _VERSION_FIELD_CHECKS:
            fail(str(key), f"unknown field (expected {', '.join(_VERSION_FIELD_CHECKS)})")
    for field in REQUIRED_VERSION_FIELDS:
        if field not in record:
            fail(field, "is missing")
    _check_fields(record, _VERSION_FIELD_CHECKS, "", fail)
    name = record["name"]
    folder = Path(record_path).parent.name
    if name != folder:
        fail("name", f"{_shown(name)} differs from its folder {_shown(folder)}")
    if record["parent"] == name:
        fail("parent", f"{_shown(name)} is its own parent")
    if manifest_record is not None:
        listed = manifest_record.get("name") if isinstance(manifest_record, dict) else None
        if listed != name:
            fail("name", f"{_shown(name)} but the manifest's record names {_shown(listed)}")
    return record


# ---------------------------------------------------------------- on disk

def contained(workspace, relative: str) -> Path:
    """``workspace / relative`` resolved (symbolic links followed); InputError if it leaves the workspace."""
    shown = f"{os.fspath(workspace)}/{relative}"
    problem = stored_path_problem(relative)
    if problem:
        raise InputError(f"{shown}: stored path {problem}")
    root = Path(workspace).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise InputError(f"{shown}: leads outside the workspace {root} (to {target})")
    return target
