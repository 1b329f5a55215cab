"""Normalisation layers, NHWC: torchvision's `FrozenBatchNorm2d` and `nn.BatchNorm2d`
(SyncBatchNorm semantics under a data-parallel jit), and a masked GroupNorm.

Variables carry torch's names so conversion is a renaming: `FrozenBatchNorm` keeps `weight`,
`bias`, `running_mean`, `running_var` in `'batch_stats'` (never trained, never updated);
`BatchNorm` has trainable `'params'` `weight`, `bias` and `'batch_stats'` `running_mean`,
`running_var`, `num_batches_tracked`.
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

# torch.nn.BatchNorm2d's defaults.
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1

NORMS = ("frozen_bn", "batch_norm", "group_norm")


def valid_at(x, pixel_valid):
    """`pixel_valid (N, H, W)` at the resolution of the NHWC map `x`: `(N, h, w)` bool.

    Strides are powers of two; the nearest one to canvas/map size (as torchvision infers
    scales) also holds for the ceil-sized maps of canvases not divisible by 64 (P6).
    """
    stride = 2 ** round(math.log2(pixel_valid.shape[1] / x.shape[1]))
    return pixel_valid[:, ::stride, ::stride][:, : x.shape[1], : x.shape[2]]


def _affine(x, scale, shift, dtype):
    dtype = dtype if dtype is not None else x.dtype
    return x.astype(dtype) * scale.astype(dtype) + shift.astype(dtype)


class FrozenBatchNorm(nn.Module):
    """torchvision's `FrozenBatchNorm2d`: a fixed per-channel affine map.

    Computes exactly as torch does: `scale = weight * rsqrt(running_var + eps)`,
    `bias = bias - running_mean * scale`, `x * scale + bias`. The four float32 buffers live in
    the `'batch_stats'` collection under torch's names and are never updated.

    Attributes:
      eps: added to `running_var`; torchvision's default 1e-5, but its official COCO Mask R-CNN
        checkpoint runs with 0.0 (`overwrite_eps(model, 0.0)` in its weights builder).
      dtype: computation dtype (None: the input's).

    Input/output: (..., C) channels-last array; output in `dtype` (default: input dtype).
    """

    eps: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]

        def buffer(name, init):
            return self.variable("batch_stats", name, init, (c,), jnp.float32).value

        weight = buffer("weight", jnp.ones)
        bias = buffer("bias", jnp.zeros)
        running_mean = buffer("running_mean", jnp.zeros)
        running_var = buffer("running_var", jnp.ones)
        # Fold in float32 (as torch does), then apply in the computation dtype.
        scale = weight * lax.rsqrt(running_var + self.eps)
        return _affine(x, scale, bias - running_mean * scale, self.dtype)


class MaskedGroupNorm(nn.Module):
    """GroupNorm whose statistics cover only each image's valid region (trainable scale/bias).

    For training from scratch, where FrozenBatchNorm's fixed affine map leaves a deep ResNet
    without normalisation (He et al., "Rethinking ImageNet Pre-training", use GroupNorm there).
    Statistics over the valid pixels only keep every image's features independent of the canvas
    it is padded into, as `zero_outside` does for the convolutions; the padded region's output is
    not meaningful (later `zero_outside` calls clear it). Not a torchvision module: models with it
    do not convert to torchvision.

    Attributes:
      num_groups: groups (32 as in the paper), reduced to a divisor of narrow widths.
      eps: added to the variance.

    Input/output: (N, h, w, C); statistics in float32, output in `dtype` (default input dtype).
    """

    num_groups: int = 32
    eps: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x, pixel_valid=None):
        n, h, w, c = x.shape
        groups = math.gcd(self.num_groups, c)
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xg = x.astype(jnp.float32).reshape(n, h, w, groups, c // groups)
        if pixel_valid is None:
            weight = jnp.ones((n, h, w, 1, 1), jnp.float32)
        else:
            weight = valid_at(x, pixel_valid).astype(jnp.float32)[..., None, None]
        count = jnp.maximum(jnp.sum(weight, axis=(1, 2, 4), keepdims=True) * (c // groups), 1.0)
        mean = jnp.sum(xg * weight, axis=(1, 2, 4), keepdims=True) / count
        centered = xg - mean
        var = jnp.sum(jnp.square(centered) * weight, axis=(1, 2, 4), keepdims=True) / count
        y = (centered * lax.rsqrt(var + self.eps)).reshape(n, h, w, c) * scale + bias
        return y.astype(self.dtype if self.dtype is not None else x.dtype)


class BatchNorm(nn.Module):
    """torch's `nn.BatchNorm2d` (momentum 0.1): batch statistics in training, running ones in
    inference.

    In training (`train=True`, with `'batch_stats'` mutable: `apply(..., mutable=['batch_stats'])`)
    the mean and (biased) variance over every axis but the last normalise `x`, and the running
    statistics move by `momentum` towards them, the variance unbiased (`n / (n - 1)`), as torch
    does; `num_batches_tracked` counts the updates. Under `jax.jit` over a data-parallel mesh the
    reductions run over the GLOBAL batch (XLA all-reduces them across devices and processes):
    torch's SyncBatchNorm, with no per-device statistics. Gradients flow through the batch
    statistics, as torch's autograd does. In inference the running statistics give a fixed
    affine map, folded in float32 as `FrozenBatchNorm` (torch's CPU kernel folds the same way).

    Attributes:
      eps, momentum: torch's (1e-5, 0.1).
      dtype: computation dtype (None: the input's); statistics are float32.

    Call: x `(..., C)`; `train` (static); `mask` (training only): bool broadcastable to
    `x.shape[:-1]`, the entries the statistics cover (e.g. the valid RoIs of a padded set);
    None: every entry, padding included (torchvision's batch tensor).
    """

    eps: float = BATCH_NORM_EPS
    momentum: float = BATCH_NORM_MOMENTUM
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "running_var", jnp.ones, (c,), jnp.float32)
        tracked = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        if not train:
            scale = weight * lax.rsqrt(running_var.value + self.eps)
            return _affine(x, scale, bias - running_mean.value * scale, self.dtype)
        # Statistics in float32 at least (float64 inputs keep float64: the parity tests).
        values = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        axes = tuple(range(x.ndim - 1))
        if mask is None:
            count = math.prod(x.shape[:-1])
            mean = jnp.mean(values, axis=axes)
            var = jnp.mean(jnp.square(values - mean), axis=axes)
        else:
            keep = jnp.broadcast_to(mask, x.shape[:-1])[..., None]
            count = jnp.sum(keep).astype(values.dtype)
            mean = jnp.sum(jnp.where(keep, values, 0.0), axis=axes) / jnp.maximum(count, 1.0)
            var = jnp.sum(jnp.where(keep, jnp.square(values - mean), 0.0),
                          axis=axes) / jnp.maximum(count, 1.0)
        if not self.is_initializing():
            m = self.momentum
            unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))
            running_mean.value = (1.0 - m) * running_mean.value + m * lax.stop_gradient(mean)
            running_var.value = (1.0 - m) * running_var.value + m * lax.stop_gradient(unbiased)
            tracked.value = tracked.value + 1
        scale = weight * lax.rsqrt(var + self.eps)
        return _affine(x, scale, bias - mean * scale, self.dtype)


def fit_norm_layout(variables, expected_paths) -> dict:
    """`variables` with each batch norm's affine map where the model keeps it: in `'params'`
    (trainable `BatchNorm`) or in `'batch_stats'` (`FrozenBatchNorm`), and
    `num_batches_tracked` present exactly where the model has it (0 when added). The same
    torchvision BatchNorm2d weights run either way; this moves them between the two layouts.

    Args:
      variables: `{'params': ..., 'batch_stats': ...}` nested dicts (e.g. converted weights).
      expected_paths: the model's variable paths, `'params/backbone/bn1/weight'` etc.
        (`models.variables.variable_shapes`).
    """
    expected = set(expected_paths)
    params = _copy_tree(variables.get("params", {}))
    stats = _copy_tree(variables.get("batch_stats", {}))
    for layer, node in list(_norm_layers(stats)):
        owner = _node(params, layer, create="params/" + layer + "/weight" in expected)
        for name in ("weight", "bias"):
            if f"params/{layer}/{name}" in expected and name in node:
                owner[name] = node.pop(name)
            elif f"batch_stats/{layer}/{name}" in expected and owner is not None and name in owner:
                node[name] = owner.pop(name)
        tracked = f"batch_stats/{layer}/num_batches_tracked"
        if tracked in expected and "num_batches_tracked" not in node:
            node["num_batches_tracked"] = np.zeros((), np.int32)
        elif tracked not in expected:
            node.pop("num_batches_tracked", None)
    _prune_empty(params)
    return {**variables, "params": params, "batch_stats": stats}


def _copy_tree(tree):
    return {k: _copy_tree(v) if hasattr(v, "items") else v for k, v in tree.items()}


def _norm_layers(tree, prefix=""):
    """(path, node) of every batch-norm layer (a node holding `running_mean`)."""
    if "running_mean" in tree:
        yield prefix, tree
        return
    for key, value in tree.items():
        if hasattr(value, "items"):
            yield from _norm_layers(value, f"{prefix}/{key}" if prefix else str(key))


def _node(tree, path, create):
    for key in path.split("/"):
        if key not in tree:
            if not create:
                return None
            tree[key] = {}
        tree = tree[key]
    return tree


def _prune_empty(tree):
    for key in [k for k, v in tree.items() if hasattr(v, "items")]:
        _prune_empty(tree[key])
        if not tree[key]:
            del tree[key]


def normalize(kind: str, name: str, x, *, eps: float = BATCH_NORM_EPS, dtype=None,
              train: bool = False, pixel_valid=None, mask=None):
    """The norm layer `kind` (`NORMS`) named `name`, created in the caller's compact scope and
    applied to `x`: 'frozen_bn' (`FrozenBatchNorm` of `eps`), 'batch_norm' (`BatchNorm`, batch
    statistics when `train`, over the entries of `mask`) or 'group_norm' (`MaskedGroupNorm`
    over each image's `pixel_valid` region)."""
    if kind == "frozen_bn":
        return FrozenBatchNorm(eps=eps, dtype=dtype, name=name)(x)
    if kind == "batch_norm":
        return BatchNorm(dtype=dtype, name=name)(x, train, mask)
    if kind == "group_norm":
        return MaskedGroupNorm(dtype=dtype, name=name)(x, pixel_valid)
    raise ValueError(f"unknown norm {kind!r}; choose from {NORMS}")
