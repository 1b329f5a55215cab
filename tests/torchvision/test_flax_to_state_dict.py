"""Flax -> torchvision weights (`flax_to_state_dict`, via `convert.to_torchvision`): round trips.

References: torchvision's own `MaskRCNN` (`torch_models.torchvision_maskrcnn`) of a non-default
architecture, which must load the state dict strictly and give back the variables bit for bit
(`from_torchvision`), and torchvision's `maskrcnn_resnet50_fpn`, whose state dict must survive
the round trip; a torchvision model running converted weights must detect what our `Predictor`
detects.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision


def _shapes(tree):
    """The tree with `(shape, dtype)` leaves."""
    return jax.tree_util.tree_map(lambda a: (np.shape(a), np.asarray(a).dtype), tree)


# A non-default architecture: narrow FPN and heads, two mask-head layers, 4 classes.
SMALL = dict(backbone="resnet18", num_classes=4, min_size=96, max_size=128, canvas_size=(128, 128),
             fpn_channels=32, box_representation_size=64, mask_head_layers=(32, 16),
             mask_dim_reduced=24, box_detections_per_img=20, rpn_pre_nms_top_n_test=200,
             rpn_post_nms_top_n_test=100)


def _random_variables(config, seed):
    """Every variable of `MaskRCNN(config)` (structure from `eval_shape` of its init), filled
    with distinct random float32 values (running_var > 0; batch counters random ints)."""
    from maskrcnn_jax.models.maskrcnn import MaskRCNN

    h, w = config.canvas_size
    shapes = jax.eval_shape(MaskRCNN(config).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, h, w, 3)), jnp.array([[h, w]]), jnp.array([[h, w]]))
    rng = np.random.default_rng(seed)
    def fill(path, s):
        if not np.issubdtype(s.dtype, np.floating):
            return rng.integers(0, 1000, s.shape).astype(s.dtype)
        return (rng.uniform(0.5, 1.5, s.shape) if "running_var" in str(path[-1])
                else rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("backbone,architecture",
                         [("resnet18", "v1"), ("resnet50", "v1"), ("resnet18", "v2")])
def test_to_torchvision_round_trip_is_exact(backbone, architecture):
    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.testing.torch_models import torchvision_maskrcnn
    from maskrcnn_jax.torchvision.convert import from_torchvision, to_torchvision

    config = model_config(**dict(SMALL, backbone=backbone, architecture=architecture))
    variables = _random_variables(config, seed=3)
    state_dict = to_torchvision(config, variables)
    assert all(v.dtype == torch.float32 for v in state_dict.values())
    # torchvision's own model of that architecture takes it: same keys, same shapes.
    model = torchvision_maskrcnn(config)
    model.load_state_dict(state_dict, strict=True)
    assert model.backbone.fpn.layer_blocks[0][0].out_channels == 32
    assert len(model.roi_heads.mask_head) == 2
    back_config, back = from_torchvision(model.state_dict(), **dict(SMALL, backbone=backbone))
    assert back_config == config  # architecture included: read from the keys
    assert _shapes(back) == _shapes(variables)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)


def test_to_torchvision_inverts_torchvision_state_dict():
    """The other direction on torchvision's own maskrcnn_resnet50_fpn (default widths)."""
    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.torchvision.convert import to_torchvision
    from maskrcnn_jax.torchvision.state_dict_to_flax import torchvision_to_flax

    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91)  # BatchNorm2d: num_batches_tracked
    state_dict = model.state_dict()
    converted = torchvision_to_flax(state_dict, num_classes=91)
    back = to_torchvision(model_config(num_classes=91, backbone_norm="batch_norm"), converted)
    assert sorted(back) == sorted(state_dict)  # num_batches_tracked included
    for key, value in state_dict.items():
        assert torch.equal(back[key], value), key


def test_to_torchvision_rejects_mismatches():
    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.torchvision.convert import to_torchvision

    config = model_config(**SMALL)
    variables = _random_variables(config, seed=4)
    with pytest.raises(ValueError, match="num_classes=5"):
        to_torchvision(model_config(**dict(SMALL, num_classes=5)), variables)
    with pytest.raises(ValueError, match="mask_head_layers"):
        to_torchvision(model_config(**dict(SMALL, mask_head_layers=(32, 32))), variables)
    with pytest.raises(ValueError, match="backbone"):
        to_torchvision(model_config(**dict(SMALL, backbone="resnet34")), variables)
    extra = {"params": dict(variables["params"], extra={"kernel": np.zeros((1, 1))}),
             "batch_stats": variables["batch_stats"]}
    with pytest.raises(ValueError, match="extra/kernel"):
        to_torchvision(config, extra)


@pytest.mark.slow
def test_torchvision_runs_converted_weights_as_we_do():
    """torchvision's `MaskRCNN` (built for the small config) loaded with `to_torchvision` of a
    maskrcnn_jax model detects what our `Predictor` detects with those variables (one-to-one:
    label, box within 0.05 px, score within 1e-3), on two shapes validation images."""
    import io

    from PIL import Image

    from maskrcnn_jax.config import model_config
    from maskrcnn_jax.data import shapes
    from maskrcnn_jax.inference.predictor import Predictor
    from maskrcnn_jax.testing.matching import match_rows
    from maskrcnn_jax.testing.torch_models import (
        make_confident,
        randomize_frozen_bn_and_biases,
        torchvision_maskrcnn,
    )
    from maskrcnn_jax.torchvision.convert import from_torchvision, to_torchvision

    config = model_config(**SMALL)
    torch.manual_seed(0)
    source_model = make_confident(torchvision_maskrcnn(config))
    randomize_frozen_bn_and_biases(source_model, seed=1)
    _, variables = from_torchvision(source_model.state_dict(), **SMALL)
    torch.manual_seed(5)  # different random weights: every weight must come from the load
    model = torchvision_maskrcnn(config)
    model.load_state_dict(to_torchvision(config, variables), strict=True)
    predictor = Predictor(config, variables)
    images = [np.array(Image.open(io.BytesIO(shapes.generate_image(0, "validation", i)["image"])))
              for i in (0, 1)]
    total = 0
    for image, ours in zip(images, predictor(images)):
        with torch.no_grad():
            theirs = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])[0]
        theirs = {k: v.numpy() for k, v in theirs.items()}
        assert len(ours["boxes"]) == len(theirs["boxes"])
        keyed = lambda d: np.concatenate([d["boxes"], 1e4 * d["labels"][:, None]], 1)  # noqa: E731
        match = match_rows(keyed(ours), keyed(theirs), tol=0.05)
        assert (match >= 0).all(), f"unmatched torchvision detections {np.where(match < 0)[0]}"
        np.testing.assert_allclose(ours["scores"][match], theirs["scores"], atol=1e-3, rtol=0)
        mae = np.abs(ours["masks"][match] - theirs["masks"]).mean(axis=(1, 2, 3))
        assert len(mae) == 0 or mae.max() <= 1e-3
        total += len(theirs["boxes"])
    assert total >= 10, "the model must detect something for the comparison to mean anything"
