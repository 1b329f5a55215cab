"""Importing maskrcnn_jax or a command-line tool starts no JAX backend: `jax.distributed` must
be able to start after the imports (a module-level device array would make the README's
multi-process launches exit at start-up)."""

import subprocess
import sys

from maskrcnn_jax.testing.multiprocess import REPO

_IMPORT_ALL = """
import importlib, os, pkgutil, sys
sys.path.insert(0, {repo!r})
import maskrcnn_jax
from jax._src import xla_bridge

names = [m.name for m in pkgutil.walk_packages(maskrcnn_jax.__path__, "maskrcnn_jax.")]
names += ["train", "eval", "predict", "convert"] + sorted(
    "configs." + f[:-3] for f in os.listdir(os.path.join({repo!r}, "configs"))
    if f.endswith(".py") and f != "__init__.py")
for name in names:
    importlib.import_module(name)
    assert not xla_bridge.backends_are_initialized(), "importing " + name + " started a backend"
print("imported", len(names))
"""


def test_importing_starts_no_backend():
    out = subprocess.run([sys.executable, "-c", _IMPORT_ALL.format(repo=REPO)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count = int(out.stdout.split("imported")[-1])
    assert count > 60, out.stdout  # every module of the package, not a vacuous loop


def test_the_check_can_fail():
    """A module-level device array is what the test above must catch."""
    code = ("from jax._src import xla_bridge\nimport jax.numpy as jnp\nx = jnp.zeros(2)\n"
            "assert not xla_bridge.backends_are_initialized()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "AssertionError" in out.stderr
