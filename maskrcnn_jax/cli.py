"""Flag parsing and start-up shared by the command-line tools (`train.py`, `eval.py`,
`predict.py`, `convert.py`).

Each tool defines its absl flags on its own `flags.FlagValues`, so that tools can be imported
and run side by side (tests, notebooks) without their flag names colliding in absl's global
registry; `train.py` keeps the global one for `ml_collections.config_flags`. Every tool turns
on JAX's persistent compilation cache (`--compilation_cache_dir`, 'none' for off); the tools
that run on devices take the same multi-process flags (`define_runtime_flags`) and start the
runtime with `start_runtime` before anything touches a device.

Errors a user can fix are one line on stderr, `<program>: <message>`, naming the flag, key, file
or image (`reporting`): exit status 2 for a usage error (a bad flag, config value or output
folder: `errors.UsageError`), 1 for a run that failed on its input (a checkpoint, data set or
image that cannot be used: `errors.InputError`, a non-finite loss). Any other exception is an
internal error and keeps its traceback; `--verbose` shows the traceback of every error.
"""

import contextlib
import os
import re
import sys
import textwrap
import traceback
from typing import Optional, Sequence

from absl import flags

from maskrcnn_jax import errors

USAGE_ERROR = 2
RUN_FAILED = 1


class Exit(SystemExit):
    """Ends a tool with `code` after its one-line `message` was printed to stderr; `str()` is
    the message (what tests match)."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self):
        return self.message


def fail(program: str, message: str, code: int = USAGE_ERROR):
    """Print `<program>: <message>` on stderr as one line (a message's own lines, such as a
    list of differing keys, joined by '; ') and raise `Exit(code)`."""
    parts = [line.strip() for line in str(message).splitlines() if line.strip()] or [""]
    message = parts[0]
    for part in parts[1:]:  # 'differs in:\n  a: ...\n  b: ...' -> 'differs in: a: ...; b: ...'
        message += (" " if message.endswith(":") else "; ") + part
    print(f"{program}: {message}", file=sys.stderr, flush=True)
    raise Exit(code, message)


# Errors of a run on its input (a checkpoint, data set, image; a diverged loss): exit 1.
_RUN_ERRORS = (errors.InputError, FloatingPointError)


@contextlib.contextmanager
def reporting(program: str, verbose: bool = False):
    """Reports the errors a user can fix in one line and exits (`fail`): `errors.UsageError`
    with status 2; `errors.InputError` (a checkpoint, data set or image; the COCO reader's
    `CocoFormatError` is one) and FloatingPointError (a diverged training run) with 1. With
    `verbose` their traceback is printed first. Other exceptions pass through with their
    traceback."""
    try:
        yield
    except errors.UsageError as e:
        _report(program, e, USAGE_ERROR, verbose)
    except _RUN_ERRORS as e:
        _report(program, e, RUN_FAILED, verbose)


def _report(program, error, code, verbose):
    if verbose:
        traceback.print_exc()
    fail(program, str(error), code)


def parse(flag_values: flags.FlagValues, argv: Optional[Sequence[str]], doc: str,
          program: str) -> list[str]:
    """Parse `argv` (without the program name; None: `sys.argv[1:]`) into `flag_values`.

    Returns the positional arguments. `--help` prints `doc` and every flag's help, then exits
    0; an unknown flag, a bad value, an unknown config key or a config file that does not load
    (`ml_collections.config_flags`) exits 2 with one line naming it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in argv):
        print(textwrap.dedent(doc).strip() + "\n\nflags:\n" + _flags_help(flag_values, program),
              flush=True)
        raise SystemExit(0)
    flag_values.unparse_flags()
    try:
        return flag_values([program, *argv])[1:]
    except flags.Error as e:
        fail(program, f"{_without_traceback(str(e))} (see {program} --help)")
    except (AttributeError, KeyError) as e:  # config_flags: an override of an unknown key
        fail(program, _unknown_config_key(e, argv))
    except OSError as e:  # config_flags: the config file does not load
        fail(program, "--config: cannot load: " + " ".join(str(e).split("\n")[-1].split()))


def _without_traceback(text: str) -> str:
    """config_flags puts the traceback of a config file's `get_config` into its message: keep
    what precedes it and the exception's own last line."""
    if "Traceback (most recent call last)" not in text:
        return text
    head = text.split("Traceback (most recent call last)")[0].strip()
    return f"{head} {[line for line in text.splitlines() if line.strip()][-1].strip()}"


def config_flag_value(flag_values: flags.FlagValues, name: str = "config"):
    """The value of an `ml_collections` config flag; a config file that failed to load
    (config_flags defers that error to the value's first use) is a UsageError naming it."""
    value = flag_values[name].value
    try:
        value.keys()
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise errors.UsageError(f"--{name}: cannot load: {lines[-1] if lines else e}") from None
    return value


def _flags_help(flag_values: flags.FlagValues, program: str) -> str:
    """The help of the tool's own flags (absl's global registry also holds every library's)."""
    if flag_values is flags.FLAGS:
        return flag_values.main_module_help() if program.endswith(".py") else ""
    return flag_values.get_help()


def _unknown_config_key(error: Exception, argv: Sequence[str]) -> str:
    """One line for config_flags' error on `--config.a.b=v` with an unknown key: the argument,
    the key and ml_collections' suggestion."""
    text = str(error).replace("\\n", " ").replace("\\'", "'")
    key = next(iter(re.findall(r"'(\w+)'", text)), None)
    suggestion = re.search(r'Did you mean "(\w+)"', text)
    argument = next((a.split("=")[0] for a in argv
                     if key and re.match(rf"--\w+(\.\w+)*\.{re.escape(key)}(=|$)", a)), None)
    message = f"{argument or 'a --config override'}: unknown config key {key!r}"
    if suggestion:
        message += f" (did you mean {suggestion.group(1)!r}?)"
    return message


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


def define_verbose_flag(flag_values: flags.FlagValues = flags.FLAGS,
                        module_name: Optional[str] = None):
    """`--verbose`: show the traceback of an error reported in one line (`reporting`)."""
    flags.DEFINE_bool("verbose", False, "print the traceback of an error, not only its "
                      "one-line message", flag_values=flag_values, module_name=module_name)


def define_runtime_flags(flag_values: flags.FlagValues = flags.FLAGS,
                         module_name: Optional[str] = None):
    """The multi-process flags (`--coordinator_address`, `--num_processes`, `--process_id`,
    `--distributed`), `--compilation_cache_dir` and `--verbose` on `flag_values`."""
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
    define_verbose_flag(flag_values, module_name=module_name)


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
        fail(program, f"{e}: give all three flags --coordinator_address, --num_processes, "
             "--process_id, or none")


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
