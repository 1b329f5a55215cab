"""The convolutions of R50-FPN at 800x1088: maskrcnn_jax (XLA) vs torch (oneDNN), one row per
distinct shape, forward, input gradient and kernel gradient, in the same run.

    python bench/conv.py [--batch 1] [--size 800x1088] [--formulation model] [--repeats 3]
                         [--only NAME ...] [--threads N]
    MASKRCNN_JAX_XLA_CPU_DEFAULTS=0 python bench/conv.py   # jaxlib's XLA CPU path (YNNPACK)
    XLA_FLAGS=--xla_cpu_experimental_xnn_fusion_type=dot python bench/conv.py   # another one

Shapes: torchvision's `maskrcnn_resnet50_fpn` on one 800x1088 canvas (its padded batch for a
800x1066 image; maskrcnn_jax's default 800x1088 bucket): the stem 7x7/2, each ResNet-50
bottleneck 1x1 / 3x3 / 1x1 per stage (the first block's separately: other input width, the
stride-2 3x3, the stride-2 1x1 downsample), the FPN's inner 1x1 and output 3x3 at each level,
the RPN head's 3x3 and its 1x1 class / box convolutions at each of the 5 levels, and the mask
head's 3x3 at 14x14 on 100 RoIs (the Predictor's 100 detections). `count` is how often the
network runs the shape.

Directions, each timed alone (median of --repeats after a warm-up):
  fwd:   y = conv(x, w)
  dgrad: dx from dy (the transposed convolution), for layers whose input needs a gradient in
         training with stem + layer1 frozen (torchvision's trainable_backbone_layers=3)
  wgrad: dw from x and dy, for trained layers
maskrcnn_jax computes them as the model does (`--formulation model`: `ops.conv.conv_nhwc`,
XLA's convolution forward, transposed convolution for dgrad, kh x kw matmuls for wgrad), or:
  xla:     `lax.conv_general_dilated` and XLA's own gradients;
  nchw:    the same on NCHW / OIHW arrays (torch's layout);
  matmul:  every convolution as matmuls: 1x1 as one dot, kxk as im2col (patches stacked on the
           channel axis) + one dot; gradients by autodiff of that.
torch: `torch.nn.functional.conv2d` on NCHW float32 (what torchvision runs) and
`torch.ops.aten.convolution_backward` with one output each (what autograd calls).

Prints each row's time, GFLOP/s (2 x multiply-adds / time) and the ratio torch time / jax time
(> 1: maskrcnn_jax faster), then the totals weighted by `count`: inference (fwd of all) and
training (fwd + dgrad + wgrad where training needs them). XLA_FLAGS is printed (importing
maskrcnn_jax adds its default, `maskrcnn_jax.xla_cpu`): run once per XLA CPU path to compare
them (each needs a fresh process).
"""

import argparse
import os
import sys

from timing import THREADS_HELP, header, median_seconds, pin_threads  # noqa: E402

THREADS = pin_threads()

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def r50_fpn_convs(h: int, w: int, rois: int = 100):
    """(name, count, (H, W) input size, cin, cout, k, stride, batch override, trained, dgrad)
    of R50-FPN on an h x w canvas (h, w divisible by 32)."""
    rows = [("stem 7x7/2", 1, (h, w), 3, 64, 7, 2, None, False, False)]
    s = (h // 4, w // 4)
    rows += [("layer1 1x1 64>64 first", 1, s, 64, 64, 1, 1, None, False, False),
             ("layer1 1x1 256>64", 2, s, 256, 64, 1, 1, None, False, False),
             ("layer1 3x3 64", 3, s, 64, 64, 3, 1, None, False, False),
             ("layer1 1x1 64>256", 3, s, 64, 256, 1, 1, None, False, False),
             ("layer1 down 1x1 64>256", 1, s, 64, 256, 1, 1, None, False, False)]
    blocks = {2: 4, 3: 6, 4: 3}
    for stage, n in blocks.items():
        width, cin = 64 * 2 ** (stage - 1), 64 * 2 ** stage
        big, small = s, (s[0] // 2, s[1] // 2)
        rows += [
            (f"layer{stage} 1x1 {cin}>{width} first", 1, big, cin, width, 1, 1, None, True,
             stage > 2),
            (f"layer{stage} 3x3/2 {width}", 1, big, width, width, 3, 2, None, True, True),
            (f"layer{stage} 1x1 {width}>{4 * width}", n, small, width, 4 * width, 1, 1, None,
             True, True),
            (f"layer{stage} down 1x1/2 {cin}>{4 * width}", 1, big, cin, 4 * width, 1, 2, None,
             True, stage > 2),
            (f"layer{stage} 1x1 {4 * width}>{width}", n - 1, small, 4 * width, width, 1, 1, None,
             True, True),
            (f"layer{stage} 3x3 {width}", n - 1, small, width, width, 3, 1, None, True, True)]
        s = small
    levels = [(h // 2 ** k, w // 2 ** k) for k in (2, 3, 4, 5)]
    for k, (size, cin) in enumerate(zip(levels, (256, 512, 1024, 2048))):
        rows += [(f"fpn P{k + 2} inner 1x1 {cin}>256", 1, size, cin, 256, 1, 1, None, True, True),
                 (f"fpn P{k + 2} out 3x3 256", 1, size, 256, 256, 3, 1, None, True, True)]
    p6 = (-(-levels[-1][0] // 2), -(-levels[-1][1] // 2))
    for k, size in enumerate(levels + [p6]):
        rows += [(f"rpn P{k + 2} 3x3 256", 1, size, 256, 256, 3, 1, None, True, True),
                 (f"rpn P{k + 2} cls+box 1x1 256>3,12", 1, size, 256, 15, 1, 1, None, True,
                  True)]
    rows.append(("mask head 3x3 256 (100 RoIs)", 4, (14, 14), 256, 256, 3, 1, rois, True, True))
    return rows


def output_size(size, k, stride):
    pad = k // 2
    return tuple((n + 2 * pad - k) // stride + 1 for n in size)


def gflop(batch, size, cin, cout, k, stride):
    ho, wo = output_size(size, k, stride)
    return 2.0 * batch * ho * wo * cin * cout * k * k / 1e9


def jax_functions(formulation, k, stride):
    """Jitted fwd(x, w), dgrad(x, w, g), wgrad(x, w, g) on NHWC / HWIO."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from maskrcnn_jax.ops.conv import conv_nhwc

    pad = ((k // 2, k // 2), (k // 2, k // 2))
    dn = ("NHWC", "HWIO", "NHWC")
    if formulation == "model":
        def conv(x, w):
            return conv_nhwc(x, w, (stride, stride), pad, dimension_numbers=dn)
    elif formulation == "xla":
        def conv(x, w):
            return lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=dn)
    elif formulation == "nchw":  # torch's layout inside XLA (transposes outside the timing)
        def conv(x, w):
            return lax.conv_general_dilated(x, w, (stride, stride), pad,
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))
    else:  # matmul: 1x1 as a dot, kxk as im2col + dot
        def conv(x, w):
            if k == 1:
                return jnp.einsum("nhwc,co->nhwo", x[:, ::stride, ::stride], w[0, 0])
            n, hh, ww, c = x.shape
            ho, wo = (hh + 2 * (k // 2) - k) // stride + 1, (ww + 2 * (k // 2) - k) // stride + 1
            xp = jnp.pad(x, ((0, 0), *pad, (0, 0)))
            patches = jnp.concatenate(
                [lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1,
                                              j + stride * (wo - 1) + 1, c), (1, stride, stride, 1))
                 for i in range(k) for j in range(k)], axis=-1)
            return jnp.einsum("nhwk,ko->nhwo", patches, w.reshape(k * k * c, -1))

    fwd = jax.jit(conv)
    dgrad = jax.jit(lambda x, w, g: jax.vjp(lambda v: conv(v, w), x)[1](g)[0])
    wgrad = jax.jit(lambda x, w, g: jax.vjp(lambda v: conv(x, v), w)[1](g)[0])
    return fwd, dgrad, wgrad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", default="800x1088", help="canvas HxW (multiples of 32)")
    parser.add_argument("--formulation", choices=["model", "xla", "nchw", "matmul"], default="model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None,
                        help="rows whose name contains one of these strings")
    parser.add_argument("--no-torch", action="store_true", help="maskrcnn_jax side only")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = parser.parse_args(argv)

    import jax
    import torch

    from maskrcnn_jax.testing import import_torchvision

    header(THREADS, torch, import_torchvision(), jax, "cpu")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; formulation {args.formulation}; "
          f"canvas {args.size}, batch {args.batch}; median of {args.repeats}", flush=True)
    h, w = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    rows = [r for r in r50_fpn_convs(h, w)
            if not args.only or any(s in r[0] for s in args.only)]
    print(f"{'convolution':<34}{'n':>3}{'GFLOP':>7} | {'jax ms fwd/dgrad/wgrad':>24} | "
          f"{'torch ms fwd/dgrad/wgrad':>24} | {'jax GFLOP/s':>17} | {'torch GFLOP/s':>17} | "
          f"{'ratio':>17}")
    totals = {"jax": {"inference": 0.0, "training": 0.0},
              "torch": {"inference": 0.0, "training": 0.0}}
    table = []
    for name, count, size, cin, cout, k, stride, batch, trained, needs_dgrad in rows:
        batch = batch or args.batch
        ho, wo = output_size(size, k, stride)
        x = rng.standard_normal((batch, *size, cin), np.float32)
        wt = (rng.standard_normal((k, k, cin, cout), np.float32)
              / np.float32(np.sqrt(k * k * cin)))
        g = rng.standard_normal((batch, ho, wo, cout), np.float32)
        fwd, dgrad, wgrad = jax_functions(args.formulation, k, stride)
        layout = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)) if args.formulation == "nchw" else None
        xj, wj, gj = (jax.device_put(np.ascontiguousarray(a.transpose(t)) if layout else a)
                      for a, t in zip((x, wt, g), layout or (None,) * 3))
        directions = {"fwd": True, "dgrad": needs_dgrad, "wgrad": trained}
        jax_ms = {
            "fwd": median_seconds(lambda: fwd(xj, wj).block_until_ready(), args.repeats),
            "dgrad": median_seconds(lambda: dgrad(xj, wj, gj).block_until_ready(), args.repeats)
            if needs_dgrad else np.nan,
            "wgrad": median_seconds(lambda: wgrad(xj, wj, gj).block_until_ready(), args.repeats)
            if trained else np.nan}
        torch_ms = {d: np.nan for d in directions}
        if not args.no_torch:
            xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            wtt = torch.from_numpy(np.ascontiguousarray(wt.transpose(3, 2, 0, 1)))
            gt = torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2)))
            st, pd = [stride, stride], [k // 2, k // 2]

            def backward(mask):
                return torch.ops.aten.convolution_backward(
                    gt, xt, wtt, None, st, pd, [1, 1], False, [0, 0], 1, mask)

            with torch.no_grad():
                torch_ms["fwd"] = median_seconds(
                    lambda: torch.nn.functional.conv2d(xt, wtt, None, st, pd), args.repeats)
                if needs_dgrad:
                    torch_ms["dgrad"] = median_seconds(lambda: backward([True, False, False]),
                                                       args.repeats)
                if trained:
                    torch_ms["wgrad"] = median_seconds(lambda: backward([False, True, False]),
                                                       args.repeats)
        jax_ms = {d: 1e3 * v for d, v in jax_ms.items()}
        torch_ms = {d: 1e3 * v for d, v in torch_ms.items()}
        flop = gflop(batch, size, cin, cout, k, stride)
        for side, ms in (("jax", jax_ms), ("torch", torch_ms)):
            totals[side]["inference"] += count * ms["fwd"]
            totals[side]["training"] += count * sum(ms[d] for d, on in directions.items() if on)

        def triple(values, fmt):
            return "/".join(("-" if np.isnan(v) else format(v, fmt)) for v in values)

        jt = [jax_ms[d] for d in directions]
        tt = [torch_ms[d] for d in directions]
        print(f"{name:<34}{count:>3}{flop:>7.2f} | {triple(jt, '.1f'):>24} | "
              f"{triple(tt, '.1f'):>24} | {triple([flop / v * 1e3 for v in jt], '.0f'):>17} | "
              f"{triple([flop / v * 1e3 for v in tt], '.0f'):>17} | "
              f"{triple([b / a for a, b in zip(jt, tt)], '.2f'):>17}", flush=True)
        table.append((name, count, flop, jt, tt))
    print("\ntotals weighted by count (ms): inference = every fwd; training = fwd + the dgrad / "
          "wgrad training needs")
    for kind in ("inference", "training"):
        j, t = totals["jax"][kind], totals["torch"][kind]
        ratio = f"{t / j:.2f}" if not args.no_torch else "-"
        print(f"  {kind:<10} jax {j:9.0f}   torch {t:9.0f}   ratio torch/jax {ratio}")
    if not args.no_torch:
        print("\nwhere the training gap is (count x (jax - torch) ms, largest first):")
        gaps = sorted(((count * np.nansum(np.subtract(jt, tt)), name)
                       for name, count, _, jt, tt in table), reverse=True)
        for gap, name in gaps[:8]:
            print(f"  {name:<34}{gap:+9.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
