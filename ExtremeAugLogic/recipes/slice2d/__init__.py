"""The extreme-augmentation paper's 2D model: slicing, patches, batched augmentation, ResUNet2D."""
