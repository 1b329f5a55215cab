"""Run a command as N JAX processes on this machine (tests and benchmarks), and the README's
multi-process commands.

    logs = run_processes(["{python}", "train.py", "--process_id={process_id}",
                          "--coordinator_address=localhost:{port}", ...], num_processes=2,
                         devices_per_process=2, timeout=300, log_dir=tmp_path)

Each process gets `--xla_force_host_platform_device_count=devices_per_process` CPU devices; in
its argv, `{process_id}`, `{port}` (a free port, the same for all) and `{python}` (this
interpreter) are filled in. Everything is bounded in time: when one process fails the others
are killed at once (a survivor would wait in a collective for its peer), and when the deadline
passes all are killed; either way `ProcessGroupError` carries every process's log tail.

`readme_command(script)` is a README launch (`for i in 0 1; do ... python SCRIPT ... & done`) as
one process's argv, so tests run the command lines the README shows.
"""

import glob
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ProcessGroupError(AssertionError):
    """A process of the group failed or the group ran past its deadline."""


def free_port() -> int:
    """A TCP port free on localhost now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def run_processes(argv: Sequence[str], num_processes: int, devices_per_process: int,
                  timeout: float, log_dir: str, env: Optional[dict] = None,
                  cwd: Optional[str] = REPO,
                  on_poll: Optional[Callable[[list], None]] = None) -> list[str]:
    """Run `argv` as `num_processes` processes of one JAX run; their logs (stdout + stderr).

    `on_poll(procs)`, if given, is called with the `subprocess.Popen`s about 5 times a second
    while they run (e.g. to signal one of them when something happened).

    Raises:
      ProcessGroupError: a process exited with a non-zero status (the others are killed), or
        the group did not finish within `timeout` seconds (all are killed); the message names
        which and holds each process's log tail.
    """
    port = free_port()
    procs, logs = [], []
    base = dict(os.environ if env is None else env)
    for index in range(num_processes):
        proc_env = dict(base, JAX_PLATFORMS="cpu",
                        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
        args = [a.format(process_id=index, port=port, python=sys.executable) for a in argv]
        log_path = os.path.join(log_dir, f"process{index}_{port}.log")
        logs.append(log_path)
        with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block it
            procs.append(subprocess.Popen(args, env=proc_env, cwd=cwd, stdout=log,
                                          stderr=subprocess.STDOUT))
    deadline = time.time() + timeout
    failure = None
    try:
        while failure is None:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failure = f"process {bad[0]} exited with status {codes[bad[0]]}"
            elif time.time() > deadline:
                running = [i for i, c in enumerate(codes) if c is None]
                failure = (f"processes {running} still running after {timeout:.0f} s (a hung "
                           "collective, or a peer waiting for one that failed?)")
            else:
                if on_poll is not None:
                    on_poll(procs)
                time.sleep(0.2)
    finally:  # also when the caller is interrupted: never leave a process behind
        if any(p.poll() is None for p in procs):
            for p in procs:  # where each one is stuck, into its log (`runtime.initialize`)
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)
    if failure is not None:
        tails = "\n".join(f"--- process {i} (status {p.returncode}) ---\n{_tail(path)}"
                          for i, (p, path) in enumerate(zip(procs, logs)))
        raise ProcessGroupError(f"{failure}\n{tails}")
    return [_tail(path, 10 ** 9) for path in logs]


def readme_command(script: str, readme: str = os.path.join(REPO, "README.md"),
                   replace: Optional[dict] = None) -> list[str]:
    """The README's multi-process launch of `script` (a bash block's `for i in ...; do ...
    python SCRIPT ... --process_id=$i & done`) as one process's argv for `run_processes`:
    the interpreter `{python}`, `$i` -> `{process_id}`, the coordinator's port -> `{port}`,
    each `replace` key (a path of the README, e.g. '/tmp/two') -> its value, and globs
    expanded.

    Raises:
      LookupError: the README shows no such launch.
    """
    with open(readme) as f:
        text = f.read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            match = re.search(r"python (" + re.escape(script) + r" .*?) & done", line)
            if match and "--process_id=$i" in match.group(1):
                command = match.group(1).replace("$i", "{process_id}")
                command = re.sub(r"(--coordinator_address=[\w.-]+:)\d+", r"\g<1>{port}", command)
                args = shlex.split(command)
                for old, new in (replace or {}).items():
                    args = [a.replace(old, new) for a in args]
                # Globs expand as the shell would.
                args = [x for a in args for x in (sorted(glob.glob(a)) if "*" in a else [a])]
                return ["{python}", *args]
    raise LookupError(f"{readme} shows no multi-process launch of {script}")
