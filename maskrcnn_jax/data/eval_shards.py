"""Evaluation shards: each process reads an equal-length contiguous share of the records.

Every process runs the same batches of the same canvas (the evaluation step is one computation
over every process's devices), so a shorter share is padded by repeating a record marked
`PADDING_KEY`, whose example gets `batch_valid=False` and is left out of the results.
"""

from typing import Optional, Sequence

import numpy as np

# Set in the records `PaddedShard` repeats to fill a shard: their examples get batch_valid=False.
PADDING_KEY = "is_padding"


def shard_bounds(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
    """`[start, end)` of a process's contiguous eval shard (grain's `even_split`: the first
    `num_records % process_count` shards hold one record more)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} not in [0, {process_count})")
    per_shard, extra = divmod(int(num_records), int(process_count))
    start = per_shard * process_index + min(process_index, extra)
    return start, start + per_shard + (process_index < extra)


class PaddedShard:
    """This process's contiguous share of a data source's records (`shard_bounds` of
    `positions`, default every record in order), padded to `ceil(len(positions) / P)` records by
    repeating record `positions[0]` marked `PADDING_KEY` (its example has batch_valid=False), so
    every process reads the same number of batches. With the positions of one canvas bucket
    (`record_buckets.bucket_positions`) the padding fits that canvas too."""

    def __init__(self, source, process_index: int, process_count: int,
                 positions: Optional[Sequence[int]] = None):
        positions = np.arange(len(source)) if positions is None else np.asarray(positions, np.int64)
        if len(positions) == 0:
            raise ValueError("cannot shard an empty data source")
        self.source = source
        self.start, self.end = shard_bounds(len(positions), process_index, process_count)
        self.positions = positions[self.start:self.end]
        self.padding = int(positions[0])
        self.length = -(-len(positions) // process_count)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        if index < len(self.positions):
            return self.source[int(self.positions[index])]
        return {**self.source[self.padding], PADDING_KEY: True}

    def __repr__(self):
        return f"PaddedShard({self.source!r}, [{self.start}, {self.end}), length={self.length})"
