"""Run a Python script as N JAX processes on this machine (tests and benchmarks).

    logs = run_processes([sys.executable, "worker.py", ...], num_processes=2,
                         devices_per_process=2, timeout=300, log_dir=tmp_path)

Each process gets `--xla_force_host_platform_device_count=devices_per_process` CPU devices and,
in its environment, the coordinator address, process count and index (`COORDINATOR_ENV`,
`NUM_PROCESSES_ENV`, `PROCESS_ID_ENV`) for `initialize_from_env`, which starts
`jax.distributed` with gloo collectives. Everything is bounded in time: when one process fails
the others are killed at once (a survivor would wait in a collective for its peer), and when the
deadline passes all are killed; either way `ProcessGroupError` carries every process's log tail.
"""

import faulthandler
import os
import signal
import socket
import subprocess
import time
from typing import Optional, Sequence

COORDINATOR_ENV = "MASKRCNN_JAX_COORDINATOR"
NUM_PROCESSES_ENV = "MASKRCNN_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "MASKRCNN_JAX_PROCESS_ID"


class ProcessGroupError(AssertionError):
    """A process of the group failed or the group ran past its deadline."""


def free_port() -> int:
    """A TCP port free on localhost now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def initialize_from_env(timeout_s: int = 60):
    """In a process started by `run_processes`: `jax.distributed.initialize` with gloo CPU
    collectives when it is one of several (a no-op for a single process). Call it before any
    other JAX use. A peer that never shows up, or dies, fails this process within `timeout_s`
    (initialisation, heartbeat, shutdown), never an unbounded wait."""
    import jax

    num_processes = int(os.environ.get(NUM_PROCESSES_ENV, "1"))
    if num_processes == 1:
        return
    # Not jax_share_binary_between_hosts: on CPU a process then waited for a binary its peer
    # never shared (it hung before the first collective).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # A process stuck somewhere prints its Python stack on SIGUSR1 (`run_processes` sends it
    # before killing a group that failed or timed out).
    faulthandler.register(signal.SIGUSR1)
    jax.distributed.initialize(os.environ[COORDINATOR_ENV], num_processes,
                               int(os.environ[PROCESS_ID_ENV]), initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=timeout_s,
                               shutdown_timeout_seconds=timeout_s)


def _tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def run_processes(argv: Sequence[str], num_processes: int, devices_per_process: int,
                  timeout: float, log_dir: str, env: Optional[dict] = None,
                  cwd: Optional[str] = None) -> list[str]:
    """Run `argv` as `num_processes` processes of one JAX run; their logs (stdout + stderr).

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
                        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
                        **{COORDINATOR_ENV: f"localhost:{port}",
                           NUM_PROCESSES_ENV: str(num_processes), PROCESS_ID_ENV: str(index)})
        log_path = os.path.join(log_dir, f"process{index}_{port}.log")
        logs.append(log_path)
        with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block it
            procs.append(subprocess.Popen(list(argv), env=proc_env, cwd=cwd, stdout=log,
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
                time.sleep(0.2)
    finally:  # also when the caller is interrupted: never leave a process behind
        if any(p.poll() is None for p in procs):
            for p in procs:  # where each one is stuck, into its log (`initialize_from_env`)
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
