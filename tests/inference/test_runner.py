"""The inference loop shared by `Predictor`, `ExportedPredictor` and `evaluate`
(`inference/runner.py`): pipelining of host and device work, results in the caller's order."""

import numpy as np

from maskrcnn_jax.config import model_config
from maskrcnn_jax.inference.runner import detect_in_batches


def test_detect_in_batches_overlaps_host_and_device_work():
    """Chunk k + 1 is dispatched before chunk k's outputs are read back (and pasted): with an
    asynchronous `forward` the host work of one chunk runs while the device computes the next.
    Results stay in the caller's order."""
    events = []

    class Pending:  # a device array: reading it (np.asarray) is what waits for the device
        def __init__(self, value, chunk):
            self.value, self.chunk = value, chunk

        def __array__(self, dtype=None, copy=None):
            events.append(f"read {self.chunk}")
            return self.value

    def forward(images, image_sizes, padded_sizes):
        chunk = sum(e.startswith("dispatch") for e in events)
        events.append(f"dispatch {chunk}")
        b = len(images)
        boxes = np.tile(np.asarray([[1, 2, 11, 12], [0, 0, 5, 5]], np.float32), (b, 1, 1))
        boxes[:, 0, 0] = chunk  # which chunk an output came from
        out = dict(boxes=boxes, scores=np.full((b, 2), 0.9, np.float32),
                   labels=np.ones((b, 2), np.int32), valid=np.asarray([[True, False]] * b),
                   mask_probs=np.full((b, 2, 4, 4), 0.7, np.float32))
        return {k: Pending(v, chunk) for k, v in out.items()}

    config = model_config(min_size=64, max_size=64, canvas_size=(64, 64))
    images = [np.zeros((64, 64, 3), np.uint8)] * 5
    results = detect_in_batches(images, config, 2, forward, buckets=[(64, 64)])
    reads = [e for e in events if e.startswith("read")]
    order = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]
    assert order == ["dispatch 0", "dispatch 1", "read 0", "dispatch 2", "read 1", "read 2"]
    assert len(reads) == 3 * 5  # every output field of every chunk read once
    assert [float(r["boxes"][0, 0]) for r in results] == [0, 0, 1, 1, 2]
    assert all(r["masks"].shape == (1, 1, 64, 64) for r in results)
