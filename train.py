"""Train (and evaluate) Mask R-CNN: an Optax loop on a data-parallel device mesh with Orbax
checkpoints that resume exactly.

    python train.py --config=configs/shapes.py --workdir=/tmp/shapes_run [--config.a.b=v ...]

Re-running with the same workdir resumes from the latest checkpoint (parameters, optimizer state,
step, data position; the PRNG key of a step depends only on the seed and the step). SIGTERM
(to any one process of a multi-process run) makes every process save the same step, the one
after the step in flight, and exit cleanly. Metrics go to `workdir/metrics.jsonl`
and TensorBoard (`workdir/tb`); at the end the model is evaluated (COCO box and mask AP,
`final_eval`) and the final metrics are printed.
"""

import logging
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags
from tqdm import tqdm

from maskrcnn_jax import checkpoints, cli, runtime
from maskrcnn_jax.config import model_config
from maskrcnn_jax.data import builders, lsj, pipeline, samplers
from maskrcnn_jax.errors import ConfigError, UsageError
from maskrcnn_jax.models.maskrcnn import MaskRCNN, frozen, mask_budget
from maskrcnn_jax.training import checkpointing, config_checks, train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/shapes.py", "Training configuration file.")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard logs go here.")
# Listed by `python train.py --help` (absl shows the main module's own flags). A multi-process
# run: --coordinator_address/--num_processes/--process_id by hand, or --distributed (or
# --config.distributed=True) to auto-detect the cluster.
cli.define_runtime_flags(FLAGS, module_name=sys.argv[0] if __name__ == "__main__" else __name__)

log = logging.getLogger(__name__)


def load_source(data_cfg, split: str):
    """The random-access data source of a split (built under `data_dir` on first use)."""
    data_dir = os.path.expanduser(data_cfg.data_dir)
    if data_cfg.name == "shapes":
        return builders.load("shapes", data_dir, split,
                             config=builders.shapes_config(**data_cfg.shapes.to_dict()))
    return builders.load(data_cfg.name, data_dir, split,
                         manual_dir=os.path.expanduser(data_cfg.manual_dir) or None)


def _load_start(key: str, load, path: str, *args):
    """`load(path, *args)` for the config key `key` (init_from, init_backbone): a path that
    does not exist is a ConfigError naming the key."""
    try:
        return load(path, *args)
    except FileNotFoundError:
        raise ConfigError(f"config.{key} = {path!r}: no such checkpoint folder or .pth "
                          "file") from None


def _has_saved_steps(workdir: str) -> bool:
    """Whether `workdir/checkpoints` holds a step folder (a run to resume)."""
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def large_scale_jitter(data_cfg):
    """The training augmentation's large-scale jitter (`data.augmentation='lsj'`), else None
    (the resize to `data.min_sizes`)."""
    augmentation = data_cfg.get("augmentation", "resize")
    if augmentation == "resize":
        return None
    if augmentation != "lsj":
        raise ValueError(f"data.augmentation {augmentation!r}: choose 'resize' or 'lsj'")
    return lsj.LargeScaleJitter(size=int(data_cfg.lsj_size),
                                scale_range=tuple(float(v) for v in data_cfg.lsj_scale_range))


def load_backbone(path: str):
    """Backbone variables `{'params', 'batch_stats'}` from a torchvision ImageNet ResNet state
    dict (.pth; needs torch)."""
    weights = checkpoints.load_weights(path)
    if weights.config is not None:
        raise ConfigError(f"config.init_backbone = {path!r} holds a whole Mask R-CNN, not an "
                          "ImageNet ResNet: start from it with init_from")
    return {collection: tree["backbone"] for collection, tree in weights.variables.items()}


class SigtermFlag:
    """Records a SIGTERM instead of dying, so the loop can checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def discard_diverged(manager, step: int) -> str:
    """After a non-finite loss at `step`: the state it was computed from (`step - 1`) does not
    train on, so its checkpoint, if one was saved, is deleted. Returns what is left."""
    if step - 1 in manager.all_steps():
        checkpointing.delete_step(manager, step - 1)
        log.warning("deleted checkpoint step %d: its next step's loss is not finite", step - 1)
    manager.wait_until_finished()
    latest = manager.latest_step()
    return ("no checkpoint kept" if latest is None
            else f"the newest checkpoint is step {latest}; resume from it with a lower learning "
                 "rate or gradient clipping")


def evaluate(config, model_cfg, state, workdir: str):
    """COCO metrics of the current parameters on the eval split."""
    from maskrcnn_jax.inference import evaluation

    # Every process evaluates its shard of the split on its devices (the state's mesh).
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    source = load_source(config.data, config.data.eval_split)
    return evaluation.evaluate(model_cfg, variables, source, workdir=workdir,
                               batch_size=config.data.eval_batch_size, mesh=runtime.data_mesh())


def training_model_config(config):
    """The model config of a training run: `config.model`, with ground-truth masks as the input
    pipeline gives them (crops on their boxes) and its batch-wide mask budget, if any
    (`models.maskrcnn.mask_budget`: `model.mask_rois_per_batch` or the default
    `model.mask_budget_per_image`), shared equally by the devices, each packing its own share
    of the global batch (`mask_budget_groups`)."""
    settings = {**config.model.to_dict(), "gt_mask_format": "crops"}
    devices = jax.device_count()
    _, budget = mask_budget(model_config(**settings), int(config.data.batch_size))
    if budget is not None:
        if settings.get("mask_rois_per_batch") is not None and budget % devices:
            raise ConfigError(f"config.model.mask_rois_per_batch = {budget}: must be divisible "
                              f"by the number of devices ({devices}), each of which gets an "
                              "equal share")
        settings["mask_budget_groups"] = devices
    return model_config(**settings)


def compiled_train_step(config, mesh, param_shapes):
    """The jitted train step of a run's model, optimizer and global batch on `mesh` (frozen
    backbone stages without gradient). One per configuration in the process
    (`runtime.compiled`): a second `train_and_evaluate` of it (a resume in a notebook, the
    tests) runs the program it has instead of compiling it again.

    `param_shapes`: the model's parameters (or their shapes, `jax.eval_shape`)."""
    model_cfg = training_model_config(config)
    stages = config.frozen_backbone_stages

    def build():
        tx, _ = train_lib.create_optimizer(config.optimizer, param_shapes,
                                           int(config.data.batch_size), stages)
        labels = train_lib.frozen_param_labels(param_shapes, stages) if stages else None
        return train_lib.make_train_step(MaskRCNN(frozen(model_cfg)), tx, mesh, labels)

    return runtime.compiled("train_step", [model_cfg, config.optimizer, config.data.batch_size,
                                           stages, mesh], build)


def train_and_evaluate(config, workdir: str, step_hook=None) -> dict:
    """Train for `config.num_train_steps` (resuming from `workdir`), then evaluate.

    Args:
      config: a ConfigDict as in `configs/shapes.py`.
      workdir: checkpoints, metrics.jsonl, tb/.
      step_hook: optional `hook(step, metrics)` called after every step (tests use it).

    Returns:
      The last logged training metrics and the evaluation metrics (prefixed 'eval/');
      {'preempted': step} instead when stopped by SIGTERM.

    Raises:
      FloatingPointError: a loss is not finite (the message names the step and every term).
        The state that gave it is never saved, and a checkpoint of the state just before is
        deleted, so that the newest checkpoint is one that trains on.
    """
    config_checks.check_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    model_cfg = training_model_config(config)
    model = MaskRCNN(frozen(model_cfg))
    global_batch = int(config.data.batch_size)
    local_batch = train_lib.check_batch_size(global_batch)
    mesh = runtime.data_mesh()

    def make_loader(start_record: int):  # this process's slice of the global sequence
        return pipeline.make_dataset(
            load_source(config.data, config.data.train_split), model_cfg, batch_size=local_batch,
            train=True, seed=config.seed, max_instances=config.data.max_instances,
            mask_crop_size=config.data.mask_crop_size, min_sizes=tuple(config.data.min_sizes),
            flip_probability=config.data.flip_probability, worker_count=config.data.worker_count,
            global_batch_size=global_batch, start_record=start_record,
            jitter=large_scale_jitter(config.data))

    key = jax.random.PRNGKey(config.seed)
    param_shapes = jax.eval_shape(lambda: train_lib.init_variables(model, key))["params"]
    tx, schedule = train_lib.create_optimizer(config.optimizer, param_shapes, global_batch,
                                              config.frozen_backbone_stages)
    # The weights a new run starts from are read before the workdir is created (resuming
    # needs neither): a missing or unusable one is an error that leaves nothing behind.
    resuming = _has_saved_steps(workdir)
    backbone = (_load_start("init_backbone", load_backbone, config.init_backbone)
                if config.init_backbone and not resuming else None)
    initial = None
    if config.get("init_from") and not resuming:
        from maskrcnn_jax.training import finetune

        initial = _load_start("init_from", finetune.load_pretrained, config.init_from,
                              model_cfg, jax.random.fold_in(key, 1))
    manager = checkpointing.checkpoint_manager(workdir, config.keep_checkpoints)
    try:
        if manager.latest_step() is None:
            state = runtime.replicate(
                train_lib.create_train_state(model, tx, key, backbone, variables=initial), mesh)
        else:  # resuming: the restore target needs only shapes (no initialisation to compile)
            state = jax.eval_shape(lambda: train_lib.create_train_state(model, tx, key))
            state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
                s.shape, s.dtype, sharding=runtime.replicated(mesh)), state)
        restored = checkpointing.restore_train_state(manager, state, config.model.to_dict())
        start_record = 0
        if restored is not None:
            state, data_state, _ = restored
            start_record = samplers.records_consumed(data_state, int(state.step), global_batch)
        step = int(state.step)
        data_iter, start_step = iter(make_loader(start_record)), step
        if restored is not None:
            log.info("resumed from step %d", step)
        p_train_step = compiled_train_step(config, mesh, param_shapes)
        writer = train_lib.MetricWriter(workdir)
        num_steps = int(config.num_train_steps)

        def save(at_step):
            consumed = start_record + (at_step - start_step) * global_batch
            checkpointing.save_train_state(manager, at_step, state, samplers.position_state(consumed),
                                         config)

        window, window_start, window_steps = {}, time.time(), 0
        last_logged = {}
        with SigtermFlag() as sigterm, tqdm(total=num_steps, initial=step, desc="train",
                                            disable=not runtime.is_main_process()) as bar:
            while step < num_steps:
                # This process's SIGTERM flag rides along with the batch; the step returns the OR
                # over every process, so all of them stop after the same step.
                batch = train_lib.shard_batch(next(data_iter), mesh,
                                              stop_requested=sigterm.requested)
                if step == start_step and jax.process_count() > 1:
                    # Compile first (the call below reuses it), then meet: the step's first
                    # collective must not wait for a peer that is still compiling.
                    p_train_step.lower(state, batch).compile()
                    runtime.barrier("first_train_step")
                state, metrics = p_train_step(state, batch)
                step += 1
                metrics = jax.device_get(metrics)
                stop = bool(metrics.pop(train_lib.STOP_FIELD))
                try:
                    train_lib.check_finite(step, metrics)
                except FloatingPointError as e:
                    raise FloatingPointError(f"{e}; {discard_diverged(manager, step)}") from None
                if step_hook is not None:
                    step_hook(step, metrics)
                for k, v in metrics.items():  # summed over the window (maxima: the max)
                    window[k] = (max(window.get(k, 0.0), float(v)) if k.endswith("_max")
                                 else window.get(k, 0.0) + float(v))
                window_steps += 1
                images_per_s = window_steps * global_batch / max(time.time() - window_start, 1e-9)
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", img_s=f"{images_per_s:.1f}")
                bar.update(1)
                if step % config.log_every_steps == 0 or step == num_steps:
                    last_logged = {k: v if k.endswith("_max") else v / window_steps
                                   for k, v in window.items()}
                    last_logged.update(lr=float(schedule(step - 1)), images_per_s=images_per_s)
                    writer.write(step, last_logged)
                    window, window_start, window_steps = {}, time.time(), 0
                if step % config.checkpoint_every_steps == 0 or step == num_steps or stop:
                    save(step)
                if stop:
                    manager.wait_until_finished()
                    log.warning("SIGTERM (%s): saved a checkpoint at step %d, exiting",
                                "this process" if sigterm.requested else "another process", step)
                    writer.close()
                    manager.close()
                    return {"preempted": step}
                if (config.eval_every_steps and step % config.eval_every_steps == 0
                        and step < num_steps):
                    writer.write(step, evaluate(config, model_cfg, state, workdir),
                                 prefix="eval")

        save(step)  # no-op when the last step is already saved (e.g. a finished run restarted)
        manager.wait_until_finished()
        manager.close()
    except BaseException:  # an error or interrupt: let Orbax's threads end before exit
        manager.close()
        raise
    results = dict(last_logged)
    eval_metrics = evaluate(config, model_cfg, state, workdir) if config.final_eval else {}
    if eval_metrics:
        writer.write(step, eval_metrics, prefix="eval")
    writer.close()
    results.update({f"eval/{k}": v for k, v in eval_metrics.items()})
    return results


def main(argv=None) -> int:
    """train.py's command line (`argv` without the program name; None: `sys.argv[1:]`)."""
    args = cli.parse(FLAGS, argv, __doc__, "train.py")
    with cli.reporting("train.py", FLAGS.verbose):
        if args:
            raise UsageError(f"unexpected arguments {args} (see train.py --help)")
        if not FLAGS.workdir:
            raise UsageError("--workdir is required")
        config = cli.config_flag_value(FLAGS)
        config_checks.check_config(config)  # before anything is created
        if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
            raise UsageError(f"--workdir {FLAGS.workdir}: exists and is not a folder")
        # Our progress and warnings at INFO; libraries' (Orbax, TFDS, absl) chatter only from
        # WARNING.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                            force=True)  # a library imported above may have set one up
        logging.getLogger("maskrcnn_jax").setLevel(logging.INFO)
        log.setLevel(logging.INFO)
        absl_logging.set_verbosity(absl_logging.WARNING)
        cli.start_runtime(FLAGS, "train.py", auto=config.distributed)
        log.info("devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
                 jax.process_count())
        results = train_and_evaluate(config, FLAGS.workdir)
    if runtime.is_main_process():
        print("final metrics:")
        for k, v in sorted(results.items()):
            print(f"  {k}: {v:.4f}" if isinstance(v, (float, np.floating)) else f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
