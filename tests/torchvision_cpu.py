"""Test entry point of the torchvision CPU stand-ins (see maskrcnn_jax/testing/torchvision_cpu.py)."""

from maskrcnn_jax.testing.torchvision_cpu import torchvision  # noqa: F401
