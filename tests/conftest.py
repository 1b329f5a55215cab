"""Shared test set-up: JAX on the CPU; session fixtures shared across test folders."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def models():
    """(torchvision model, Predictor of its conversion, test images), built once per session
    (`maskrcnn_jax.testing.parity_model`)."""
    from maskrcnn_jax.testing import parity_model

    return parity_model.build()
