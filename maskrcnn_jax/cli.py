"""Flag parsing and start-up shared by the command-line tools (`train.py`, `eval.py`,
`predict.py`, `convert.py`).

Each tool defines its absl flags on its own `flags.FlagValues`, so that tools can be imported
and run side by side (tests, notebooks) without their flag names colliding in absl's global
registry; `train.py` keeps the global one for `ml_collections.config_flags`. Every tool turns
on JAX's persistent compilation cache (`--compilation_cache_dir`, 'none' for off); the tools
that run on devices take the same multi-process flags (`define_runtime_flags`) and start the
runtime with `start_runtime` before anything touches a device.
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


def define_runtime_flags(flag_values: flags.FlagValues = flags.FLAGS,
                         module_name: Optional[str] = None):
    """The multi-process flags (`--coordinator_address`, `--num_processes`, `--process_id`,
    `--distributed`) and `--compilation_cache_dir` on `flag_values`."""
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 for a multi-process run started "
        "by hand (with --num_processes and --process_id; every process runs the same command)",
        flag_values=flag_values, module_name=module_name)
    flags.DEFINE_integer("num_processes", None, "processes in a run started by hand",
                         lower_bound=1, flag_values=flag_values, module_name=module_name)
    flags.DEFINE_integer("process_id", None, "this process's index in a run started by hand",
                         lower_bound=0, flag_values=flag_values, module_name=module_name)
    flags.DEFINE_bool(
        "distributed", False, "multi-process run with the cluster auto-detected by "
        "jax.distributed.initialize() (Cloud TPU pod slices, SLURM, Open MPI, ...)",
        flag_values=flag_values, module_name=module_name)
    define_compilation_cache_flag(flag_values, module_name=module_name)


def start_runtime(flag_values: flags.FlagValues, program: str, auto: bool = False):
    """Turn on the compilation cache and start `jax.distributed` as the runtime flags say
    (`auto`: auto-detect even without `--distributed`). A usage error (some of the explicit
    multi-process flags without the others) exits 2 with one line."""
    from maskrcnn_jax import runtime

    enable_compilation_cache(flag_values.compilation_cache_dir)
    try:
        runtime.initialize(auto or flag_values.distributed, flag_values.coordinator_address,
                           flag_values.num_processes, flag_values.process_id)
    except ValueError as e:
        print(f"{program}: {e}: give all three flags --coordinator_address, --num_processes, "
              "--process_id, or none", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


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
