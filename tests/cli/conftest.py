"""Fixtures the bad-input tests of the command-line tools share: a tiny converted checkpoint
(random weights, `maskrcnn_jax.testing.tiny`) and a runner of a tool as its own process (what a
user sees: the exit status and every line on stderr, noise at interpreter exit included)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A converted checkpoint (`convert.py`'s format) of the tiny 3-class model."""
    from maskrcnn_jax import checkpoints
    from maskrcnn_jax.testing.tiny import tiny_model

    directory = tmp_path_factory.mktemp("tiny_ckpt")
    config, variables = tiny_model()
    checkpoints.save_converted(directory, config, variables)
    return str(directory)


def run_tool(*argv, timeout=300):
    """`python <tool> <args>` from the repository root; the CompletedProcess (text output).
    The session's compilation cache (tests/conftest.py) comes through the environment."""
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, code, program, *fragments, alone=True):
    """Exit status `code`; stderr holds one line `<program>: ...` with every fragment and no
    traceback (nor Orbax's or asyncio's at interpreter exit); `alone`: nothing else either (an
    error found before start-up, with no log lines before it)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    for noise in ("Traceback", "Event loop is closed", "sys.meta_path is None"):
        assert noise not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith(f"{program}: ")]
    assert len(errors) == 1, lines
    if alone:
        assert lines == errors, lines
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]
