"""Make torchvision importable on the CPU-only torch build (test-only helper).

torchvision 0.28.0's wheel ships C++ ops compiled against CUDA; on the CPU torch build they
do not load and `import torchvision` fails when it registers fake kernels for
`torchvision::nms`. This module, imported before torchvision:

* defines the `torchvision::nms` / `torchvision::qnms` schemas with `torch.library` and gives
  `nms` a pure-torch CPU kernel with the C++ kernel's semantics (stable descending sort by
  score, suppress IoU > threshold, areas and intersections with the same arithmetic);
* replaces torchvision's pure-PyTorch RoIAlign (`torchvision.ops.roi_align._roi_align`, which
  torchvision itself falls back to when its ops are missing) by the same code, uncompiled, with
  the adaptive (`sampling_ratio <= 0`) sampling grid bounded by the largest per-RoI grid
  instead of the whole feature map (the original samples every pixel and runs out of memory).

Known difference kept on purpose: the pure-PyTorch path does not zero samples that fall more
than one pixel outside the feature map as the C++ kernel does; tests of that edge use a NumPy
loop of the C++ semantics instead (`tests/ops/reference.py`).

Usage: `from tests.torchvision_cpu import torchvision` (or just import this module first).
"""

import sys

import torch

_LIB = None


def _nms_kernel(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS, a transcription of torchvision/csrc/ops/cpu/nms_kernel.cpp."""
    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores, descending=True, stable=True).indices
    n = dets.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    # Vectorized over the candidates of each kept box; same arithmetic as the C++ loop.
    for _i in range(n):
        i = order[_i]
        if suppressed[i]:
            continue
        keep.append(int(i))
        rest = order[_i + 1:]
        xx1 = torch.maximum(x1[i], x1[rest])
        yy1 = torch.maximum(y1[i], y1[rest])
        xx2 = torch.minimum(x2[i], x2[rest])
        yy2 = torch.minimum(y2[i], y2[rest])
        w = torch.clamp(xx2 - xx1, min=0)
        h = torch.clamp(yy2 - yy1, min=0)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr > iou_threshold]] = True
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def _define_ops() -> None:
    global _LIB
    try:
        torch.ops.torchvision.nms.default  # already defined (real extension or earlier call)
        return
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.impl("nms", _nms_kernel, "CPU")


def _roi_align_bounded(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    """torchvision's pure-PyTorch `_roi_align` with the adaptive grid bounded (see module doc)."""
    from torchvision.ops.roi_align import _bilinear_interpolate

    orig_dtype = input.dtype
    ph = torch.arange(pooled_height, device=input.device)
    pw = torch.arange(pooled_width, device=input.device)
    roi_batch_ind = rois[:, 0].int()
    offset = 0.5 if aligned else 0.0
    roi_start_w = rois[:, 1] * spatial_scale - offset
    roi_start_h = rois[:, 2] * spatial_scale - offset
    roi_end_w = rois[:, 3] * spatial_scale - offset
    roi_end_h = rois[:, 4] * spatial_scale - offset
    roi_width = roi_end_w - roi_start_w
    roi_height = roi_end_h - roi_start_h
    if not aligned:
        roi_width = torch.clamp(roi_width, min=1.0)
        roi_height = torch.clamp(roi_height, min=1.0)
    bin_size_h = roi_height / pooled_height
    bin_size_w = roi_width / pooled_width
    exact_sampling = sampling_ratio > 0
    roi_bin_grid_h = sampling_ratio if exact_sampling else torch.ceil(roi_height / pooled_height)
    roi_bin_grid_w = sampling_ratio if exact_sampling else torch.ceil(roi_width / pooled_width)
    if exact_sampling:
        count = max(roi_bin_grid_h * roi_bin_grid_w, 1)
        iy = torch.arange(roi_bin_grid_h, device=input.device)
        ix = torch.arange(roi_bin_grid_w, device=input.device)
        ymask = xmask = None
    else:
        count = torch.clamp(roi_bin_grid_h * roi_bin_grid_w, min=1)
        # The only change from torchvision: a grid as large as the largest RoI needs,
        # not as large as the feature map.
        max_h = max(int(roi_bin_grid_h.max().item()) if rois.shape[0] else 1, 1)
        max_w = max(int(roi_bin_grid_w.max().item()) if rois.shape[0] else 1, 1)
        iy = torch.arange(max_h, device=input.device)
        ix = torch.arange(max_w, device=input.device)
        ymask = iy[None, :] < roi_bin_grid_h[:, None]
        xmask = ix[None, :] < roi_bin_grid_w[:, None]

    def from_k(t):
        return t[:, None, None]

    y = (from_k(roi_start_h) + ph[None, :, None] * from_k(bin_size_h)
         + (iy[None, None, :] + 0.5).to(input.dtype) * from_k(bin_size_h / roi_bin_grid_h))
    x = (from_k(roi_start_w) + pw[None, :, None] * from_k(bin_size_w)
         + (ix[None, None, :] + 0.5).to(input.dtype) * from_k(bin_size_w / roi_bin_grid_w))
    val = _bilinear_interpolate(input, roi_batch_ind, y, x, ymask, xmask)
    if not exact_sampling:
        val = torch.where(ymask[:, None, None, None, :, None], val, 0)
        val = torch.where(xmask[:, None, None, None, None, :], val, 0)
    output = val.sum((-1, -2))
    if isinstance(count, torch.Tensor):
        output /= count[:, None, None, None]
    else:
        output /= count
    return output.to(orig_dtype)


_define_ops()

import torchvision  # noqa: E402
import torchvision.ops.boxes  # noqa: E402
import torchvision.ops.roi_align  # noqa: E402

torchvision.ops.boxes._assert_has_ops = lambda: None
# `torchvision.ops.roi_align` is the re-exported function; patch the module it lives in.
sys.modules["torchvision.ops.roi_align"]._roi_align = _roi_align_bounded

__all__ = ["torchvision"]
