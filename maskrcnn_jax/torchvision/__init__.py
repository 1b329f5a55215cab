"""Conversion between torchvision Mask R-CNN state dicts and maskrcnn_jax (config, variables)."""

from maskrcnn_jax.torchvision.convert import from_torchvision, to_torchvision

__all__ = ["from_torchvision", "to_torchvision"]
