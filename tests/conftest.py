"""Shared test set-up: JAX on the CPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
