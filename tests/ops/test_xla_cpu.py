"""maskrcnn_jax's XLA CPU default (`maskrcnn_jax.xla_cpu`): importing the package before JAX
starts routes convolutions to XLA's own kernels instead of YNNPACK; the switch and a user's own
flag value turn it off. Each case runs in a fresh process (XLA reads XLA_FLAGS once)."""

import os
import subprocess
import sys

import pytest

_PROGRAM = """
import maskrcnn_jax, os
import jax, jax.numpy as jnp
from maskrcnn_jax.ops.conv import conv_nhwc
x, w = jnp.ones((1, 64, 64, 64)), jnp.ones((3, 3, 64, 64))
hlo = jax.jit(lambda x, w: conv_nhwc(x, w, (1, 1), ((1, 1), (1, 1)),
              dimension_numbers=("NHWC", "HWIO", "NHWC"))).lower(x, w).compile().as_text()
print("YNN" if "ynn_fusion" in hlo else "XLA", os.environ.get("XLA_FLAGS", ""))
"""


def _run(**env):
    environ = {k: v for k, v in os.environ.items()
               if k not in ("XLA_FLAGS", "MASKRCNN_JAX_XLA_CPU_DEFAULTS")}
    environ.update(JAX_PLATFORMS="cpu", **env)
    out = subprocess.run([sys.executable, "-c", _PROGRAM], env=environ, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[0], out.stdout.strip()


@pytest.mark.parametrize("env, expected", [
    ({}, "XLA"),  # the default: no YNNPACK fusion
    ({"MASKRCNN_JAX_XLA_CPU_DEFAULTS": "0"}, "YNN"),  # switched off: jaxlib's own default
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}, "YNN"),
])
def test_convolution_path(env, expected):
    path, line = _run(**env)
    assert path == expected, line


def test_user_flags_kept():
    _, line = _run(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert "--xla_force_host_platform_device_count=2" in line
    assert "--xla_cpu_experimental_ynn_fusion_type=" in line
