"""Training samplers: every process reads its slice of one global sequence of batches.

Training reads one global sequence, whatever the number of processes (`GlobalBatchSampler`):
record positions are shuffled over the whole split with the seed, global batch `s` is positions
`s * G .. (s + 1) * G - 1` and process `p` of `P` reads its slice `p * G / P .. (p + 1) * G / P - 1`
of it, each position with its own random draws (flip, scale). So the global batch of every step
(and its augmentation) is the same with 1 process or N, no position is read by two processes,
and a run resumes from the number of records consumed alone (`start_record`, checkpointed as
`position_state`), also with another process count. With canvas buckets, each global batch holds
records of one bucket (`GroupedBatches`, torchvision's aspect-ratio grouping).
"""

import json
import logging
import sys
import threading
from typing import Optional, Sequence

import grain
import numpy as np

log = logging.getLogger(__name__)


class GlobalBatchSampler:
    """grain sampler of this process's slice of every global training batch.

    Position `g` of the global sequence is record `IndexSampler(shuffle=True, seed)[g]` (a new
    permutation every epoch) with the random generator grain gives that position, so the
    sequence does not depend on the process count. This process (`process_index` of
    `process_count`) reads, for global batch `s`, positions `start_record + s * G + p * L + r`,
    `r < L = G / process_count`. grain's worker `w` of `W` takes the loader's indices
    `w, w + W, ...` and batches its own records, so loader index `j` is mapped through
    `(worker, batch of that worker, row)` such that the loader's `k`-th batch is global batch
    `k` whatever the worker count.

    With `groups` (a group, e.g. a canvas bucket, per record), every global batch holds
    records of one group, as torchvision's `GroupedBatchSampler`: the global sequence's
    positions are taken in order, each joins its record's group, and a group that has G
    positions becomes the next global batch (`GroupedBatches`). It is still one sequence of
    global batches whatever the process count, and global batch `s` is a function of `s`
    alone (so `start_record = s * G` resumes it).

    Args:
      num_records: records in the split.
      global_batch_size: G, a multiple of `process_count`.
      process_index, process_count: this process and how many read the sequence.
      seed: shuffling and per-position random draws.
      start_record: positions already consumed (a resumed run: step * G).
      worker_count: the DataLoader's (0: in-process).
      num_epochs: None (forever) or the number of passes; then only whole global batches.
      groups: `(num_records,)` int group of each record, or None (no grouping).
    """

    def __init__(self, num_records: int, global_batch_size: int, process_index: int,
                 process_count: int, seed: int, start_record: int = 0, worker_count: int = 0,
                 num_epochs: Optional[int] = None, groups: Optional[Sequence[int]] = None):
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} must be a positive multiple "
                             f"of the process count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process index {process_index} not in [0, {process_count})")
        if start_record < 0:
            raise ValueError(f"start_record must be >= 0, got {start_record}")
        self.num_records, self.global_batch_size = int(num_records), int(global_batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.seed, self.start_record = int(seed), int(start_record)
        self.workers = max(int(worker_count), 1)
        # grain's DataLoader reads the sampler's own sharding: none, the slice is ours.
        self._shard_options = grain.sharding.NoSharding()
        self._global = grain.samplers.IndexSampler(num_records=self.num_records, shuffle=True,
                                                   seed=self.seed)
        self._grouped = None
        if groups is not None:
            if len(groups) != self.num_records:
                raise ValueError(f"{len(groups)} groups for {self.num_records} records")
            if self.start_record % self.global_batch_size:
                raise ValueError(f"grouped batches resume at a whole global batch: start_record "
                                 f"{start_record} is not a multiple of {global_batch_size}")
            self._grouped = GroupedBatches(self._global, np.asarray(groups),
                                           self.global_batch_size)
        self._len = None
        if num_epochs is not None:
            if self._grouped is None:
                total = (num_epochs * self.num_records) // self.global_batch_size
            else:  # the global batches complete within the epochs' positions
                total = self._grouped.batches_within(num_epochs * self.num_records)
            steps = total - self.start_record // self.global_batch_size
            self._len = max(steps, 0) * self.local_batch_size

    def __len__(self) -> int:
        return sys.maxsize if self._len is None else self._len

    def global_position(self, index: int) -> int:
        """The global sequence position that loader index `index` reads."""
        worker, q = index % self.workers, index // self.workers
        batch_of_worker, row = divmod(q, self.local_batch_size)
        step = batch_of_worker * self.workers + worker
        offset = self.process_index * self.local_batch_size + row
        if self._grouped is not None:
            return int(self._grouped.batch(self.start_record // self.global_batch_size
                                           + step)[offset])
        return self.start_record + step * self.global_batch_size + offset

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0 or (self._len is not None and index >= self._len):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        metadata = self._global[self.global_position(index)]
        return grain.RecordMetadata(index=index, record_key=metadata.record_key,
                                    rng=metadata.rng)

    def __repr__(self) -> str:
        return (f"GlobalBatchSampler(num_records={self.num_records}, "
                f"global_batch_size={self.global_batch_size}, process_index={self.process_index}, "
                f"process_count={self.process_count}, seed={self.seed}, "
                f"start_record={self.start_record}, workers={self.workers})")


class GroupedBatches:
    """Global batches of one group each, cut from the global sequence (torchvision's
    `GroupedBatchSampler` over an endless sequence): positions 0, 1, 2, ... are taken in
    order, each appended to its record's group; a group holding `batch_size` positions becomes
    the next batch. Batches are computed on demand, in order, and kept.

    Args:
      sequence: the global sequence: `sequence[position].record_key` (a grain sampler).
      groups: `(num_records,)` group of each record.
      batch_size: positions per batch.
    """

    def __init__(self, sequence, groups: np.ndarray, batch_size: int):
        self.sequence, self.groups, self.batch_size = sequence, np.asarray(groups), batch_size
        self._pending: dict = {}
        self._batches: list = []
        self._next = 0
        self._lock = threading.Lock()  # grain reads records (and so batches) from many threads

    def __getstate__(self):  # grain's worker processes get a copy (a lock does not pickle)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _advance(self):
        """Read positions until one more batch is complete."""
        count = len(self._batches)
        while len(self._batches) == count:
            position = self._next
            self._next += 1
            group = int(self.groups[self.sequence[position].record_key])
            members = self._pending.setdefault(group, [])
            members.append(position)
            if len(members) == self.batch_size:
                self._batches.append(np.asarray(members, np.int64))
                members.clear()

    def batch(self, index: int) -> np.ndarray:
        """`(batch_size,)` global positions of batch `index`."""
        with self._lock:
            while len(self._batches) <= index:
                self._advance()
            return self._batches[index]

    def batches_within(self, num_positions: int) -> int:
        """How many batches are complete using positions `< num_positions` only."""
        count = 0
        while self.batch(count)[-1] < num_positions:
            count += 1
        return count


def position_state(records_consumed: int) -> bytes:
    """The training data position to checkpoint (JSON bytes): the global positions consumed.
    With `GlobalBatchSampler` it is the whole iterator state of every process."""
    return json.dumps({"records_consumed": int(records_consumed)}).encode()


def records_consumed(data_state: bytes, step: int, global_batch_size: int) -> int:
    """The global positions consumed by a checkpoint's data state (`position_state`); for a
    state of grain's own iterator (checkpoints written before `GlobalBatchSampler`),
    `step * global_batch_size` (the same position, another shuffle order), with a warning."""
    state = json.loads(data_state)
    if "records_consumed" in state:
        return int(state["records_consumed"])
    log.warning("data state of an older checkpoint (grain's iterator state): resuming at record "
                "%d of the global sequence, not in its old order", step * global_batch_size)
    return int(step) * int(global_batch_size)
