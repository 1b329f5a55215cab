"""Shared test set-up: CPU JAX, an importable torchvision on the CPU torch build."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tests.torchvision_cpu  # noqa: E402,F401  (defines torchvision's ops before any test imports it)
