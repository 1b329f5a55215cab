"""Predictor input errors: named by the image's index in the caller's list; images whose
resized side would be 0 pixels; weights that do not fit the config, caught when it is built."""

import numpy as np
import pytest

from maskrcnn_jax.inference.predictor import Predictor
from maskrcnn_jax.testing.tiny import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def test_errors_name_the_index_in_the_callers_list(tiny):
    config, variables = tiny
    predictor = Predictor(config, variables, batch_size=2)
    good = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match=r"image 2: expected dtype uint8"):
        predictor([good, good, good.astype(np.float32)])
    with pytest.raises(ValueError, match=r"image 3: expected an \(H, W, 3\)"):
        predictor([good, good, good, good[..., 0]])


def test_a_side_that_resizes_to_zero_is_an_error(tiny):
    """1x1000 at min_size 96 / max_size 128 resizes to 0x128: an error, not an empty result."""
    config, variables = tiny
    predictor = Predictor(config, variables)
    with pytest.raises(ValueError, match=r"image 1: size 1x1000 resizes to 0x128 .*0 pixels"):
        predictor([np.zeros((40, 40, 3), np.uint8), np.zeros((1, 1000, 3), np.uint8)])
    assert len(predictor([np.zeros((2, 200, 3), np.uint8)])) == 1  # 1x128: still fine


def test_class_count_mismatch_is_caught_when_built(tiny):
    config, variables = tiny
    other = config.copy_and_resolve_references()
    other.num_classes = 5
    with pytest.raises(ValueError, match=r"num_classes=5, the weights 3") as info:
        Predictor(other, variables)
    assert "params/box_predictor/cls_score/kernel: shape (1024, 3), config expects (1024, 5)" \
        in str(info.value)


def test_missing_and_extra_parameters_are_named(tiny):
    config, variables = tiny
    params = {k: v for k, v in variables["params"].items() if k != "mask_predictor"}
    params["surplus"] = {"kernel": np.zeros(3)}
    with pytest.raises(ValueError) as info:
        Predictor(config, {**variables, "params": params})
    message = str(info.value)
    assert "params/mask_predictor/mask_fcn_logits/kernel: missing" in message
    assert "params/surplus/kernel: not in the model" in message
