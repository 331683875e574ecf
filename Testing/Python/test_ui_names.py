"""The .ui file, ExtremeAug.py and the build files agree on names.

ExtremeAug.py only runs inside Slicer, so it is read as text/AST here, not imported.
"""

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "ExtremeAug"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "ExtremeAug.ui"
MODULE_FILE = MODULE_DIR / "ExtremeAug.py"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

# parameterNodeWrapper connects a widget to a field only for these (exact) widget classes.
WIDGETS_FOR_TYPE = {
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "bool": {"QCheckBox", "QPushButton", "QComboBox"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def moduleSource():
    return MODULE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def parameterFields(moduleSource):
    """``{field: annotation source}`` of the ExtremeAugParameterNode class."""
    tree = ast.parse(moduleSource)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ExtremeAugParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in cls.decorator_list)
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def widgetsByName(ui):
    return {w.get("name"): w for w in ui.iter("widget")}


def parameterWidgets(ui):
    found = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                found[prop.findtext("string")] = widget
    return found


def test_every_ui_widget_the_code_uses_exists(ui, moduleSource):
    used = set(re.findall(r"self\.ui\.(\w+)", moduleSource))
    assert used, "ExtremeAug.py uses no self.ui widgets?"
    missing = used - set(widgetsByName(ui))
    assert not missing, f"ExtremeAug.py uses widgets missing from the .ui: {sorted(missing)}"


def test_widget_names_are_unique(ui):
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names))


def test_parameter_names_match_parameter_node_fields(ui, parameterFields):
    connected = parameterWidgets(ui)
    unknown = set(connected) - set(parameterFields)
    assert not unknown, f"SlicerParameterName without a parameter node field: {sorted(unknown)}"
    # Every field except the version (set from the versions list by the Widget) has a widget.
    assert set(parameterFields) - set(connected) == {"modelVersion"}


def test_connected_widgets_have_a_matching_type(ui, parameterFields):
    for name, widget in parameterWidgets(ui).items():
        annotation = parameterFields[name]
        base = re.sub(r"^Annotated\[(\w+(?:\.\w+)?),.*\]$", r"\1", annotation)
        kind = "node" if base.startswith("vtkMRML") else base
        assert widget.get("class") in WIDGETS_FOR_TYPE[kind], f"{name}: {widget.get('class')} cannot show {annotation}"
        if widget.get("class") == "QComboBox":
            assert "Choice(" in annotation, f"{name}: a QComboBox needs a Choice annotation"
        if kind == "node":
            nodeTypes = [s.text for p in widget.findall("property") if p.get("name") == "nodeTypes"
                         for s in p.iter("string")]
            assert nodeTypes == [base], f"{name}: combobox shows {nodeTypes}, field is {base}"


def test_choices_match_what_the_engine_accepts(parameterFields):
    from ExtremeAugLib import engine_cli

    def choices(field):
        return ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", parameterFields[field]).group(1))

    assert tuple(choices("modelType")) == engine_cli.MODEL_TYPES
    assert tuple(choices("device")) == engine_cli.DEVICES


def test_every_custom_widget_is_declared_and_node_combos_get_the_scene(ui):
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"custom widgets not declared: {sorted(custom - declared)}"
    root = ui.find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "ExtremeAug"
    combos = {w.get("name") for w in ui.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    receivers = {c.findtext("receiver") for c in ui.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert combos and combos <= receivers


def test_advanced_section_starts_collapsed(ui):
    advanced = widgetsByName(ui)["advancedCollapsibleButton"]
    collapsed = {p.get("name"): p.findtext("bool") for p in advanced.findall("property")}
    assert advanced.get("class") == "ctkCollapsibleButton" and collapsed.get("collapsed") == "true"


def test_widget_buttons_cover_every_logic_action(moduleSource):
    from ExtremeAugLib.loop_logic import LoopLogic

    method = re.search(r"def _actionButtons\(self\):\s+return (\{.*?\})", moduleSource, re.S).group(1)
    keys = set(re.findall(r'"(\w+)":', method))
    blockers = LoopLogic(pythonExecutable=sys.executable, engineRoot=REPO_ROOT).actionBlockers(None, None)
    assert keys == set(blockers)


def test_resources_and_scripts_are_listed_for_the_build(moduleSource):
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    for helper in sorted((MODULE_DIR / "ExtremeAugLib").glob("*.py")):
        assert f"${{MODULE_NAME}}Lib/{helper.name}" in cmake, f"{helper.name} missing from SCRIPTS"
    for resource in re.findall(r'resourcePath\("([^"]+)"\)', moduleSource):
        assert (MODULE_DIR / "Resources" / resource).is_file()
        assert f"Resources/{resource.replace('ExtremeAug', '${MODULE_NAME}')}" in cmake
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/requirements.txt", "Testing/run_selftest.py"):
        assert resource in cmake
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "ExtremeAug")).is_file()
    top = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for needed in ('EXTENSION_CATEGORY "Segmentation"', 'EXTENSION_DEPENDS "PyTorch"', "add_subdirectory(ExtremeAug)",
                   "find_package(Slicer REQUIRED)", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"):
        assert needed in top


def test_requirements_leave_torch_to_the_pytorch_extension():
    lines = [line.split("#")[0].strip() for line in
             (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    names = {re.split(r"[<>=!~ ]", line)[0].lower() for line in lines if line}
    assert {"monai", "simpleitk", "numpy", "scipy", "matplotlib"} <= names
    assert "torch" not in names
