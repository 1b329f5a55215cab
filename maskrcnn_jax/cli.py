"""Flag parsing shared by the command-line tools (`predict.py`, `eval.py`, `convert.py`).

Each tool defines its absl flags on its own `flags.FlagValues`, so that tools can be imported
and run side by side (tests, notebooks) without their flag names colliding in absl's global
registry; `train.py` keeps the global one for `ml_collections.config_flags`. Every tool turns
on JAX's persistent compilation cache (`--compilation_cache_dir`, 'none' for off).
"""

import os
import sys
import textwrap
from typing import Optional, Sequence

from absl import flags


def parse(flag_values: flags.FlagValues, argv: Optional[Sequence[str]], doc: str,
          program: str) -> list[str]:
    """Parse `argv` (without the program name; None: `sys.argv[1:]`) into `flag_values`.

    Returns the positional arguments. `--help` prints `doc` and every flag's help, then exits
    0; an unknown flag or a bad value exits 2 with the message and a pointer to `--help`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in argv):
        print(textwrap.dedent(doc).strip() + "\n\nflags:\n" + flag_values.get_help(), flush=True)
        raise SystemExit(0)
    flag_values.unparse_flags()
    try:
        return flag_values([program, *argv])[1:]
    except flags.Error as e:
        print(f"{program}: {e}\nsee {program} --help", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/maskrcnn_jax/jax_compilation` (else `~/.cache/...`)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "maskrcnn_jax", "jax_compilation")


def define_compilation_cache_flag(flag_values: flags.FlagValues = flags.FLAGS,
                                  module_name: Optional[str] = None):
    """`--compilation_cache_dir` on `flag_values`; `module_name`: the tool whose `--help` lists
    it (absl lists a module's own flags)."""
    flags.DEFINE_string(
        "compilation_cache_dir", default_cache_dir(),
        "JAX's persistent compilation cache (and predict.py's exported networks): a later run "
        "of the same shapes loads its programs instead of tracing and compiling them again; "
        "'none' turns it off", flag_values=flag_values,
        module_name=module_name)


def enable_compilation_cache(directory: Optional[str]):
    """Turn on JAX's persistent compilation cache in `directory` (None, '' or 'none': off).
    Programs that took at least a second to compile are cached."""
    if not directory or directory.lower() == "none":
        return
    import jax

    directory = os.path.expanduser(directory)
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
