"""Where programs run: JAX processes, the `('data',)` device mesh, moving arrays onto it, and
the one cache of compiled functions. Every entry point (train.py, eval.py, predict.py) and every
runner (`Predictor`, `evaluation.evaluate`, the train step) goes through this module; nothing
else builds a mesh or keeps jitted functions.

Data parallel everywhere: a 1-D mesh over devices, batches split on their leading axis across
it, variables replicated. With several processes (one per host, `initialize`), each process
holds its own rows of a global batch (`shard`: process-local rows -> a global array) and reads
back its own (`local_rows`); small host values cross processes with `gather_to_process_zero`
and `broadcast_from_process_zero`. Processes meet at `barrier` (the coordination service)
before each such exchange and before the train step's first one, so that a process still
compiling or reading when the others reach it is waited for instead of failing the run.

Importing this module (or any of maskrcnn_jax) creates no device array: `initialize` must run
before anything touches a device.
"""

import collections
import faulthandler
import json
import logging
import os
import signal
import weakref
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------


def initialize(auto: bool = False, coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None, process_id: Optional[int] = None,
               timeout_s: Optional[int] = None) -> bool:
    """Start `jax.distributed`: with an explicit coordinator (a run started by hand, e.g. on one
    machine: all three of `coordinator_address`, `num_processes`, `process_id`), or
    auto-detected (Cloud TPU pod slices, SLURM, Open MPI, ...) when `auto`. Neither: a
    single-process run, nothing to do. On CPU, cross-process collectives go through gloo.

    Must run before anything creates a device array. `timeout_s` bounds the wait for the other
    processes (initialisation, heartbeat, shutdown; JAX's defaults when None).

    Returns whether `jax.distributed` was started.

    Raises:
      ValueError: when only some of the three explicit values are given.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("coordinator_address, num_processes and process_id go together "
                         f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    if coordinator_address is None and not auto:
        return False
    if _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = {} if timeout_s is None else dict(
        initialization_timeout=int(timeout_s), heartbeat_timeout_seconds=int(timeout_s),
        shutdown_timeout_seconds=int(timeout_s))
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
    # A process stuck in a collective (e.g. waiting for a peer that died) prints its Python
    # stack on SIGUSR1, so a hang on a pod can be located.
    faulthandler.register(signal.SIGUSR1)
    return True


def _cpu_only() -> bool:
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or ""
    return platforms.strip().lower() == "cpu"


_barriers = 0


def barrier(name: str, timeout_s: float = 1800.0):
    """Wait until every process has reached the barrier `name`, at most `timeout_s` seconds (one
    process: returns at once). Every process must call the same barriers in the same order.

    The coordination service's barrier (`jax.distributed`'s client), not a device collective:
    a process that arrives much later than the others (still compiling, still reading data) is
    waited for. A first device collective cannot wait that long: on the CPU, gloo gives up
    setting up its communicator when the processes arrive more than 30 s apart ("Gloo context
    initialization failed: ... GetKeyValue() timed out"), a limit jaxlib does not expose."""
    global _barriers
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client orbax's barriers also use

    _barriers += 1  # the same sequence on every process, so each use of a name is its own
    distributed.global_state.client.wait_at_barrier(f"maskrcnn_jax/{name}/{_barriers}",
                                                    int(timeout_s * 1000))


def is_main_process() -> bool:
    """Process 0: the one that writes files and prints results."""
    return jax.process_index() == 0


# ------------------------------------------------------------------------------------------------
# The mesh and arrays on it
# ------------------------------------------------------------------------------------------------


def data_mesh(devices: Optional[Sequence] = None) -> Mesh:
    """A 1-D `('data',)` mesh over `devices` (default: every device of every process, in
    process-major order, so each process's devices hold a contiguous block of a global batch)."""
    return Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (DATA_AXIS,))


def local_mesh(batch_size: int, devices: Optional[Sequence] = None) -> Mesh:
    """A `data_mesh` of the most devices of `devices` (default this process's) that divides
    `batch_size` (batch 1: one device; 8 on 4 devices: all 4)."""
    devices = list(jax.local_devices() if devices is None else devices)
    count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    return data_mesh(devices[:count])


def local_device_count(mesh: Mesh) -> int:
    """How many of `mesh`'s devices belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def split(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh's `data` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: Mesh):
    """`tree` on every device of `mesh`. Arrays already so stay where they are; others (host
    arrays, or device arrays elsewhere, e.g. restored on one local device) go through the host,
    each process putting its own copy (no cross-host transfer): every process must hold the
    same values."""
    target = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return jax.device_put(np.asarray(x), target)

    return jax.tree.map(put, tree)


def shard(rows, mesh: Mesh) -> jax.Array:
    """This process's rows of a global batch -> a global array split on `data` (its devices'
    block; `jax.make_array_from_process_local_data`: the same code with 1 process or N)."""
    return jax.make_array_from_process_local_data(split(mesh), np.asarray(rows))


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array split on its leading axis, in order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


# ------------------------------------------------------------------------------------------------
# Host values across processes
# ------------------------------------------------------------------------------------------------


def gather_to_process_zero(items: list) -> Optional[list]:
    """Process 0: the JSON-serialisable `items` of every process, concatenated in process
    order; other processes: None. One process: `items` itself. (Two all-gathers of the
    zlib-compressed JSON: the byte counts, then the bytes padded to the longest.)"""
    if jax.process_count() == 1:
        return items
    import zlib

    from jax.experimental import multihost_utils

    barrier("gather_to_process_zero")
    payload = np.frombuffer(zlib.compress(json.dumps(items).encode()), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int64)))
    sizes = sizes.reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    if jax.process_index() != 0:
        return None
    merged = []
    for p, size in enumerate(sizes):
        merged += json.loads(zlib.decompress(gathered[p, :int(size)].tobytes()).decode())
    return merged


def broadcast_from_process_zero(values: Optional[dict], keys: Sequence[str]) -> dict:
    """Process 0's `{key: float}` on every process (float64, so the values are bit-identical);
    the other processes pass None."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    barrier("broadcast_from_process_zero")
    array = (np.asarray([values[k] for k in keys], np.float64) if jax.process_index() == 0
             else np.zeros(len(keys), np.float64))
    # As bytes: without jax_enable_x64 a float64 array would travel as float32.
    raw = np.asarray(multihost_utils.broadcast_one_to_all(array.view(np.uint8)), np.uint8)
    return {k: float(v) for k, v in zip(keys, raw.view(np.float64))}


def all_processes_agree(value: bool) -> bool:
    """Whether `value` is True on every process (an all-gather; one process: `value`)."""
    if jax.process_count() == 1:
        return bool(value)
    from jax.experimental import multihost_utils

    barrier("all_processes_agree")
    return bool(np.all(multihost_utils.process_allgather(np.asarray([bool(value)]))))


# ------------------------------------------------------------------------------------------------
# Compiled functions
# ------------------------------------------------------------------------------------------------

# Every compiled function of this process, by key: those somebody still holds (a live
# `Predictor`, a running loop), and the `_RECENT` most recently asked for even when nobody does,
# so that a second evaluation, Predictor or training run of one config reuses its program.
_RECENT = 16
_live: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_recent: "collections.OrderedDict" = collections.OrderedDict()


def cache_key(*parts) -> str:
    """A key from values (configs as dicts, meshes, numbers, strings): JSON of their values, so
    two equal configs give the same key (not their hash, which for a FrozenConfigDict follows
    its mutable ConfigDict)."""
    def value(part):
        if isinstance(part, Mesh):
            return {"mesh": [d.id for d in part.devices.flat], "axes": list(part.axis_names)}
        if hasattr(part, "to_dict"):
            return part.to_dict()
        return part

    return json.dumps([value(p) for p in parts], sort_keys=True, default=str)


def compiled(kind: str, key_parts: Sequence, build: Callable[[], Callable]) -> Callable:
    """The compiled function of `kind` for `key_parts` (`cache_key`), built by `build()` (e.g. a
    `jax.jit`) the first time. One policy for the whole process: kept while referenced, and
    the 16 most recently used kept even when not."""
    key = cache_key(kind, *key_parts)
    function = _live.get(key)
    if function is None:
        function = _recent.get(key)
    if function is None:
        function = build()
    _live[key] = _recent[key] = function
    _recent.move_to_end(key)
    while len(_recent) > _RECENT:
        _recent.popitem(last=False)
    return function
