"""Training building blocks: optimizer and schedule, train state, the jitted train step and
metric writing. `train.py` wires them (and `maskrcnn_jax.checkpoints`) into a loop.

Data parallel on the `('data',)` mesh of `maskrcnn_jax.runtime` over all devices: every batch is
split on its leading axis, parameters and optimizer state are replicated, and XLA inserts the
gradient all-reduce. The losses normalise over the whole global batch (torchvision's per-batch
normalisation), so the result does not depend on the number of devices beyond float summation
order. The same code runs with one process or many (one per host): `shard_batch` assembles each
process's slice into global arrays, and a stop request (SIGTERM) of any process enters the step
as a sharded flag whose OR comes back in the replicated metrics, so every process stops after
the same step.
"""

import functools
import json
import os
from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from maskrcnn_jax import runtime
from maskrcnn_jax.errors import ConfigError
from maskrcnn_jax.models.maskrcnn import MaskRCNN
from maskrcnn_jax.models.norm import fit_norm_layout
from maskrcnn_jax.training.losses import compute_losses

# The batch fields the losses read; the rest of a pipeline batch (ids, sizes...) stays on host.
TRAIN_FIELDS = ("images", "image_sizes", "padded_sizes", "boxes", "labels", "valid", "masks")
# `(devices,)` bool batch field: a process asks to stop (SIGTERM); `train_step` returns its OR.
STOP_FIELD = "stop_requested"


# ------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------


def learning_rate(opt_cfg, global_batch_size: int) -> float:
    """Peak learning rate: `opt_cfg.learning_rate` is for `opt_cfg.reference_batch_size` images
    and scales linearly with the global batch (torchvision: 0.02 for 16 images)."""
    return float(opt_cfg.learning_rate) * global_batch_size / float(opt_cfg.reference_batch_size)


def learning_rate_schedule(opt_cfg, global_batch_size: int) -> optax.Schedule:
    """Linear warmup from `peak * warmup_factor` over `warmup_steps` (torchvision's LinearLR
    warmup), then the peak multiplied by `gamma` at each of the absolute step `milestones`."""
    peak = learning_rate(opt_cfg, global_batch_size)
    warmup = int(opt_cfg.warmup_steps)
    milestones = [int(m) for m in opt_cfg.milestones]
    if any(m <= warmup for m in milestones):
        raise ValueError(f"milestones {milestones} must come after the warmup ({warmup} steps)")
    # join_schedules hands the second schedule the step count since its boundary.
    decay = optax.piecewise_constant_schedule(
        peak, {m - warmup: float(opt_cfg.gamma) for m in milestones})
    if warmup == 0:
        return decay
    ramp = optax.linear_schedule(peak * float(opt_cfg.warmup_factor), peak, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def frozen_param_labels(params, frozen_backbone_stages: int):
    """'frozen' / 'trained' for every parameter leaf.

    `frozen_backbone_stages` is `5 - trainable_backbone_layers` of torchvision: 0 trains all,
    1 freezes the stem (`backbone/conv1`), 2 also `backbone/layer1_*` (torchvision's default
    with pretrained weights), ... 5 the whole backbone. FrozenBatchNorm buffers are
    'batch_stats', never trained.
    """
    frozen_prefixes = (["conv1"] if frozen_backbone_stages >= 1 else []) + [
        f"layer{i}_" for i in range(1, int(frozen_backbone_stages))]

    def label(path, _):
        keys = [getattr(k, "key", str(k)) for k in path]
        is_frozen = (len(keys) > 1 and keys[0] == "backbone"
                     and any(keys[1] == p or (p.endswith("_") and keys[1].startswith(p))
                             for p in frozen_prefixes))
        return "frozen" if is_frozen else "trained"

    return jax.tree_util.tree_map_with_path(label, params)


def create_optimizer(opt_cfg, params, global_batch_size: int, frozen_backbone_stages: int = 0):
    """(optax transformation, lr schedule).

    SGD (PyTorch semantics: decay added to the gradient, then momentum, no Nesterov) or AdamW
    (decoupled decay), after clipping the global gradient norm (`grad_clip_norm`, 0 = off).
    Frozen backbone parameters get zero updates (`optax.set_to_zero`), no weight decay.
    """
    schedule = learning_rate_schedule(opt_cfg, global_batch_size)
    clip = ([optax.clip_by_global_norm(float(opt_cfg.grad_clip_norm))]
            if opt_cfg.grad_clip_norm else [])
    if opt_cfg.name == "sgd":
        tx = optax.chain(*clip, optax.add_decayed_weights(float(opt_cfg.weight_decay)),
                         optax.sgd(schedule, momentum=float(opt_cfg.momentum)))
    elif opt_cfg.name == "adamw":
        tx = optax.chain(*clip, optax.adamw(schedule, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2),
                                            weight_decay=float(opt_cfg.weight_decay)))
    else:
        raise ValueError(f"optimizer.name must be 'sgd' or 'adamw', got {opt_cfg.name!r}")
    if frozen_backbone_stages:
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                                   frozen_param_labels(params, frozen_backbone_stages))
    return tx, schedule


# ------------------------------------------------------------------------------------------------
# Train state and step
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs on device. `key` is a raw uint32 `(2,)` PRNG key; the key
    of step s is `fold_in(key, s)`, so resuming at any step draws the same samples."""

    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    key: jnp.ndarray


def init_variables(model: MaskRCNN, key: jax.Array):
    """Fresh `{'params', 'batch_stats'}` of a MaskRCNN, initialised through its own `__call__`
    (inference mode). Parameter shapes do not depend on the image size, so a small 64x64 image
    initialises every module cheaply (the unused detections are dead code under jit).

    On the CPU the program is compiled without backend optimisation: XLA's CPU compiler spends
    several times longer optimising the threefry sampling of ~100 initialisers than the program
    runs once; the values then differ from an optimised compile's in the last bits,
    deterministically."""
    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    sizes = jnp.full((1, 2), 64, jnp.int32)

    def init(k):
        return model.init(k, images, sizes, sizes)

    if jax.default_backend() == "cpu":
        try:
            return jax.jit(init, compiler_options={"xla_backend_optimization_level": 0})(key)
        except ValueError as e:  # traced inside another transformation (e.g. eval_shape)
            if "top-level" not in str(e):
                raise
    return jax.jit(init)(key)


def create_train_state(model: MaskRCNN, tx, key: jax.Array, init_backbone=None,
                       variables=None) -> TrainState:
    """Initialise the model and the optimizer state, at step 0: fresh weights, optionally the
    backbone from converted torchvision ResNet variables `{'params', 'batch_stats'}`
    (`init_backbone`), or all of `variables` (a whole model's, e.g. `finetune.load_pretrained`:
    the fine-tuning start)."""
    init_key, train_key = jax.random.split(key)
    if variables is not None:
        if init_backbone is not None:
            raise ValueError("give init_backbone or the whole model's variables, not both")
        variables = jax.tree.map(jnp.asarray, dict(variables))
    else:
        variables = flax.core.unfreeze(init_variables(model, init_key))
    if init_backbone is not None:
        if model.config.get("backbone_norm", "frozen_bn") == "group_norm":
            raise ValueError("init_backbone (torchvision ResNet weights) needs a batch-norm "
                             "backbone (backbone_norm 'frozen_bn' or 'batch_norm'), got "
                             "'group_norm'")
        # The ResNet's BatchNorm2d weights in the model's layout (frozen or trainable).
        expected = ["/".join(str(getattr(k, "key", k)) for k in path)
                    for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
        theirs_all = fit_norm_layout(
            {c: {"backbone": init_backbone.get(c, {})} for c in ("params", "batch_stats")},
            [p for p in expected if p.split("/")[1] == "backbone"])
        for collection in ("params", "batch_stats"):
            ours, theirs = variables[collection]["backbone"], theirs_all[collection]["backbone"]
            if jax.tree.structure(ours) != jax.tree.structure(theirs):
                raise ValueError(f"init_backbone {collection} do not match the backbone "
                                 f"{model.config.backbone!r}")
            variables[collection]["backbone"] = jax.tree.map(jnp.asarray, theirs)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      key=train_key)


def stop_frozen_gradients(params, labels):
    """`params` with `jax.lax.stop_gradient` on every leaf labelled 'frozen'
    (`frozen_param_labels`): as torchvision's `requires_grad=False`, nothing upstream of the
    first trained layer is differentiated, so XLA drops the frozen stages' backward entirely."""
    if labels is None:
        return params
    return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p,
                        params, labels)


def train_step(model: MaskRCNN, tx, state: TrainState, batch: Dict[str, jnp.ndarray],
               frozen_labels=None):
    """One optimizer step: (new state, metrics dict of the total `loss`, each loss term and
    the gradient's global norm), float32 scalars. Batch norms in training move their running
    statistics (the state's `batch_stats`) by the global batch's statistics.

    `frozen_labels` (`frozen_param_labels` of the params): frozen leaves get no gradient (zero,
    and no backward computed); the gradient norm and its clipping cover the trained leaves only,
    as torchvision's `clip_grad_norm_` over the parameters that have a gradient.
    """
    key = jax.random.fold_in(state.key, state.step)

    def loss_fn(params):
        params = stop_frozen_gradients(params, frozen_labels)
        variables = {"params": params, "batch_stats": state.batch_stats}
        return compute_losses(model, variables, batch, key)

    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
    if STOP_FIELD in batch:  # any process's stop request, the same on all (an all-reduce)
        metrics[STOP_FIELD] = jnp.any(batch[STOP_FIELD])
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         batch_stats=batch_stats), metrics


def make_train_step(model: MaskRCNN, tx, mesh: Mesh, frozen_labels=None):
    """`train_step` jitted for `mesh`: batch split on 'data', state replicated. The state
    argument is donated (updated in place)."""
    step = functools.partial(train_step, model, tx, frozen_labels=frozen_labels)
    return jax.jit(step, in_shardings=(runtime.replicated(mesh), runtime.split(mesh)),
                   out_shardings=(runtime.replicated(mesh), runtime.replicated(mesh)),
                   donate_argnums=0)


def check_batch_size(global_batch_size: int):
    """The global batch must split evenly over devices and processes."""
    devices, processes = jax.device_count(), jax.process_count()
    if global_batch_size < 1 or global_batch_size % devices or global_batch_size % processes:
        raise ConfigError(
            f"config.data.batch_size = {global_batch_size}: the global batch must be positive "
            f"and divisible by the number of devices ({devices}) and of processes "
            f"({processes})")
    return global_batch_size // processes


def shard_batch(batch: Dict[str, np.ndarray], mesh: Mesh,
                stop_requested: Optional[bool] = None) -> Dict[str, jax.Array]:
    """This process's part of the global batch -> global arrays sharded on 'data'
    (`make_array_from_process_local_data`: the same code single- and multi-process).

    `stop_requested` (this process's SIGTERM flag), if given, is added as `STOP_FIELD`, one
    value per local device: `train_step` reduces it over all devices into its metrics, so every
    process learns after the same step that one of them must stop.
    """
    arrays = {k: runtime.shard(batch[k], mesh) for k in TRAIN_FIELDS}
    if stop_requested is not None:
        arrays[STOP_FIELD] = runtime.shard(
            np.full((runtime.local_device_count(mesh),), bool(stop_requested)), mesh)
    return arrays


def check_finite(step: int, metrics: Dict[str, float]):
    """Raise `FloatingPointError` naming the step and every term if any loss is not finite."""
    values = {k: float(v) for k, v in metrics.items()}
    if not all(np.isfinite(v) for k, v in values.items() if k.startswith("loss")):
        terms = ", ".join(f"{k}={v}" for k, v in values.items())
        raise FloatingPointError(f"non-finite loss at step {step}: {terms}")


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


class MetricWriter:
    """Scalars to `workdir/metrics.jsonl` (one JSON object per write) and TensorBoard
    (`workdir/tb`); only process 0 writes."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # TensorBoard is optional
                self._tb = None

    def write(self, step: int, scalars: Dict[str, float], prefix: str = "train"):
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": prefix, **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, int(step))
            self._tb.flush()

    def close(self):
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
