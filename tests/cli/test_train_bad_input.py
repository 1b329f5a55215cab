"""train.py with bad input: the config is validated before anything is created (one line naming
the key, the value and what is allowed, exit status 2), and resuming with another model config
is one line without Orbax's shutdown noise after it."""

import importlib
import os

import pytest

from tests.cli.conftest import REPO, assert_one_line_error, run_tool

CONFIGS = [("coco_r50_fpn_1x", ()), ("shapes", ()), ("tiny", ()), ("tpu_pod", ()),
           ("coco_r50_fpn_v2_lsj", ()), ("tpu_pod_v2_lsj", ()), ("shapes_bn_lsj", ()),
           ("finetune", ()), ("finetune", ("v2",)), ("finetune_shapes", ("pretrain",)),
           ("finetune_shapes", ("finetune",)), ("finetune_shapes", ("scratch",))]


def test_the_list_covers_every_config_file():
    files = {f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
             if f.endswith(".py") and f != "__init__.py"}
    assert files == {name for name, _ in CONFIGS}


def _config(name="tiny", *args, **overrides):
    config = importlib.import_module(f"configs.{name}").get_config(*args)
    if config.data.name == "coco_instances":
        config.data.manual_dir = os.path.dirname(__file__)  # a folder that exists
    config.update_from_flattened_dict(overrides)
    return config


@pytest.mark.parametrize("name,args", CONFIGS)
def test_every_shipped_config_validates(name, args):
    from maskrcnn_jax.training.config_checks import check_config

    check_config(_config(name, *args))


@pytest.mark.parametrize("key,value,message", [
    ("optimizer.learning_rate", -1.0, "config.optimizer.learning_rate = -1.0: must be a finite "
                                      "number > 0"),  # finding 5: gradient ascent, exit 0
    ("optimizer.learning_rate", 0.0, "> 0"),
    ("data.batch_size", 0, "config.data.batch_size = 0: must be an integer >= 1"),
    ("data.eval_batch_size", 0, "config.data.eval_batch_size = 0"),
    ("num_train_steps", 0, "config.num_train_steps = 0"),
    ("optimizer.milestones", (30,), "within the run"),  # tiny: 20 steps
    ("optimizer.milestones", (1,), "after the warmup"),  # tiny: 2 warmup steps
    ("optimizer.milestones", (8, 5), "must be increasing"),
    ("optimizer.name", "sgdd", "must be one of sgd, adamw"),
    ("model.canvas_size", (64, 80), "multiples of model.size_divisible (32)"),
    ("data.flip_probability", 1.5, "<= 1.0"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(key, value, message):
    from maskrcnn_jax.errors import ConfigError
    from maskrcnn_jax.training.config_checks import check_config

    with pytest.raises(ConfigError) as info:
        check_config(_config(**{key: value}))
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_unknown_keys_and_missing_coco_folder():
    from maskrcnn_jax.errors import ConfigError
    from maskrcnn_jax.training.config_checks import check_config

    config = _config()
    config.optimizer.learnig_rate = 0.1  # a typo in a config file: nothing would read it
    with pytest.raises(ConfigError, match=r"config.optimizer.learnig_rate: unknown key"):
        check_config(config)
    for folder in ("", "/no/such/coco"):
        with pytest.raises(ConfigError, match=rf"config.data.manual_dir = '{folder}': coco_"):
            check_config(_config("coco_r50_fpn_1x", **{"data.manual_dir": folder}))


@pytest.mark.parametrize("flags,fragments", [
    (["--config.optimizer.learning_rate=-1"], ["config.optimizer.learning_rate = -1.0"]),
    (["--config.data.batch_size=0"], ["config.data.batch_size = 0"]),
    (["--config.optimizer.learnig_rate=1"],
     ["--config.optimizer.learnig_rate", "unknown config key", "learning_rate"]),
    (["--config=configs/nope.py"], ["--config: cannot load", "No such file", "configs/nope.py"]),
    (["--config=configs/finetune.py:v3"], ["takes v1 or v2, got 'v3'"]),
    # Found after start-up (the devices are logged first), before the workdir is created.
    (["--config.init_from=/no/such/checkpoint"], ["config.init_from = '/no/such/checkpoint'"]),
])
def test_train_py_refuses_before_creating_anything(tmp_path, flags, fragments):
    """Findings 5 and 8: a negative learning rate trained (exit 0); batch size 0 created
    workdir/checkpoints, then a traceback; an unknown key, a config file that does not load and
    a missing init_from were tracebacks (the last after creating the workdir)."""
    workdir = tmp_path / "run"
    config = [f for f in flags if f.startswith("--config=")] or ["--config=configs/tiny.py"]
    overrides = [f for f in flags if not f.startswith("--config=")]
    result = run_tool("train.py", *config, f"--workdir={workdir}",  # --config first
                      f"--config.data.data_dir={tmp_path / 'tfds'}",
                      "--config.num_train_steps=1", *overrides)
    alone = not any(f.startswith("--config.init_from") for f in flags)
    assert_one_line_error(result, 2, "train.py", *fragments, alone=alone)
    assert not workdir.exists() and not (tmp_path / "tfds").exists()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A train.py workdir with one checkpoint of the tiny config (its initial state: no
    training step needs compiling)."""
    import jax

    import train
    from maskrcnn_jax import runtime
    from maskrcnn_jax.data import samplers
    from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen
    from maskrcnn_jax.training import checkpointing, train_lib

    config = _config()
    workdir = str(tmp_path_factory.mktemp("run"))
    model = MaskRCNN(frozen(train.training_model_config(config)))
    key = jax.random.PRNGKey(config.seed)
    shapes = jax.eval_shape(lambda: train_lib.init_variables(model, key))["params"]
    tx, _ = train_lib.create_optimizer(config.optimizer, shapes, config.data.batch_size,
                                       config.frozen_backbone_stages)
    state = runtime.replicate(train_lib.create_train_state(model, tx, key), runtime.data_mesh())
    manager = checkpointing.checkpoint_manager(workdir, 3)
    checkpointing.save_train_state(manager, 1, state, samplers.position_state(8), config)
    manager.wait_until_finished()
    manager.close()
    return workdir


def test_resume_with_another_model_config_is_one_line_without_noise(saved_run, tmp_path):
    """Finding 8: the right error, then Orbax's `ImportError: sys.meta_path is None` (or
    asyncio's 'Event loop is closed') tracebacks at exit that buried it."""
    before = sorted(os.listdir(os.path.join(saved_run, "checkpoints")))
    result = run_tool("train.py", "--config=configs/tiny.py", f"--workdir={saved_run}",
                      f"--config.data.data_dir={tmp_path / 'tfds'}",
                      "--config.model.fpn_channels=16")
    assert_one_line_error(result, 2, "train.py", "does not fit the requested model config",
                          "fpn_channels: saved 128, requested 16", alone=False)
    assert sorted(os.listdir(os.path.join(saved_run, "checkpoints"))) == before
