"""A real MRML scene outside the Slicer application (``slicer-core``), wired as Slicer wires it.

Inside Slicer use ``slicer.mrmlScene``; this is for CI and scripts. The Segmentations logic
only works in a scene with an application logic, default colour nodes and registered
module logics; the application logic does not keep Python references to the logics, so
``HeadlessScene`` keeps them.
"""


class HeadlessScene:
    """``HeadlessScene().scene`` is a vtkMRMLScene ready for volumes and segmentations."""

    def __init__(self):
        import slicer

        self.scene = slicer.vtkMRMLScene()
        self.applicationLogic = slicer.vtkSlicerApplicationLogic()
        self.applicationLogic.SetMRMLScene(self.scene)
        self.colorLogic = self.applicationLogic.GetColorLogic()
        self.colorLogic.SetMRMLScene(self.scene)
        self.colorLogic.AddDefaultColorNodes()
        self.moduleLogics = {}
        for name, logicClass in (("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                                 ("Volumes", slicer.vtkSlicerVolumesLogic)):
            logic = logicClass()
            logic.SetMRMLScene(self.scene)
            logic.SetMRMLApplicationLogic(self.applicationLogic)
            self.applicationLogic.SetModuleLogic(name, logic)
            self.moduleLogics[name] = logic

    def segmentationsLogic(self):
        return self.moduleLogics["Segmentations"]

    def volumesLogic(self):
        return self.moduleLogics["Volumes"]

    def close(self):
        """Remove every node (the logics stay usable)."""
        self.scene.Clear(0)
