"""Network architectures: the 2D paper model and the 3D MSD model."""
