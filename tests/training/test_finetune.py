"""Fine-tuning from a whole trained model (`maskrcnn_jax.training.finetune`, train.py's
`--config.init_from`).

  * Another class count: every class-independent weight is the pretrained one, bit for bit;
    `cls_score`, `bbox_pred` and `mask_fcn_logits` are drawn afresh with torchvision's
    initialisation (compared with a fresh torchvision `FastRCNNPredictor` /
    `MaskRCNNPredictor` of the same shapes: bounds and standard deviations), and the log names
    them with both class counts. Same class count: nothing re-initialised.
  * Other shapes or layers (an FPN width, v1 weights for a v2 config): a ValueError naming the
    layer and both shapes (or both architectures).
  * train.py with `init_from` a converted checkpoint: the first checkpoint starts from it; the
    frozen stages (`frozen_backbone_stages`) are still the pretrained weights after training;
    a resumed run does not read `init_from` again.
"""

import logging
import os

import jax
import numpy as np
import pytest
import torch

import train
from configs import tiny
from maskrcnn_jax import checkpoints
from maskrcnn_jax.config import model_config
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen
from maskrcnn_jax.testing.tiny import tiny_model
from maskrcnn_jax.training import checkpointing, finetune, train_lib

CLASS_LAYERS = sorted(finetune.CLASS_LAYERS)
# configs/tiny.py's model (64x64 canvas), whatever its class count.
RECIPE = {k: v for k, v in tiny.get_config().model.items() if k != "num_classes"}


@pytest.fixture(scope="module")
def pretrained():
    """The tiny recipe's model config and random variables with 3 classes (background + 2)."""
    config, variables = tiny_model(num_classes=3, **RECIPE)
    return config, jax.tree.map(np.asarray, variables)


def _flat(variables):
    return checkpoints.flatten_by_path(variables)


def test_new_classes_reinitialise_only_the_class_layers(pretrained, caplog):
    config, variables = pretrained
    target = model_config(**dict(config, num_classes=6))
    with caplog.at_level(logging.INFO, logger="maskrcnn_jax.training.finetune"):
        adapted, reinit = finetune.adapt_variables(target, variables, jax.random.PRNGKey(3),
                                                   source="pretrained/")
    assert reinit == CLASS_LAYERS
    before, after = _flat(variables), _flat(adapted)
    assert set(before) == set(after)
    for path, value in after.items():
        layer = path.rsplit("/", 1)[0]
        if layer in finetune.CLASS_LAYERS:
            assert value.shape[-1] == 6 * finetune.CLASS_LAYERS[layer][1], path
        else:
            np.testing.assert_array_equal(value, before[path], err_msg=path)
    # The model takes them.
    MaskRCNN(frozen(target)).apply(adapted, *_inputs())
    for layer in CLASS_LAYERS:
        assert any(layer.removeprefix("params/") in r.message and "3 classes" in r.message
                   and "num_classes=6" in r.message for r in caplog.records), layer


def _inputs():
    import jax.numpy as jnp

    return (jnp.zeros((1, 64, 64, 3)), jnp.full((1, 2), 64, jnp.int32),
            jnp.full((1, 2), 64, jnp.int32))


def test_reinitialised_layers_follow_torchvision(pretrained):
    """Our draws against torchvision's own fresh predictors of the same shapes (many classes so
    that the statistics are tight)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    config, variables = pretrained
    classes = 200
    target = model_config(**dict(config, num_classes=classes))
    adapted = _flat(finetune.adapt_variables(target, variables, jax.random.PRNGKey(0))[0])
    representation = adapted["params/box_predictor/cls_score/kernel"].shape[0]
    dim_reduced = adapted["params/mask_predictor/mask_fcn_logits/kernel"].shape[2]
    torch.manual_seed(0)
    box = FastRCNNPredictor(representation, classes)
    mask = MaskRCNNPredictor(8, dim_reduced, classes)
    theirs = {"box_predictor/cls_score": box.cls_score, "box_predictor/bbox_pred": box.bbox_pred,
              "mask_predictor/mask_fcn_logits": mask.mask_fcn_logits}
    for layer, module in theirs.items():
        for name, torch_name in (("kernel", "weight"), ("bias", "bias")):
            ours = adapted[f"params/{layer}/{name}"].ravel()
            ref = getattr(module, torch_name).detach().numpy().ravel()
            assert ours.size == ref.size, layer
            # Same distribution: same range (uniform) or spread (normal), within sampling error.
            assert abs(ours.std() - ref.std()) <= 0.05 * ref.std(), (layer, name)
            assert abs(np.abs(ours).max() - np.abs(ref).max()) <= 0.1 * np.abs(ref).max(), \
                (layer, name)
            assert abs(ours.mean()) <= 4 * ref.std() / np.sqrt(ref.size) + 1e-12, (layer, name)


def test_same_classes_loads_everything(pretrained):
    config, variables = pretrained
    adapted, reinit = finetune.adapt_variables(config, variables, jax.random.PRNGKey(0))
    assert reinit == []
    jax.tree.map(np.testing.assert_array_equal, adapted, variables)


def test_other_shapes_are_an_error(pretrained):
    config, variables = pretrained
    wider = model_config(**dict(config, fpn_channels=int(config.fpn_channels) * 2, num_classes=6))
    with pytest.raises(ValueError, match=r"fpn/.*shape .*config expects .*not a class-count"):
        finetune.adapt_variables(wider, variables, jax.random.PRNGKey(0), source="ckpt/")
    v2 = model_config(**dict(config, architecture="v2"))
    with pytest.raises(ValueError, match=r"params/rpn_head/conv_1: missing from ckpt/"):
        finetune.adapt_variables(v2, variables, jax.random.PRNGKey(0), source="ckpt/")


def test_load_pretrained_checks_the_architecture(pretrained, tmp_path):
    config, variables = pretrained
    checkpoints.save_converted(str(tmp_path / "v1"), config, variables)
    with pytest.raises(ValueError, match="v1 Mask R-CNN.*architecture='v2'"):
        finetune.load_pretrained(str(tmp_path / "v1"),
                                 model_config(**dict(config, architecture="v2")))
    with pytest.raises(FileNotFoundError, match="no-such"):
        finetune.load_pretrained(str(tmp_path / "no-such"), config)


def test_train_py_starts_from_init_from(pretrained, tmp_path):
    """The tiny recipe with 5 classes from a 3-class converted checkpoint: 2 steps with the
    stem and layer1 frozen."""
    pretrained_config, variables = pretrained
    config = tiny.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.model.num_classes = 5
    config.num_train_steps = 2
    config.frozen_backbone_stages = 2
    checkpoints.save_converted(str(tmp_path / "pre"), pretrained_config, variables)
    config.init_from = str(tmp_path / "pre")
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    _, trained, _ = checkpoints.load_weights(workdir)
    before, after = _flat(variables), _flat(jax.tree.map(np.asarray, trained))
    labels = _flat(train_lib.frozen_param_labels(trained["params"], 2))
    frozen_paths = [p for p, v in labels.items() if str(v) == "frozen"]
    assert frozen_paths
    for path in frozen_paths:
        np.testing.assert_array_equal(after[f"params/{path}"], before[f"params/{path}"])
    # Trained layers moved away from the start (not a fresh initialisation either: the RPN
    # head's conv stays close to the pretrained one after two small steps).
    conv = "params/rpn_head/conv/kernel"
    assert not np.array_equal(after[conv], before[conv])
    assert np.abs(after[conv] - before[conv]).max() < 0.1 * np.abs(before[conv]).max()
    # A resumed run does not need init_from any more.
    config.init_from = str(tmp_path / "gone")
    config.num_train_steps = 3
    train.train_and_evaluate(config, workdir)
    assert checkpointing.checkpoint_manager(workdir, 3).latest_step() == 3
    assert not os.path.exists(tmp_path / "gone")
