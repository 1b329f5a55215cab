"""XLA CPU settings maskrcnn_jax makes its default, set in `XLA_FLAGS` when maskrcnn_jax is
imported (before JAX starts its CPU backend, which reads `XLA_FLAGS` once).

`--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions). This jaxlib sends
convolutions and dots to YNNPACK by default; XLA's own (Eigen) kernels are faster on R50-FPN at
torchvision's 800 px, above all on the 1x1 convolutions at large feature maps, and so are the
Predictor, eval.py and the training step built on them (BENCHMARKS.md: "Convolutions of R50-FPN
at 800x1088" per convolution, "800-pixel paths with and without YNNPACK" end to end). Without
YNNPACK, XLA has no float64 convolution kernel on the CPU: `ops.conv.conv_nhwc` runs float64 as
matmuls. It applies to the CPU backend only.

Switch it off with `MASKRCNN_JAX_XLA_CPU_DEFAULTS=0` in the environment; a value of the flag in
your own `XLA_FLAGS` is kept as it is. Importing maskrcnn_jax after JAX's CPU backend has started
(an array already created) leaves the backend as it was started. The command-line tools,
`Predictor` and the tests get it through the import.
"""

import os

FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
SWITCH = "MASKRCNN_JAX_XLA_CPU_DEFAULTS"


def apply(environ=os.environ) -> tuple:
    """Add each of `FLAGS` that `XLA_FLAGS` does not set already; returns the flags added."""
    if environ.get(SWITCH, "1") == "0":
        return ()
    current = environ.get("XLA_FLAGS", "")
    added = tuple(f for f in FLAGS if f.split("=")[0] not in current)
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


APPLIED = apply()
