"""The MSD auto-configured 3D residual encoder-decoder: fingerprint, augmentation, network."""
