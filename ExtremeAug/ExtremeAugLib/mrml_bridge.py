"""MRML nodes <-> SimpleITK images with exact geometry.

No Qt and no ScriptedLoadableModule: only MRML classes, ``slicer.util``, vtk, SimpleITK and
numpy, so CI runs it against the real Slicer core (``slicer-core``).

Coordinates: Slicer stores geometry in RAS, ITK (and NIfTI/NRRD readers in SimpleITK) in
LPS. The first two axes flip sign: ``originLPS = F @ originRAS`` and
``directionLPS = F @ directionRAS`` with ``F = diag(-1, -1, 1)``. Voxel arrays are shared
as they are ((k, j, i) order in numpy for both).

Overlapping segments: when two segments claim the same voxel, the segment that comes
LATER in the segmentation's segment list wins (the same order Slicer's own
"export to labelmap" uses). Empty segments keep their names but paint nothing.
"""

import logging

import numpy as np
import SimpleITK as sitk
import vtk

import slicer
import slicer.util

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
GRID_TOLERANCE = 1e-4  # relative to the voxel size (origin) or absolute (spacing ratio, direction)
MAX_LABEL_VALUE = 65535

# Distinct, readable segment colours (RGB 0..1), reused cyclically.
DEFAULT_COLORS = (
    (0.90, 0.30, 0.24), (0.20, 0.60, 0.86), (0.18, 0.80, 0.44), (0.95, 0.77, 0.06),
    (0.61, 0.35, 0.71), (0.90, 0.49, 0.13), (0.10, 0.74, 0.61), (0.93, 0.44, 0.68),
    (0.55, 0.71, 0.20), (0.40, 0.45, 0.95), (0.80, 0.60, 0.40), (0.50, 0.85, 0.90),
)


# ------------------------------------------------------------------ volumes

def _requireVolume(volumeNode):
    """ValueError unless ``volumeNode`` is a scalar volume with 3D single-component voxels."""
    if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise ValueError("Select a scalar volume (scan) first.")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise ValueError(f"Volume '{volumeNode.GetName()}' has no voxels.")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"Volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} "
                         "components per voxel; use a single-component (grey-value) scan.")


def _directionRAS(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])


def volumeGeometry(volumeNode):
    """``(size_xyz, spacing, originLPS, directionLPS_flat)`` of a volume node, as ITK wants them."""
    _requireVolume(volumeNode)
    size = tuple(int(d) for d in volumeNode.GetImageData().GetDimensions())
    spacing = tuple(float(s) for s in volumeNode.GetSpacing())
    origin = tuple(float(v) for v in RAS_TO_LPS @ np.array(volumeNode.GetOrigin()))
    direction = tuple(float(v) for v in (RAS_TO_LPS @ _directionRAS(volumeNode)).ravel())
    return size, spacing, origin, direction


def _applyGeometry(image, volumeNode):
    _, spacing, origin, direction = volumeGeometry(volumeNode)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def volumeNodeToImage(volumeNode):
    """A SimpleITK copy of the volume's voxels with its exact spacing, origin and direction (LPS).

    The voxel type is kept. A parent transform of the node is not applied: the image is
    the volume in its own grid, which is what training and prediction need.
    """
    _requireVolume(volumeNode)
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    return _applyGeometry(sitk.GetImageFromArray(array), volumeNode)


def imageToVolumeNode(image, scene, name="Volume", nodeClassName="vtkMRMLScalarVolumeNode"):
    """A NEW volume node in ``scene`` holding ``image`` with its exact geometry."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"'{name}': expected a 3D single-component image.")
    volumeNode = scene.AddNewNodeByClass(nodeClassName, name)
    slicer.util.updateVolumeFromArray(volumeNode, sitk.GetArrayFromImage(image))
    volumeNode.SetSpacing(image.GetSpacing())
    volumeNode.SetOrigin(*(RAS_TO_LPS @ np.array(image.GetOrigin())))
    directionRAS = RAS_TO_LPS @ np.array(image.GetDirection()).reshape(3, 3)
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, directionRAS[r, c])
    volumeNode.SetIJKToRASDirectionMatrix(matrix)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def _requireSameGrid(image, volumeNode, what):
    """ValueError unless ``image`` lies on the volume's voxel grid (within float tolerance)."""
    size, spacing, origin, direction = volumeGeometry(volumeNode)
    problems = []
    if tuple(image.GetSize()) != size:
        problems.append(f"size {tuple(image.GetSize())} != {size}")
    if not np.allclose(image.GetSpacing(), spacing, rtol=GRID_TOLERANCE, atol=0):
        problems.append(f"spacing {image.GetSpacing()} != {spacing}")
    if not np.allclose(image.GetOrigin(), origin, rtol=0, atol=GRID_TOLERANCE * min(spacing)):
        problems.append(f"origin {image.GetOrigin()} != {origin}")
    if not np.allclose(image.GetDirection(), direction, rtol=0, atol=GRID_TOLERANCE):
        problems.append("direction differs")
    if problems:
        raise ValueError(f"{what} is not on the grid of volume '{volumeNode.GetName()}': "
                         + "; ".join(problems) + ".")


# ------------------------------------------------------------ segmentations

def _segmentIds(segmentationNode):
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _ensureBinaryLabelmaps(segmentationNode):
    segmentation = segmentationNode.GetSegmentation()
    binaryName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(binaryName):
        if not segmentationNode.CreateBinaryLabelmapRepresentation():
            raise ValueError(f"Segmentation '{segmentationNode.GetName()}' cannot be converted "
                             "to a binary labelmap.")


def _ownVoxelCount(segmentationNode, segmentId):
    """Voxels of one segment in the segmentation's own internal labelmap geometry.

    Segments may share one labelmap layer; a segment's voxels are those equal to its label value.
    """
    image = slicer.vtkOrientedImageData()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, segmentId, image):
        return 0
    if image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return 0
    from vtk.util import numpy_support

    labelValue = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    return int(np.count_nonzero(numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()) == labelValue))


def _segmentMaskOnVolumeGrid(segmentationNode, segmentId, volumeNode, labelmapNode):
    """Boolean (k, j, i) mask of one segment resampled onto the volume's grid by Slicer."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmapNode, volumeNode):
        raise ValueError(f"Segment '{segmentId}' of '{segmentationNode.GetName()}' could not be "
                         f"exported onto the grid of '{volumeNode.GetName()}'.")
    return np.array(slicer.util.arrayFromVolume(labelmapNode), copy=True) != 0


def segmentNames(segmentationNode):
    """Segment names in the segmentation's order."""
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetSegment(sid).GetName() for sid in _segmentIds(segmentationNode)]


def segmentationToLabelImage(segmentationNode, volumeNode, valueForName=None):
    """The segmentation as an integer label map on the volume's grid: ``(sitk image, {value: name})``.

    Segments are resampled onto the scan's grid by Slicer (handles cropped internal
    extents, other spacings and segmentations drawn on another scan). Label values come
    from ``valueForName`` (e.g. the workspace's structures) and otherwise follow the segment
    order after the largest value used. Later segments win where segments overlap.

    Raises ValueError for: no segments, all segments empty, duplicate segment names, or
    a segmentation that does not overlap the scan at all.
    """
    _requireVolume(volumeNode)
    if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise ValueError("Select a segmentation first.")
    segName = segmentationNode.GetName()
    ids = _segmentIds(segmentationNode)
    if not ids:
        raise ValueError(f"Segmentation '{segName}' has no segments: add one segment per structure "
                         "and paint it in the Segment Editor.")
    names = segmentNames(segmentationNode)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Segmentation '{segName}' has several segments named "
                         f"{', '.join(repr(d) for d in duplicates)}; give each structure its own name.")
    values = _assignValues(names, valueForName or {})
    _ensureBinaryLabelmaps(segmentationNode)

    ownCounts = [_ownVoxelCount(segmentationNode, sid) for sid in ids]
    if not any(ownCounts):
        raise ValueError(f"Segmentation '{segName}' is empty: paint at least one structure.")

    size = volumeGeometry(volumeNode)[0]
    labelArray = np.zeros(size[::-1], np.uint16 if max(values) > 255 else np.uint8)
    labelmapNode = slicer.vtkMRMLLabelMapVolumeNode()
    scene = volumeNode.GetScene() or segmentationNode.GetScene()
    if scene is not None:
        scene.AddNode(labelmapNode)
    try:
        for sid, name, value, ownCount in zip(ids, names, values, ownCounts):
            if ownCount == 0:
                continue
            mask = _segmentMaskOnVolumeGrid(segmentationNode, sid, volumeNode, labelmapNode)
            if not mask.any():
                logging.warning(f"Segment '{name}' lies outside volume '{volumeNode.GetName()}'.")
            labelArray[mask] = value  # later segments overwrite earlier ones
    finally:
        if scene is not None:
            scene.RemoveNode(labelmapNode)
    if not labelArray.any():
        raise ValueError(f"Segmentation '{segName}' does not overlap volume '{volumeNode.GetName()}' "
                         "(it was drawn on another scan or placed outside it).")
    labelImage = _applyGeometry(sitk.GetImageFromArray(labelArray), volumeNode)
    return labelImage, dict(zip(values, names))


def _assignValues(names, valueForName):
    """Label value per segment name: known names keep theirs, new names get the next free values."""
    used = {int(v) for v in valueForName.values()}
    nextValue = max(used, default=0) + 1
    values = []
    for name in names:
        if name in valueForName:
            values.append(int(valueForName[name]))
        else:
            while nextValue in used:
                nextValue += 1
            values.append(nextValue)
            used.add(nextValue)
    if max(values) > MAX_LABEL_VALUE:
        raise ValueError(f"Too many structures: label values above {MAX_LABEL_VALUE}.")
    return values


def maskToOrientedImage(mask, volumeNode):
    """A vtkOrientedImageData (uint8 0/1) on the volume's grid from a (k, j, i) boolean mask."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    image.SetImageToWorldMatrix(ijkToRas)
    return image


def labelImageToSegmentation(labelImage, volumeNode, names, colors=None, scene=None, nodeName=None):
    """A NEW segmentation node with one segment per structure; existing nodes are not touched.

    ``labelImage`` must lie on the volume's grid. ``names`` maps label value -> segment name;
    a named structure absent from the image becomes an empty segment (ready to paint), a
    value present without a name becomes ``structure_<value>``. ``colors`` maps value ->
    (r, g, b) in 0..1. The node goes into ``scene`` (default: the volume's scene).
    """
    _requireVolume(volumeNode)
    if labelImage.GetNumberOfComponentsPerPixel() != 1 or labelImage.GetDimension() != 3:
        raise ValueError("The label image must be 3D with one component.")
    _requireSameGrid(labelImage, volumeNode, "The label image")
    labelArray = sitk.GetArrayFromImage(labelImage)
    if not np.issubdtype(labelArray.dtype, np.integer):
        raise ValueError("The label image must hold whole-number labels.")
    scene = scene or volumeNode.GetScene()
    if scene is None:
        raise ValueError(f"Volume '{volumeNode.GetName()}' is not in a scene; pass scene=.")
    names = {int(k): str(v) for k, v in (names or {}).items()}
    present = {int(v) for v in np.unique(labelArray) if v != 0}
    values = sorted(set(names) | present)

    segmentationNode = scene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", nodeName or f"{volumeNode.GetName()} segmentation")
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    segmentation = segmentationNode.GetSegmentation()
    for index, value in enumerate(values):
        name = names.get(value, f"structure_{value}")
        color = tuple((colors or {}).get(value, DEFAULT_COLORS[index % len(DEFAULT_COLORS)]))
        if value in present:
            segmentationNode.AddSegmentFromBinaryLabelmapRepresentation(
                maskToOrientedImage(labelArray == value, volumeNode), name, color)
        else:
            segmentation.AddEmptySegment("", name, color)
    segmentation.CollapseBinaryLabelmaps(False)  # fewer layers, segments never overwrite each other
    return segmentationNode


# ------------------------------------------------------------------ compare

def countChangedVoxels(before, after):
    """Number of voxels whose label differs between two label maps (sitk images or arrays)."""
    a = sitk.GetArrayViewFromImage(before) if isinstance(before, sitk.Image) else np.asarray(before)
    b = sitk.GetArrayViewFromImage(after) if isinstance(after, sitk.Image) else np.asarray(after)
    if a.shape != b.shape:
        raise ValueError(f"Label maps differ in size: {a.shape[::-1]} vs {b.shape[::-1]}.")
    return int(np.count_nonzero(a.astype(np.int64) != b.astype(np.int64)))
