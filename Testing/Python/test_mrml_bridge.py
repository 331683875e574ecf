"""MRML nodes <-> SimpleITK images, against the real Slicer core (``slicer-core``), no stand-ins."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

MODULE_DIR = Path(__file__).resolve().parents[2] / "ExtremeAug"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import slicer  # noqa: E402  slicer-core is a test requirement: CI fails without it, never skips

from ExtremeAugLib import mrml_bridge  # noqa: E402
from ExtremeAugLib.headless_scene import HeadlessScene  # noqa: E402

SHAPE = (6, 9, 11)  # (k, j, i)
SPACING = (0.7, 1.3, 3.0)
ORIGIN_LPS = (-12.5, 40.25, 7.0)


def rotation(ax, ay, az):
    """A proper rotation matrix (row-major, 3x3) from three angles in radians."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


DIRECTION = rotation(0.3, -0.2, 0.5)


@pytest.fixture
def scene():
    headless = HeadlessScene()
    yield headless.scene
    headless.close()


def makeImage(array, spacing=SPACING, origin=ORIGIN_LPS, direction=DIRECTION):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return image


def makeScan(scene, name="scan", **geometry):
    array = np.random.default_rng(1).normal(100, 30, SHAPE).astype(np.float32)
    return mrml_bridge.imageToVolumeNode(makeImage(array, **geometry), scene, name)


def orientedImage(mask, ijkToRas, extentStart=(0, 0, 0)):
    """A vtkOrientedImageData from a (k, j, i) mask placed at ``extentStart`` (i, j, k)."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    i0, j0, k0 = extentStart
    nk, nj, ni = mask.shape
    image.SetExtent(i0, i0 + ni - 1, j0, j0 + nj - 1, k0, k0 + nk - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
    image.SetImageToWorldMatrix(ijkToRas)
    return image


def ijkToRasOf(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix


def scaledIjkToRas(volumeNode, scale=(1, 1, 1), shiftIjk=(0, 0, 0)):
    """The volume's IJK->RAS with columns scaled (other spacing) and origin moved by ``shiftIjk``."""
    base = ijkToRasOf(volumeNode)
    m = np.array([[base.GetElement(r, c) for c in range(4)] for r in range(4)])
    origin = m @ np.array([*shiftIjk, 1.0])
    out = m.copy()
    out[:3, :3] = m[:3, :3] * np.array(scale)[None, :]
    out[:3, 3] = origin[:3]
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, out[r, c])
    return matrix


def box(shape, k, j, i):
    mask = np.zeros(shape, bool)
    mask[k[0]:k[1], j[0]:j[1], i[0]:i[1]] = True
    return mask


def newSegmentation(scene, volumeNode, name="seg"):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return node


def labelArray(labelImage):
    return sitk.GetArrayFromImage(labelImage)


# ------------------------------------------------------------------ volumes

@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, np.uint16])
def test_volume_round_trip_is_bit_exact(scene, dtype):
    values = np.random.default_rng(2).normal(50, 20, SHAPE)
    array = (np.clip(values, 0, 255) if np.issubdtype(dtype, np.unsignedinteger) else values).astype(dtype)
    image = makeImage(array)
    volumeNode = mrml_bridge.imageToVolumeNode(image, scene, "v")
    back = mrml_bridge.volumeNodeToImage(volumeNode)
    assert sitk.GetArrayFromImage(back).dtype == array.dtype
    assert np.array_equal(sitk.GetArrayFromImage(back), array)
    assert back.GetSpacing() == pytest.approx(SPACING, abs=1e-12)
    assert back.GetOrigin() == pytest.approx(ORIGIN_LPS, abs=1e-9)
    assert back.GetDirection() == pytest.approx(tuple(DIRECTION.ravel()), abs=1e-12)


def test_geometry_matches_slicers_own_file_reader(scene, tmp_path):
    """An image written by SimpleITK and read by Slicer's volumes logic gives back the same geometry."""
    array = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    image = makeImage(array)
    path = tmp_path / "scan with spaces.nrrd"
    sitk.WriteImage(image, str(path))
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLScene(scene)
    volumeNode = volumesLogic.AddArchetypeVolume(str(path), "loaded", 0)
    assert volumeNode is not None
    # Slicer's RAS: origin and first two axes flipped relative to the LPS file.
    assert volumeNode.GetOrigin() == pytest.approx((-ORIGIN_LPS[0], -ORIGIN_LPS[1], ORIGIN_LPS[2]), abs=1e-5)
    back = mrml_bridge.volumeNodeToImage(volumeNode)
    assert np.array_equal(sitk.GetArrayFromImage(back), array)
    assert back.GetSpacing() == pytest.approx(SPACING, abs=1e-5)
    assert back.GetOrigin() == pytest.approx(ORIGIN_LPS, abs=1e-5)
    assert back.GetDirection() == pytest.approx(tuple(DIRECTION.ravel()), abs=1e-5)


def test_volume_written_by_slicer_reads_back_in_simpleitk(scene, tmp_path):
    image = makeImage(np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE))
    volumeNode = mrml_bridge.imageToVolumeNode(image, scene, "v")
    storage = volumeNode.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "out.nii.gz"))
    assert storage.WriteData(volumeNode)
    read = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert read.GetOrigin() == pytest.approx(ORIGIN_LPS, abs=1e-4)
    assert read.GetDirection() == pytest.approx(tuple(DIRECTION.ravel()), abs=1e-4)


def test_volume_errors(scene):
    with pytest.raises(ValueError, match="scalar volume"):
        mrml_bridge.volumeNodeToImage(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="no voxels"):
        mrml_bridge.volumeNodeToImage(empty)


# ---------------------------------------------------------- segmentations

def test_several_segments_and_known_values(scene):
    volumeNode = makeScan(scene)
    segNode = newSegmentation(scene, volumeNode)
    a = box(SHAPE, (1, 3), (1, 4), (1, 5))
    b = box(SHAPE, (3, 6), (5, 8), (6, 10))
    segNode.AddSegmentFromBinaryLabelmapRepresentation(orientedImage(a, ijkToRasOf(volumeNode)), "L1", (1, 0, 0))
    segNode.AddSegmentFromBinaryLabelmapRepresentation(orientedImage(b, ijkToRasOf(volumeNode)), "L2", (0, 1, 0))
    label, names = mrml_bridge.segmentationToLabelImage(segNode, volumeNode)
    expected = a * 1 + b * 2
    assert np.array_equal(labelArray(label), expected)
    assert names == {1: "L1", 2: "L2"}
    # Values from the workspace's structures; a new name gets the next free value.
    label, names = mrml_bridge.segmentationToLabelImage(segNode, volumeNode, {"L2": 4, "L9": 9})
    assert names == {10: "L1", 4: "L2"}
    assert np.array_equal(labelArray(label), a * 10 + b * 4)
    # Exactly the scan's grid.
    assert label.GetSize() == volumeNode.GetImageData().GetDimensions()
    assert label.GetOrigin() == pytest.approx(ORIGIN_LPS, abs=1e-9)
    assert label.GetDirection() == pytest.approx(tuple(DIRECTION.ravel()), abs=1e-12)


def test_cropped_internal_extent(scene):
    volumeNode = makeScan(scene)
    segNode = newSegmentation(scene, volumeNode)
    small = np.zeros((3, 4, 5), bool)
    small[1:, 1:3, :4] = True
    # The internal labelmap covers only a sub-box of the scan, starting at (i, j, k) = (4, 3, 2).
    segNode.AddSegmentFromBinaryLabelmapRepresentation(
        orientedImage(small, ijkToRasOf(volumeNode), extentStart=(4, 3, 2)), "L1", (1, 0, 0))
    label, _ = mrml_bridge.segmentationToLabelImage(segNode, volumeNode)
    expected = np.zeros(SHAPE, np.uint8)
    expected[2:5, 3:7, 4:9] = small
    assert np.array_equal(labelArray(label), expected)


def test_internal_labelmap_with_other_spacing_is_resampled(scene):
    volumeNode = makeScan(scene)
    segNode = newSegmentation(scene, volumeNode)
    # Internal voxels twice as wide along i, centred so that scan voxels 2m and 2m+1 fall in voxel m.
    coarse = np.zeros((SHAPE[0], SHAPE[1], 6), bool)
    coarse[2:5, 1:7, 1:3] = True
    matrix = scaledIjkToRas(volumeNode, scale=(2, 1, 1), shiftIjk=(0.5, 0, 0))
    segNode.AddSegmentFromBinaryLabelmapRepresentation(orientedImage(coarse, matrix), "L1", (1, 0, 0))
    label, _ = mrml_bridge.segmentationToLabelImage(segNode, volumeNode)
    expected = np.repeat(coarse, 2, axis=2)[:, :, :SHAPE[2]]
    assert np.array_equal(labelArray(label), expected.astype(np.uint8))


def test_overlapping_segments_later_segment_wins(scene):
    volumeNode = makeScan(scene)
    a = box(SHAPE, (1, 5), (1, 6), (1, 7))
    b = box(SHAPE, (3, 6), (4, 9), (5, 11))
    overlap = a & b
    assert overlap.any()
    for order in (("A", "B"), ("B", "A")):
        segNode = newSegmentation(scene, volumeNode, name="overlap " + "".join(order))
        masks = {"A": a, "B": b}
        for name in order:
            segNode.AddSegmentFromBinaryLabelmapRepresentation(
                orientedImage(masks[name], ijkToRasOf(volumeNode)), name, (1, 1, 0))
        label, names = mrml_bridge.segmentationToLabelImage(segNode, volumeNode, {"A": 1, "B": 2})
        result = labelArray(label)
        winner = {"A": 1, "B": 2}[order[-1]]
        assert np.all(result[overlap] == winner)
        assert np.all(result[a & ~b] == 1) and np.all(result[b & ~a] == 2)
        assert np.count_nonzero(result) == np.count_nonzero(a | b)


def test_empty_segmentation_is_refused(scene):
    volumeNode = makeScan(scene)
    segNode = newSegmentation(scene, volumeNode)
    with pytest.raises(ValueError, match="has no segments"):
        mrml_bridge.segmentationToLabelImage(segNode, volumeNode)
    segNode.GetSegmentation().AddEmptySegment("", "L1", (1, 0, 0))
    segNode.GetSegmentation().AddEmptySegment("", "L2", (0, 1, 0))
    with pytest.raises(ValueError, match="is empty"):
        mrml_bridge.segmentationToLabelImage(segNode, volumeNode)


def test_duplicate_segment_names_are_refused(scene):
    volumeNode = makeScan(scene)
    segNode = newSegmentation(scene, volumeNode)
    for _ in range(2):
        segNode.AddSegmentFromBinaryLabelmapRepresentation(
            orientedImage(box(SHAPE, (1, 2), (1, 2), (1, 2)), ijkToRasOf(volumeNode)), "L1", (1, 0, 0))
    with pytest.raises(ValueError, match="several segments named 'L1'"):
        mrml_bridge.segmentationToLabelImage(segNode, volumeNode)


def test_segmentation_from_another_scan_is_resampled_when_it_overlaps(scene):
    scanA = makeScan(scene, "A")
    # Scan B: same spacing and direction, origin 3 voxels further along i (B's i = A's i - 3).
    shiftedOrigin = tuple(np.array(ORIGIN_LPS) + DIRECTION @ np.array([3 * SPACING[0], 0, 0]))
    scanB = makeScan(scene, "B", origin=shiftedOrigin)
    segNode = newSegmentation(scene, scanB, "drawn on B")
    onB = box(SHAPE, (1, 4), (2, 6), (5, 11))  # i 5..10 on B = i 8..13 on A, partly outside A
    segNode.AddSegmentFromBinaryLabelmapRepresentation(orientedImage(onB, ijkToRasOf(scanB)), "L1", (1, 0, 0))
    label, names = mrml_bridge.segmentationToLabelImage(segNode, scanA)
    expected = np.zeros(SHAPE, np.uint8)
    expected[1:4, 2:6, 8:11] = 1
    assert np.array_equal(labelArray(label), expected)
    assert names == {1: "L1"}


def test_segmentation_from_another_scan_is_refused_when_it_does_not_overlap(scene):
    scanA = makeScan(scene, "A")
    farOrigin = tuple(np.array(ORIGIN_LPS) + np.array([500.0, 0, 0]))
    scanFar = makeScan(scene, "far", origin=farOrigin)
    segNode = newSegmentation(scene, scanFar, "drawn far away")
    segNode.AddSegmentFromBinaryLabelmapRepresentation(
        orientedImage(box(SHAPE, (1, 4), (1, 4), (1, 4)), ijkToRasOf(scanFar)), "L1", (1, 0, 0))
    with pytest.raises(ValueError, match="does not overlap volume 'A'"):
        mrml_bridge.segmentationToLabelImage(segNode, scanA)


# --------------------------------------------------- label image -> segmentation

def test_label_image_to_segmentation_round_trip_and_existing_nodes_untouched(scene):
    volumeNode = makeScan(scene)
    existing = newSegmentation(scene, volumeNode, "clinician's work")
    drawn = box(SHAPE, (0, 2), (0, 3), (0, 4))
    existing.AddSegmentFromBinaryLabelmapRepresentation(orientedImage(drawn, ijkToRasOf(volumeNode)), "L1", (1, 0, 0))
    existingLabelBefore = labelArray(mrml_bridge.segmentationToLabelImage(existing, volumeNode)[0])
    volumeArrayBefore = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    volumeMTime = volumeNode.GetMTime()
    segmentationCount = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 1:4, 1:5] = 1
    labels[3:6, 2:8, 5:10] = 3
    labels[0, 0, 10] = 7  # a value without a name
    labelImage = makeImage(labels)
    names = {1: "L1", 2: "L2", 3: "L3"}  # L2 absent from the image
    colors = {1: (0.1, 0.2, 0.3)}
    newNode = mrml_bridge.labelImageToSegmentation(labelImage, volumeNode, names, colors, nodeName="prediction")

    assert newNode is not existing and newNode.GetName() == "prediction"
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentationCount + 1
    assert mrml_bridge.segmentNames(newNode) == ["L1", "L2", "L3", "structure_7"]
    first = newNode.GetSegmentation().GetNthSegment(0)
    assert first.GetColor() == pytest.approx((0.1, 0.2, 0.3))
    back, backNames = mrml_bridge.segmentationToLabelImage(newNode, volumeNode, {v: k for k, v in names.items()})
    assert backNames == {1: "L1", 2: "L2", 3: "L3", 4: "structure_7"}
    expected = labels.copy()
    expected[labels == 7] = 4
    assert np.array_equal(labelArray(back), expected)
    back, _ = mrml_bridge.segmentationToLabelImage(newNode, volumeNode, {"L1": 1, "L2": 2, "L3": 3, "structure_7": 7})
    assert np.array_equal(labelArray(back), labels)

    # Nothing else changed.
    assert mrml_bridge.segmentNames(existing) == ["L1"]
    assert np.array_equal(labelArray(mrml_bridge.segmentationToLabelImage(existing, volumeNode)[0]), existingLabelBefore)
    assert np.array_equal(slicer.util.arrayFromVolume(volumeNode), volumeArrayBefore)
    assert volumeNode.GetMTime() == volumeMTime


def test_label_image_on_another_grid_is_refused(scene):
    volumeNode = makeScan(scene)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1, 1, 1] = 1
    wrong = makeImage(labels, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="not on the grid"):
        mrml_bridge.labelImageToSegmentation(wrong, volumeNode, {1: "L1"})
    floating = makeImage(labels.astype(np.float32))
    with pytest.raises(ValueError, match="whole-number"):
        mrml_bridge.labelImageToSegmentation(floating, volumeNode, {1: "L1"})


def test_count_changed_voxels(scene):
    a = np.zeros(SHAPE, np.uint8)
    b = a.copy()
    b[0, 0, :3] = 2
    b[1, 1, 1] = 1
    assert mrml_bridge.countChangedVoxels(a, b) == 4
    assert mrml_bridge.countChangedVoxels(makeImage(a), makeImage(b)) == 4
    assert mrml_bridge.countChangedVoxels(makeImage(b), makeImage(b.astype(np.uint16))) == 0
    with pytest.raises(ValueError, match="differ in size"):
        mrml_bridge.countChangedVoxels(a, a[:-1])


def test_helpers_below_qt_never_import_the_gui():
    """ExtremeAugLib runs in CI and in the engine's world: no qt, ctk or ScriptedLoadableModule."""
    import ast

    forbidden = ("qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "PythonQt")
    for path in sorted((MODULE_DIR / "ExtremeAugLib").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"
