"""Shared test set-up: JAX on the CPU; session fixtures shared across test folders."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tools' default persistent compilation cache lives under the user's cache dir: keep the
# suite's in a temporary one.
# Under pytest-xdist every worker imports this file: they share one folder (named by the run's id),
# so a program compiled by one worker is read by the other.
_run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _run_id:
    os.environ["XDG_CACHE_HOME"] = os.path.join(tempfile.gettempdir(),
                                                f"maskrcnn_jax_test_cache_{_run_id}")
    os.makedirs(os.environ["XDG_CACHE_HOME"], exist_ok=True)
else:
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="maskrcnn_jax_test_cache_")
# One persistent compilation cache for the whole session, this process and every subprocess
# (train.py, workers): the same program (e.g. the tiny training step) built by several tests is
# compiled once. Set before JAX initialises, which reads these variables once.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["XDG_CACHE_HOME"], "jax")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def models():
    """(torchvision model, Predictor of its conversion, test images), built once per session
    (`maskrcnn_jax.testing.parity_model`)."""
    from maskrcnn_jax.testing import parity_model

    return parity_model.build()


@pytest.fixture(scope="session")
def models_v2():
    """The same for torchvision's `maskrcnn_resnet50_fpn_v2` (batch norm in the FPN and heads)."""
    from maskrcnn_jax.testing import parity_model

    return parity_model.build("v2")


# pytest-xdist (`-n 2 --dist loadfile`) hands whole test files to its workers in queue order,
# by default the files with the most tests first. The suite's wall time is bounded by a few long
# files with few tests (whole-network parity, multi-process and kill -9 runs): queued last, one
# of them can still run while the other worker has nothing left. Queued first (longest first,
# by their measured times), they start at once and the many short files fill in around them.
LONGEST_FILES = (
    "tests/training/test_train.py",
    "tests/distributed/test_multiprocess.py",
    "tests/training/test_recipes.py",
    "tests/training/test_losses.py",
    "tests/training/test_gradient_parity.py",
    "tests/torchvision/test_cli.py",
    "tests/training/test_finetune.py",
    "tests/models/test_maskrcnn_parity.py",
    "tests/training/test_batch_norm_parity.py",
    "tests/distributed/test_sharded_inference.py",
    "tests/inference/test_evaluation.py",
    "tests/cli/test_eval_bad_input.py",
    "tests/inference/test_predict.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's "most tests first"
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
