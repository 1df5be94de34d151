"""trainer: a JAX/Flax U-Net for building segmentation, trained on samples streamed from PostgreSQL."""
