"""Predictor input errors: named by the image's index in the caller's list; images whose
resized side would be 0 pixels; weights that do not fit the config, caught when it is built."""

import os

import numpy as np
import pytest

from maskrcnn_jax.config import model_config
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


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(architecture="v2", mask_head_layers=(16, 16)),
    dict(backbone_norm="group_norm", compute_dtype="bfloat16", mask_size=14),
], ids=["v1", "v2", "group_norm_bf16"])
def test_variable_shapes_are_those_of_the_full_init(tiny, overrides):
    """The check's shapes (`MaskRCNN.create_parameters`, no proposal / detection steps) are the
    variables the full forward's `init` creates: every path and shape."""
    import jax
    import jax.numpy as jnp

    from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen
    from maskrcnn_jax.models.variables import variable_shapes

    config = tiny[0].copy_and_resolve_references()
    config.update(overrides)
    images, sizes = jnp.zeros((1, 64, 64, 3)), jnp.full((1, 2), 64, jnp.int32)
    small = config.copy_and_resolve_references()
    small.canvas_size = (64, 64)
    full = jax.eval_shape(MaskRCNN(frozen(small)).init, jax.random.key(0), images, sizes, sizes)
    full = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(full)[0]}
    assert len(full) > 50 and variable_shapes(config) == full


def test_program_cache_reuses_the_exported_network(tiny, tmp_path, monkeypatch):
    """With a program cache, a second Predictor (a later process) loads the exported network
    instead of tracing the model: equal detections, no trace of MaskRCNN; a damaged file is
    exported again."""
    import glob

    from maskrcnn_jax.models import maskrcnn
    from maskrcnn_jax.models import variables as model_variables

    config, variables = tiny
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60, 80, 3), np.uint8), rng.integers(0, 256, (90, 70, 3),
                                                                          np.uint8)]
    expected = Predictor(config, variables)(images)
    first = Predictor(config, variables, program_cache_dir=str(tmp_path))(images)
    programs = glob.glob(str(tmp_path / "maskrcnn_jax_programs" / "program-*"))
    assert len(programs) == len({tuple(config.canvas_size)})  # one canvas: one program
    assert glob.glob(str(tmp_path / "maskrcnn_jax_programs" / "shapes-*"))

    traced = []
    original = maskrcnn.MaskRCNN.__call__
    monkeypatch.setattr(maskrcnn.MaskRCNN, "__call__",
                        lambda self, *a, **k: traced.append(1) or original(self, *a, **k))
    monkeypatch.setattr(model_variables, "variable_shapes",
                        lambda c: pytest.fail("shapes traced"))
    second = Predictor(config, variables, program_cache_dir=str(tmp_path))(images)
    assert not traced  # the model was neither traced for the network nor for the shapes
    for a, b, c in zip(expected, first, second):
        assert len(a["scores"]) > 0
        for key in ("boxes", "scores", "labels", "masks"):
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], c[key])
    monkeypatch.undo()
    with open(programs[0], "wb") as f:
        f.write(b"not a program")
    again = Predictor(config, variables, program_cache_dir=str(tmp_path))(images)
    np.testing.assert_array_equal(again[0]["boxes"], expected[0]["boxes"])
    assert os.path.getsize(programs[0]) > 1000  # exported again


def test_predictors_of_one_config_share_the_compiled_network(tiny):
    """A new Predictor of a config that a live Predictor has reuses its jitted network (and its
    compiled programs), however many Predictors of other configs were made in between."""
    config, variables = tiny
    first = Predictor(config, variables)
    for k in range(1, 11):  # more configs than the recent-configs cache holds (8)
        Predictor(model_config(**dict(config, box_score_thresh=0.01 * k)), variables)
    assert Predictor(config, variables)._forward is first._forward
