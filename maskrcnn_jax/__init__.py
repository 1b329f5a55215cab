"""maskrcnn_jax: Mask R-CNN in JAX/Flax with torchvision numerics."""

__version__ = "0.1.0"
