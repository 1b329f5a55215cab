"""torchvision state dicts -> Flax variables of `maskrcnn_jax.models`.

Layout conversions (torch -> Flax, NCHW -> NHWC):
  Conv2d weight (O, I, kh, kw)           -> kernel (kh, kw, I, O)
  ConvTranspose2d weight (I, O, kh, kw)  -> kernel (kh, kw, O, I)   (used with transpose_kernel)
  Linear weight (O, I)                   -> kernel (I, O)
  fc6 weight (O, C*S*S) in (c, h, w)     -> kernel (S*S*C, O) in (h, w, c) order, so that the
                                            NHWC RoI features are flattened without a transpose.
  FrozenBatchNorm2d / BatchNorm2d        -> 'batch_stats' {weight, bias, running_mean,
                                            running_var[, num_batches_tracked (int32)]}; a
                                            trainable BatchNorm's weight and bias then move to
                                            'params' (`norm.fit_norm_layout`).

Every tensor is returned as a NumPy float32 array. The structure is read from the keys (block
counts, bottleneck vs basic blocks, widths), and each tensor's shape is checked against the
widths seen so far; missing keys, unexpected keys and shape mismatches raise with the key name.
The inverse is `flax_to_state_dict.flax_to_torchvision`.
"""

import math

import numpy as np


class _StateDictReader:
    """Hands out state-dict tensors as float32 NumPy arrays, checking shapes and tracking use."""

    def __init__(self, state_dict, ignore_prefixes=()):
        self._tensors = {k: v for k, v in state_dict.items()
                         if not k.startswith(tuple(ignore_prefixes))}
        self._used = set()

    def has(self, key):
        return key in self._tensors

    def take(self, key, shape):
        """The tensor at `key` as float32 NumPy; `shape` may hold None for any size."""
        if key not in self._tensors:
            raise KeyError(f"missing key in state dict: {key!r}")
        value = self._tensors[key]
        if hasattr(value, "detach"):  # torch.Tensor, without importing torch
            value = value.detach().cpu().float().numpy()
        # A copy: `Tensor.numpy()` shares the tensor's memory, and a torch model trained or
        # edited in place after conversion must not change the converted variables.
        array = np.array(value, dtype=np.float32)
        if len(array.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(array.shape, shape)
        ):
            expected = tuple("?" if s is None else s for s in shape)
            raise ValueError(f"shape mismatch for {key!r}: got {tuple(array.shape)}, "
                             f"expected {expected}")
        self._used.add(key)
        return array

    def take_count(self, key):
        """A `num_batches_tracked` counter as an int32 NumPy scalar."""
        value = self._tensors[key]
        self._used.add(key)
        return np.asarray(value.item() if hasattr(value, "item") else value, np.int32)

    def count(self, pattern):
        """Number of consecutive indices i = 0, 1, ... for which `pattern.format(i)` is a key."""
        n = 0
        while self.has(pattern.format(n)):
            n += 1
        return n

    def check_all_used(self):
        unexpected = sorted(set(self._tensors) - self._used)
        if unexpected:
            raise ValueError(f"unexpected keys in state dict: {unexpected}")


def _conv(reader, prefix, in_channels, kernel_size, out_channels=None, bias=False):
    weight = reader.take(prefix + "weight", (out_channels, in_channels, kernel_size, kernel_size))
    params = {"kernel": weight.transpose(2, 3, 1, 0)}
    if bias:
        params["bias"] = reader.take(prefix + "bias", (weight.shape[0],))
    return params, weight.shape[0]


def _linear(reader, prefix, in_features, out_features=None):
    weight = reader.take(prefix + "weight", (out_features, in_features))
    return {"kernel": weight.T, "bias": reader.take(prefix + "bias", (weight.shape[0],))}


def _batch_norm(reader, prefix, channels):
    names = ("weight", "bias", "running_mean", "running_var")
    out = {n: reader.take(prefix + n, (channels,)) for n in names}
    if reader.has(prefix + "num_batches_tracked"):  # BatchNorm2d, not FrozenBatchNorm2d
        out["num_batches_tracked"] = reader.take_count(prefix + "num_batches_tracked")
    return out


def _convert_resnet(reader, prefix):
    """ResNet body under `prefix` -> (params, batch_stats, stage output widths)."""
    params, stats = {}, {}
    params["conv1"], channels = _conv(reader, prefix + "conv1.", 3, 7)
    stats["bn1"] = _batch_norm(reader, prefix + "bn1.", channels)
    stage_widths = []
    for i in range(1, 5):
        num_blocks = reader.count(prefix + f"layer{i}.{{}}.conv1.weight")
        if num_blocks == 0:
            raise KeyError(f"missing key in state dict: {prefix + f'layer{i}.0.conv1.weight'!r}")
        # Bottleneck blocks (ResNet-50+) have a conv3; basic blocks (ResNet-18/34) do not.
        bottleneck = reader.has(prefix + f"layer{i}.0.conv3.weight")
        for j in range(num_blocks):
            block = f"layer{i}.{j}."
            bp, bs = {}, {}
            in_channels = channels
            if bottleneck:
                bp["conv1"], width = _conv(reader, prefix + block + "conv1.", in_channels, 1)
                bs["bn1"] = _batch_norm(reader, prefix + block + "bn1.", width)
                bp["conv2"], _ = _conv(reader, prefix + block + "conv2.", width, 3, width)
                bs["bn2"] = _batch_norm(reader, prefix + block + "bn2.", width)
                bp["conv3"], channels = _conv(reader, prefix + block + "conv3.", width, 1)
                bs["bn3"] = _batch_norm(reader, prefix + block + "bn3.", channels)
            else:
                bp["conv1"], channels = _conv(reader, prefix + block + "conv1.", in_channels, 3)
                bs["bn1"] = _batch_norm(reader, prefix + block + "bn1.", channels)
                bp["conv2"], _ = _conv(reader, prefix + block + "conv2.", channels, 3, channels)
                bs["bn2"] = _batch_norm(reader, prefix + block + "bn2.", channels)
            # Same rule as the Flax blocks: a projection shortcut iff the stride or width changes.
            if (i > 1 and j == 0) or in_channels != channels:
                bp["downsample_conv"], _ = _conv(
                    reader, prefix + block + "downsample.0.", in_channels, 1, channels)
                bs["downsample_bn"] = _batch_norm(reader, prefix + block + "downsample.1.",
                                                  channels)
            params[f"layer{i}_{j}"], stats[f"layer{i}_{j}"] = bp, bs
        stage_widths.append(channels)
    return params, stats, stage_widths


def _convert_fpn(reader, prefix, in_channels_list):
    """FPN under `prefix` -> (params, batch_stats, out_channels). v1: convs with bias; v2
    (`norm_layer=BatchNorm2d`): convs without bias, each followed by a norm (`{i}.1`)."""
    params, stats, out_channels = {}, {}, None
    norm = reader.has(prefix + "inner_blocks.0.1.weight")
    for kind, kernel_size in (("inner", 1), ("layer", 3)):
        for i, in_channels in enumerate(in_channels_list):
            key = f"{prefix}{kind}_blocks.{i}."
            params[f"{kind}_blocks_{i}"], out_channels = _conv(
                reader, key + "0.", in_channels if kind == "inner" else out_channels, kernel_size,
                out_channels, bias=not norm)
            if norm:
                stats[f"{kind}_bn_{i}"] = _batch_norm(reader, key + "1.", out_channels)
    return params, stats, out_channels


def resnet_to_flax(state_dict):
    """torchvision ImageNet `resnet18/34/50/101` state dict -> variables of `models.ResNet`.

    Args:
      state_dict: mapping of torch keys (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ...)
        to torch tensors or arrays. `fc.*` is ignored; a BatchNorm2d's `num_batches_tracked`
        is kept in `batch_stats`.
    Returns:
      {'params': {...}, 'batch_stats': {...}} for the matching `ResNet18/34/50/101()` module.
    """
    reader = _StateDictReader(state_dict, ignore_prefixes=("fc.",))
    params, stats, _ = _convert_resnet(reader, "")
    reader.check_all_used()
    return {"params": params, "batch_stats": stats}


def backbone_with_fpn_to_flax(state_dict):
    """torchvision `BackboneWithFPN` state dict (keys `body.*`, `fpn.*`, e.g. from
    `resnet_fpn_backbone`) -> {'params': {'backbone', 'fpn'}, 'batch_stats': {'backbone'}}
    for `models.ResNet` and `models.FeaturePyramidNetwork`."""
    reader = _StateDictReader(state_dict)
    body, stats, widths = _convert_resnet(reader, "body.")
    fpn, fpn_stats, _ = _convert_fpn(reader, "fpn.", widths)
    reader.check_all_used()
    batch_stats = {"backbone": stats, **({"fpn": fpn_stats} if fpn_stats else {})}
    return {"params": {"backbone": body, "fpn": fpn}, "batch_stats": batch_stats}


def is_v2(state_dict) -> bool:
    """Whether a torchvision Mask R-CNN state dict is `maskrcnn_resnet50_fpn_v2`'s architecture
    (a `FastRCNNConvFCHead` box head, no `fc6`) rather than v1's."""
    return ("roi_heads.box_head.fc6.weight" not in state_dict
            and "roi_heads.box_head.0.0.weight" in state_dict)


def torchvision_to_flax(state_dict, num_classes=None):
    """torchvision `maskrcnn_resnet50_fpn` (v1) or `maskrcnn_resnet50_fpn_v2` state dict ->
    Flax variables (the architecture is read from the keys, see `is_v2`).

    Args:
      state_dict: `model.state_dict()` (torch tensors) or a mapping of the same keys to arrays.
        Works for FrozenBatchNorm2d and BatchNorm2d backbones and any ResNet depth.
      num_classes: if given, the predictors must have this many classes (else inferred).
    Returns:
      {'params': {'backbone', 'fpn', 'rpn_head', 'box_head', 'box_predictor', 'mask_head',
                  'mask_predictor'},
       'batch_stats': {'backbone'} (v2 also 'fpn', 'box_head', 'mask_head')} of float32 NumPy
      arrays, for the modules `ResNet`, `FeaturePyramidNetwork`, `RPNHead`, `TwoMLPHead` (v2:
      `FastRCNNConvFCHead`), `FastRCNNPredictor`, `MaskRCNNHeads`, `MaskRCNNPredictor` bound
      under those names.
    Raises:
      KeyError naming a missing key; ValueError naming unexpected keys or a shape mismatch.
    """
    reader = _StateDictReader(state_dict)
    params, stats = {}, {}
    params["backbone"], stats["backbone"], widths = _convert_resnet(reader, "backbone.body.")
    params["fpn"], fpn_stats, channels = _convert_fpn(reader, "backbone.fpn.", widths)

    rpn = {}
    for i in range(max(reader.count("rpn.head.conv.{}.0.weight"), 1)):
        rpn["conv" if i == 0 else f"conv_{i}"], _ = _conv(
            reader, f"rpn.head.conv.{i}.0.", channels, 3, channels, bias=True)
    rpn["cls_logits"], num_anchors = _conv(reader, "rpn.head.cls_logits.", channels, 1, bias=True)
    rpn["bbox_pred"], _ = _conv(reader, "rpn.head.bbox_pred.", channels, 1, 4 * num_anchors,
                                bias=True)
    params["rpn_head"] = rpn

    if is_v2(state_dict):
        params["box_head"], box_stats, representation = _convert_conv_fc_head(
            reader, "roi_heads.box_head.", channels)
    else:
        (params["box_head"], representation), box_stats = _convert_box_head(
            reader, "roi_heads.box_head.", channels), {}
    params["box_predictor"] = {
        "cls_score": _linear(reader, "roi_heads.box_predictor.cls_score.", representation,
                             num_classes),
    }
    num_classes = params["box_predictor"]["cls_score"]["bias"].shape[0]
    params["box_predictor"]["bbox_pred"] = _linear(
        reader, "roi_heads.box_predictor.bbox_pred.", representation, 4 * num_classes)

    mask_head, mask_stats, mask_channels = {}, {}, channels
    norm = reader.has("roi_heads.mask_head.0.1.weight")
    for i in range(reader.count("roi_heads.mask_head.{}.0.weight")):
        key = f"roi_heads.mask_head.{i}."
        mask_head[f"mask_fcn{i + 1}"], mask_channels = _conv(
            reader, key + "0.", mask_channels, 3, bias=not norm)
        if norm:
            mask_stats[f"mask_bn{i + 1}"] = _batch_norm(reader, key + "1.", mask_channels)
    if not mask_head:
        raise KeyError("missing key in state dict: 'roi_heads.mask_head.0.0.weight'")
    params["mask_head"] = mask_head

    deconv = reader.take("roi_heads.mask_predictor.conv5_mask.weight", (mask_channels, None, 2, 2))
    dim_reduced = deconv.shape[1]
    logits, _ = _conv(reader, "roi_heads.mask_predictor.mask_fcn_logits.", dim_reduced, 1,
                      num_classes, bias=True)
    params["mask_predictor"] = {
        "conv5_mask": {
            "kernel": deconv.transpose(2, 3, 1, 0),
            "bias": reader.take("roi_heads.mask_predictor.conv5_mask.bias", (dim_reduced,)),
        },
        "mask_fcn_logits": logits,
    }
    reader.check_all_used()
    for name, tree in (("fpn", fpn_stats), ("box_head", box_stats), ("mask_head", mask_stats)):
        if tree:
            stats[name] = tree
    return {"params": params, "batch_stats": stats}


def _nchw_flatten_to_nhwc(weight, channels, key):
    """A Linear weight (O, C*S*S) reading torch's (c, h, w) flatten -> kernel (S*S*C, O) reading
    the NHWC (h, w, c) flatten."""
    out_features, in_features = weight.shape
    size = math.isqrt(in_features // channels)
    if size * size * channels != in_features:
        raise ValueError(f"shape mismatch for {key!r}: in_features {in_features} is not "
                         f"{channels} * S * S")
    return (weight.reshape(out_features, channels, size, size)
            .transpose(2, 3, 1, 0).reshape(in_features, out_features))


def _convert_box_head(reader, prefix, channels):
    """TwoMLPHead: permute fc6's input axis from torch's (c, h, w) flatten to NHWC (h, w, c)."""
    fc6 = reader.take(prefix + "fc6.weight", (None, None))
    out_features = fc6.shape[0]
    fc6_params = {"kernel": _nchw_flatten_to_nhwc(fc6, channels, prefix + "fc6.weight"),
                  "bias": reader.take(prefix + "fc6.bias", (out_features,))}
    fc7 = _linear(reader, prefix + "fc7.", out_features, out_features)
    return {"fc6": fc6_params, "fc7": fc7}, out_features


def _convert_conv_fc_head(reader, prefix, channels):
    """FastRCNNConvFCHead (v2): `{i}.0` conv (no bias) + `{i}.1` norm for i < n, `n` Flatten,
    then Linear + ReLU pairs at `n+1`, `n+3`, ... -> (params, batch_stats, representation)."""
    params, stats = {}, {}
    n = reader.count(prefix + "{}.0.weight")
    for i in range(n):
        params[f"conv_{i}"], channels = _conv(reader, f"{prefix}{i}.0.", channels, 3)
        stats[f"bn_{i}"] = _batch_norm(reader, f"{prefix}{i}.1.", channels)
    j, index, features = 0, n + 1, None
    while reader.has(f"{prefix}{index}.weight"):
        key = f"{prefix}{index}."
        weight = reader.take(key + "weight", (None, None if j == 0 else features))
        kernel = _nchw_flatten_to_nhwc(weight, channels, key + "weight") if j == 0 else weight.T
        features = weight.shape[0]
        params[f"fc_{j}"] = {"kernel": kernel, "bias": reader.take(key + "bias", (features,))}
        j, index = j + 1, index + 2
    if j == 0:
        raise KeyError(f"missing key in state dict: {prefix + str(n + 1) + '.weight'!r}")
    return params, stats, features


__all__ = ["backbone_with_fpn_to_flax", "is_v2", "resnet_to_flax", "torchvision_to_flax"]
