"""Predictor and evaluate split over 4 simulated devices of one process give what 1 device gives.

One subprocess with `--xla_force_host_platform_device_count=4` (the device count is fixed when
JAX starts): the tiny random model (`maskrcnn_jax.testing.tiny`, scores kept from 0) on shapes
images. The Predictor with batches of 4 runs 1 image per device on 4 devices but 4 images on one
device: XLA compiles the two batch sizes into different programs (other vectorisation and
summation order), so the outputs agree to float32 rounding (boxes ~1e-5 px), not bit for bit;
labels and the number of detections are equal. The evaluation (7 images, 1 per device: batches of
4 with the last padded by 1 masked image) runs the same per-device program as one device with
batch 1, and writes identical detections and metrics.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from jax.sharding import Mesh
    sys.path.insert(0, {repo!r})
    from maskrcnn_jax.data import builders
    from maskrcnn_jax.inference import evaluation
    from maskrcnn_jax.inference.predictor import Predictor
    from maskrcnn_jax.testing.tiny import tiny_model

    assert jax.device_count() == 4, jax.devices()
    source = builders.load("shapes", {data_dir!r}, "validation",
                           config=builders.shapes_config(num_train=4, num_validation=7, seed=2))
    config, variables = tiny_model(num_classes=len(builders.categories(source)) + 1)
    images = [np.asarray(source[i]["image"]) for i in range(6)]
    four = Predictor(config, variables, batch_size=4)
    one = Predictor(config, variables, batch_size=4, devices=jax.devices()[:1])
    assert four.mesh.devices.size == 4 and one.mesh.devices.size == 1
    assert Predictor(config, variables, batch_size=6).mesh.devices.size == 3
    a, b = four(images), one(images)
    n = 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["labels"], y["labels"])
        np.testing.assert_allclose(x["boxes"], y["boxes"], rtol=0, atol=1e-3)
        np.testing.assert_allclose(x["scores"], y["scores"], rtol=1e-4, atol=1e-6)
        assert x["masks"].shape == y["masks"].shape
        if x["masks"].dtype == np.bool_:
            assert np.mean(x["masks"] != y["masks"]) < 1e-3
        else:
            np.testing.assert_allclose(x["masks"], y["masks"], rtol=0, atol=1e-4)
        n += len(x["boxes"])
    assert n > 0, "no detections: the comparison would be vacuous"
    out = {{"detections": n}}
    for devices in (4, 1):
        mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
        workdir = {tmp!r} + f"/eval{{devices}}"
        out[devices] = evaluation.evaluate(config, variables, source, batch_size=1,
                                           workdir=workdir, progress=False, mesh=mesh)
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_four_devices_equal_one(tmp_path):
    script = _SCRIPT.format(repo=REPO, data_dir=str(tmp_path / "tfds"), tmp=str(tmp_path))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, timeout=600,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = proc.stdout.decode()
    assert proc.returncode == 0, log[-4000:]
    out = json.loads(log.split("RESULT ")[-1].splitlines()[0])
    assert out["detections"] > 0
    assert out["4"] == out["1"]
    files = {}
    for devices in (4, 1):
        with open(tmp_path / f"eval{devices}" / "detections.json") as f:
            detections = json.load(f)
        with open(tmp_path / f"eval{devices}" / "metrics.json") as f:
            files[devices] = (detections, json.load(f))
    assert files[4] == files[1]
    assert files[1][1]["num_images"] == 7 and len(files[1][0]) > 0
