"""Flax variables of `maskrcnn_jax.models.MaskRCNN` -> a torchvision `MaskRCNN` state dict.

`flax_to_torchvision` is the exact inverse of `state_dict_to_flax.torchvision_to_flax` (the
same layout table read backwards, transposes only, so a round trip is bit-exact): Flax
variables -> a state dict of NumPy float32 arrays with torchvision's `MaskRCNN` keys
(`num_batches_tracked`, int64, for the BatchNorm2d layers that have it; FrozenBatchNorm2d has
none).
"""

import math

import numpy as np


class _TreeReader:
    """Hands out leaves of a nested-dict variable tree as float32 NumPy, tracking use, so that
    leaves the inverse conversion does not know are reported by path."""

    def __init__(self, tree):
        self._leaves = dict(_flatten(tree))
        self._used = set()

    def has(self, path):
        return path in self._leaves or any(k.startswith(path + "/") for k in self._leaves)

    def take(self, path, ndim):
        if path not in self._leaves:
            raise KeyError(f"missing variable: {path!r}")
        array = np.asarray(self._leaves[path], dtype=np.float32)
        if array.ndim != ndim:
            raise ValueError(f"variable {path!r} has shape {array.shape}, expected {ndim} dims")
        self._used.add(path)
        return array

    def take_count(self, path):
        """A `num_batches_tracked` counter as torch's int64 scalar."""
        self._used.add(path)
        return np.asarray(self._leaves[path], np.int64)

    def check_all_used(self):
        unexpected = sorted(set(self._leaves) - self._used)
        if unexpected:
            raise ValueError(f"variables with no torchvision counterpart: {unexpected}")


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if hasattr(value, "items"):
            yield from _flatten(value, path)
        else:
            yield path, value


def _torch_conv(reader, path, key, out):
    """Flax conv `kernel (kh, kw, I, O)` [+ bias] -> torch `weight (O, I, kh, kw)` [+ bias].
    The same transpose inverts the ConvTranspose2d layout `(kh, kw, O, I) -> (I, O, kh, kw)`."""
    out[key + "weight"] = reader.take(path + "/kernel", 4).transpose(3, 2, 0, 1)
    if reader.has(path + "/bias"):
        out[key + "bias"] = reader.take(path + "/bias", 1)


def _torch_linear(reader, path, key, out):
    out[key + "weight"] = reader.take(path + "/kernel", 2).T
    out[key + "bias"] = reader.take(path + "/bias", 1)


def _torch_batch_norm(stats, params, path, key, out):
    """A FrozenBatchNorm (all four in `stats`) or a trainable BatchNorm (weight and bias in
    `params`, `num_batches_tracked` in `stats`) -> torch's BatchNorm2d / FrozenBatchNorm2d keys."""
    for name in ("weight", "bias"):
        where = params if params.has(f"{path}/{name}") else stats
        out[key + name] = where.take(f"{path}/{name}", 1)
    for name in ("running_mean", "running_var"):
        out[key + name] = stats.take(f"{path}/{name}", 1)
    if stats.has(f"{path}/num_batches_tracked"):
        out[key + "num_batches_tracked"] = stats.take_count(f"{path}/num_batches_tracked")


def flax_to_torchvision(variables):
    """Flax variables of `MaskRCNN` (ResNet + FrozenBatchNorm backbone, v1 or v2) -> torchvision
    state dict.

    The inverse of `torchvision_to_flax`: `torchvision_to_flax(flax_to_torchvision(v))` equals `v`
    bit for bit. v2 variables (a box head without `fc6`, norms in `batch_stats/fpn`, ...) give
    `maskrcnn_resnet50_fpn_v2`'s keys.

    Args:
      variables: `{'params': {'backbone', 'fpn', 'rpn_head', 'box_head', 'box_predictor',
        'mask_head', 'mask_predictor'}, 'batch_stats': {'backbone', ...}}` (NumPy or JAX arrays).
    Returns:
      `{torchvision key: float32 NumPy array}` (C-contiguous) for a torchvision `MaskRCNN` whose
      norms are FrozenBatchNorm2d (no `num_batches_tracked` entries; `load_state_dict` of a
      BatchNorm2d model accepts it with `strict=False`, or add them).
    Raises:
      KeyError naming a missing variable; ValueError naming variables torchvision has no place
      for (e.g. a GroupNorm backbone's scales) or a leaf of the wrong rank.
    """
    params = _TreeReader(variables["params"])
    stats = _TreeReader(variables.get("batch_stats", {}))
    out = {}
    body = "backbone.body."
    _torch_conv(params, "backbone/conv1", body + "conv1.", out)
    _torch_batch_norm(stats, params, "backbone/bn1", body + "bn1.", out)
    for i in range(1, 5):
        j = 0
        while params.has(f"backbone/layer{i}_{j}"):
            path, key = f"backbone/layer{i}_{j}", f"{body}layer{i}.{j}."
            for k in (1, 2, 3):
                if params.has(f"{path}/conv{k}"):
                    _torch_conv(params, f"{path}/conv{k}", f"{key}conv{k}.", out)
                    _torch_batch_norm(stats, params, f"{path}/bn{k}", f"{key}bn{k}.", out)
            if params.has(path + "/downsample_conv"):
                _torch_conv(params, path + "/downsample_conv", key + "downsample.0.", out)
                _torch_batch_norm(stats, params, path + "/downsample_bn", key + "downsample.1.", out)
            j += 1
        if j == 0:
            raise KeyError(f"missing variable: 'backbone/layer{i}_0'")
    fpn_channels = None
    for kind in ("inner", "layer"):
        i = 0
        while params.has(f"fpn/{kind}_blocks_{i}"):
            key = f"backbone.fpn.{kind}_blocks.{i}."
            _torch_conv(params, f"fpn/{kind}_blocks_{i}", key + "0.", out)
            if stats.has(f"fpn/{kind}_bn_{i}"):
                _torch_batch_norm(stats, params, f"fpn/{kind}_bn_{i}", key + "1.", out)
            fpn_channels = out[key + "0.weight"].shape[0]
            i += 1
    if fpn_channels is None:
        raise KeyError("missing variable: 'fpn/layer_blocks_0'")
    _torch_conv(params, "rpn_head/conv", "rpn.head.conv.0.0.", out)
    i = 1
    while params.has(f"rpn_head/conv_{i}"):
        _torch_conv(params, f"rpn_head/conv_{i}", f"rpn.head.conv.{i}.0.", out)
        i += 1
    _torch_conv(params, "rpn_head/cls_logits", "rpn.head.cls_logits.", out)
    _torch_conv(params, "rpn_head/bbox_pred", "rpn.head.bbox_pred.", out)

    head = "roi_heads.box_head."
    if params.has("box_head/fc6"):
        out[head + "fc6.weight"] = _nhwc_flatten_to_nchw(params, "box_head/fc6/kernel",
                                                         fpn_channels)
        out[head + "fc6.bias"] = params.take("box_head/fc6/bias", 1)
        _torch_linear(params, "box_head/fc7", head + "fc7.", out)
    else:  # FastRCNNConvFCHead (v2)
        n, channels = 0, fpn_channels
        while params.has(f"box_head/conv_{n}"):
            _torch_conv(params, f"box_head/conv_{n}", f"{head}{n}.0.", out)
            _torch_batch_norm(stats, params, f"box_head/bn_{n}", f"{head}{n}.1.", out)
            channels = out[f"{head}{n}.0.weight"].shape[0]
            n += 1
        j = 0
        while params.has(f"box_head/fc_{j}"):
            key = f"{head}{n + 1 + 2 * j}."
            if j == 0:
                out[key + "weight"] = _nhwc_flatten_to_nchw(params, "box_head/fc_0/kernel",
                                                            channels)
                out[key + "bias"] = params.take("box_head/fc_0/bias", 1)
            else:
                _torch_linear(params, f"box_head/fc_{j}", key, out)
            j += 1
    _torch_linear(params, "box_predictor/cls_score", "roi_heads.box_predictor.cls_score.", out)
    _torch_linear(params, "box_predictor/bbox_pred", "roi_heads.box_predictor.bbox_pred.", out)
    i = 1
    while params.has(f"mask_head/mask_fcn{i}"):
        _torch_conv(params, f"mask_head/mask_fcn{i}", f"roi_heads.mask_head.{i - 1}.0.", out)
        if stats.has(f"mask_head/mask_bn{i}"):
            _torch_batch_norm(stats, params, f"mask_head/mask_bn{i}", f"roi_heads.mask_head.{i - 1}.1.",
                              out)
        i += 1
    _torch_conv(params, "mask_predictor/conv5_mask", "roi_heads.mask_predictor.conv5_mask.", out)
    _torch_conv(params, "mask_predictor/mask_fcn_logits",
                "roi_heads.mask_predictor.mask_fcn_logits.", out)
    params.check_all_used()
    stats.check_all_used()
    return {k: np.array(v, dtype=np.float32, order="C") for k, v in out.items()}  # copies


def _nhwc_flatten_to_nchw(reader, path, channels):
    """A kernel (S*S*C, O) reading the NHWC (h, w, c) flatten -> torch's Linear weight
    (O, C*S*S) reading the (c, h, w) flatten (the inverse of
    `state_dict_to_flax._nchw_flatten_to_nhwc`)."""
    kernel = reader.take(path, 2)
    in_features, out_features = kernel.shape
    size = math.isqrt(in_features // channels)
    if size * size * channels != in_features:
        raise ValueError(f"variable {path!r} has {in_features} inputs, not {channels} * S * S")
    return (kernel.reshape(size, size, channels, out_features)
            .transpose(3, 2, 0, 1).reshape(out_features, in_features))


__all__ = ["flax_to_torchvision"]
