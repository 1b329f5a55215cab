"""Per-process input: training slices of one global sequence, evaluation shards (one process
standing in for each of several, by `process_index` / `process_count`).

  * The global batch of every step is the same with 1, 2 or 3 processes (every field, flips and
    scale jitter included): the processes' batches concatenated are the one-process batch,
    also across an epoch boundary (20 records, global batch 6).
  * In an epoch no record is read twice or by two processes; a loader started at
    `start_record` continues the sequence exactly (resume, also with another process count).
  * With canvas buckets (CONFIG has no canvas_size), every global batch is of one bucket
    (torchvision's aspect-ratio grouping, `GroupedBatches`), and all of the above still holds.
  * grain worker processes do not change the batches (slow: spawns them).
  * Evaluation shards are contiguous, cover the split once and are padded to equal length with
    examples whose `batch_valid` is False.
"""

import numpy as np
import pytest

from maskrcnn_jax.config import model_config
from maskrcnn_jax.data import builders, eval_shards, pipeline, record_buckets, samplers

CONFIG = model_config(num_classes=4, min_size=64, max_size=96)
KWARGS = dict(train=True, seed=3, max_instances=6, mask_crop_size=14, min_sizes=(48, 64))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    config = builders.shapes_config(num_train=20, num_validation=5, seed=1)
    return builders.load("shapes", str(tmp_path_factory.mktemp("shapes")), "train", config=config)


def _batches(source, processes, steps, **kwargs):
    """[step][process] batches of `processes` loaders of one global batch of 6."""
    iters = [iter(pipeline.make_dataset(source, CONFIG, batch_size=6 // processes,
                                        process_index=p, process_count=processes,
                                        **{**KWARGS, **kwargs})) for p in range(processes)]
    return [[next(it) for it in iters] for _ in range(steps)]


def _assert_global_equal(one, many):
    for step, (a, parts) in enumerate(zip(one, many, strict=True)):
        for key in a:
            np.testing.assert_array_equal(a[key], np.concatenate([b[key] for b in parts[:]]),
                                          err_msg=f"step {step} {key}")


def test_global_batch_independent_of_process_count(source):
    one = [b[0] for b in _batches(source, 1, 5)]  # 30 positions: crosses the epoch at 20
    assert {bool(f) for b in one for f in b["flipped"]} == {False, True}
    for processes in (2, 3):
        many = _batches(source, processes, 5)
        _assert_global_equal(one, many)
        assert all(len(b["image_ids"]) == 6 // processes for parts in many for b in parts)


def test_batches_grouped_by_canvas_bucket(source):
    """CONFIG has canvas buckets (no canvas_size): each global batch is of one bucket, every
    image in the smallest canvas that holds it at the largest training scale (64)."""
    assert CONFIG.canvas_buckets == ((64, 64), (64, 96), (96, 64))
    canvases = []
    for batch in (b[0] for b in _batches(source, 1, 5)):
        canvas = batch["images"].shape[1:3]
        assert all(record_buckets.record_canvas(h, w, CONFIG, 64) == canvas
                   for h, w in batch["original_sizes"])
        canvases.append(canvas)
    assert len(set(canvases)) >= 2


def test_grouped_batches_cut_the_sequence_in_order():
    """torchvision's GroupedBatchSampler rule: positions in order join their record's group,
    a full group is the next batch; with 1 epoch only batches complete within it count."""
    class Sequence:  # position -> record: a fixed permutation per epoch of 10 records
        def __getitem__(self, position):
            epoch, k = divmod(position, 10)
            return pipeline.grain.RecordMetadata(index=position,
                                                 record_key=(3 * k + epoch) % 10)

    groups = np.asarray([0, 1, 1, 0, 2, 1, 0, 0, 1, 1])
    grouped = samplers.GroupedBatches(Sequence(), groups, 3)
    batches = [grouped.batch(i) for i in range(8)]
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen)  # no position twice
    for batch in batches:
        assert list(batch) == sorted(batch)
        assert len({int(groups[Sequence()[int(p)].record_key]) for p in batch}) == 1
    # First epoch (positions 0..9): group 0 has 4, group 1 has 5, group 2 has 1 -> 2 batches.
    assert grouped.batches_within(10) == 2
    # Records 0, 3, 6 (group 0) fill the first batch, 9, 2, 5 (group 1) the second; the next
    # group 1 batch takes positions 6, 7 and 10 (the next epoch's first, record 1).
    assert [b.tolist() for b in batches[:3]] == [[0, 1, 2], [3, 4, 5], [6, 7, 10]]


def test_epoch_reads_each_record_once_and_resume_continues(source):
    sampler = [samplers.GlobalBatchSampler(20, 4, p, 2, seed=3) for p in range(2)]
    # 5 global batches of 4 = one epoch of 20 positions.
    keys = [[sampler[p][j].record_key for j in range(10)] for p in range(2)]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == list(range(20))
    second_epoch = [sampler[p][j].record_key for p in range(2) for j in range(10, 20)]
    assert sorted(second_epoch) == list(range(20)) and second_epoch != keys[0] + keys[1]
    # Resume at global batch 3 (18 records consumed), in 2 processes, of a 1-process run.
    one = [b[0] for b in _batches(source, 1, 5)]
    resumed = _batches(source, 2, 2, start_record=18)
    _assert_global_equal(one[3:], resumed)


def test_bad_arguments(source):
    with pytest.raises(ValueError, match="multiple of the process count 4"):
        samplers.GlobalBatchSampler(20, 6, 0, 4, seed=0)
    with pytest.raises(ValueError, match="process index 2 not in"):
        samplers.GlobalBatchSampler(20, 6, 2, 2, seed=0)
    with pytest.raises(ValueError, match="global_batch_size 8"):
        pipeline.make_dataset(source, CONFIG, batch_size=3, process_index=0, process_count=2,
                              global_batch_size=8, **KWARGS)
    with pytest.raises(ValueError, match="shard_options is for evaluation"):
        import grain

        pipeline.make_dataset(source, CONFIG, batch_size=3, process_index=0, process_count=1,
                              shard_options=grain.sharding.NoSharding(), **KWARGS)


@pytest.mark.slow
def test_worker_processes_keep_the_batches(source):
    one = [b[1] for b in _batches(source, 2, 4)]
    workers = [b[0] for b in _batches(source, 1, 4, worker_count=2)]
    whole = [b[0] for b in _batches(source, 1, 4)]
    _assert_global_equal(whole, [[w] for w in workers])
    assert np.array_equal(one[0]["image_ids"], whole[0]["image_ids"][3:])


def test_eval_shards_cover_the_split_once_padded(source):
    assert [eval_shards.shard_bounds(5, p, 2) for p in range(2)] == [(0, 3), (3, 5)]
    assert [eval_shards.shard_bounds(2, p, 3) for p in range(3)] == [(0, 1), (1, 2), (2, 2)]
    ids, valid_counts = [], []
    for p in range(3):
        shard = eval_shards.PaddedShard(source, p, 3)  # 20 records: 7, 7, 6 (+1 padding)
        assert len(shard) == 7
        loader = pipeline.make_dataset(shard, CONFIG, batch_size=4, train=False, max_instances=6,
                                       mask_crop_size=14,
                                       shard_options=pipeline.grain.sharding.NoSharding())
        batches = list(loader)
        assert len(batches) == 2  # the same count on every process
        valid = np.concatenate([b["batch_valid"] for b in batches])
        valid_counts.append(int(valid.sum()))
        ids += [int(i) for b in batches for i, v in zip(b["image_ids"], b["batch_valid"]) if v]
    assert valid_counts == [7, 7, 6]
    assert ids == [int(source[i]["image_id"]) for i in range(20)]  # in order, each once
    with pytest.raises(ValueError, match="empty"):
        eval_shards.PaddedShard([], 0, 1)
