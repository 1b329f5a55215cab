"""Independent float64 NumPy references (loops written from the reference kernels' source) that
tests compare maskrcnn_jax's vectorized ops with, where torchvision cannot be called directly."""

import math

import numpy as np


def numpy_roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    """float64 loop of the C++ CPU kernel. features (H, W, C), boxes (R, 4) -> (R, oh, ow, C)."""
    f32 = np.float32
    height, width, channels = features.shape
    oh, ow = output_size
    feats = features.astype(np.float64)
    out = np.zeros((len(boxes), oh, ow, channels))
    offset = f32(0.5 if aligned else 0.0)
    for r, box in enumerate(boxes.astype(np.float32)):
        sx, sy, ex, ey = (c * f32(spatial_scale) - offset for c in box)
        roi_w, roi_h = ex - sx, ey - sy
        if not aligned:
            roi_w, roi_h = max(roi_w, f32(1.0)), max(roi_h, f32(1.0))
        bin_h, bin_w = f32(roi_h / f32(oh)), f32(roi_w / f32(ow))
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_h / f32(oh)))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_w / f32(ow)))
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                acc = np.zeros(channels)
                for iy in range(gh):
                    y = f32(sy + f32(ph) * bin_h + f32(f32(iy + 0.5) * bin_h) / f32(gh))
                    for ix in range(gw):
                        x = f32(sx + f32(pw) * bin_w + f32(f32(ix + 0.5) * bin_w) / f32(gw))
                        if y < -1.0 or y > height or x < -1.0 or x > width:
                            continue
                        yy, xx = max(float(y), 0.0), max(float(x), 0.0)
                        y_lo, x_lo = int(yy), int(xx)
                        if y_lo >= height - 1:
                            y_lo = y_hi = height - 1
                            yy = float(y_lo)
                        else:
                            y_hi = y_lo + 1
                        if x_lo >= width - 1:
                            x_lo = x_hi = width - 1
                            xx = float(x_lo)
                        else:
                            x_hi = x_lo + 1
                        ly, lx = yy - y_lo, xx - x_lo
                        hy, hx = 1.0 - ly, 1.0 - lx
                        acc += (hy * hx * feats[y_lo, x_lo] + hy * lx * feats[y_lo, x_hi]
                                + ly * hx * feats[y_hi, x_lo] + ly * lx * feats[y_hi, x_hi])
                out[r, ph, pw] = acc / count
    return out
