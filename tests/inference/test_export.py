"""Exported StableHLO reloads (without the model code) and gives the Predictor's outputs."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from maskrcnn_jax.inference.export import export_inference, load_exported
from maskrcnn_jax.inference.predictor import Predictor
from maskrcnn_jax.testing.tiny import tiny_model


@pytest.mark.slow
def test_exported_matches_predictor(tmp_path):
    config, variables = tiny_model()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)]
    export_inference(config, variables, tmp_path / "exported", batch_size=1)
    expected = Predictor(config, variables)(images)
    # Load in a fresh interpreter that never imports the model code (flax, maskrcnn_jax.models.maskrcnn).
    script = (
        "import sys, pickle\n"
        "from maskrcnn_jax.inference.export import load_exported\n"
        "import numpy as np\n"
        f"images = [np.asarray(a) for a in pickle.load(open({str(tmp_path / 'images.pkl')!r}, 'rb'))]\n"
        f"out = load_exported({str(tmp_path / 'exported')!r})(images)\n"
        "assert 'flax' not in sys.modules and 'maskrcnn_jax.models.maskrcnn' not in sys.modules, 'model code loaded'\n"
        f"pickle.dump(out, open({str(tmp_path / 'out.pkl')!r}, 'wb'))\n"
    )
    import pickle

    pickle.dump(images, open(tmp_path / "images.pkl", "wb"))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path.parent))
    reloaded = pickle.load(open(tmp_path / "out.pkl", "rb"))
    assert sum(len(r["boxes"]) for r in expected) > 0
    for a, b in zip(reloaded, expected):
        for key in ("boxes", "scores", "labels", "masks"):
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5)
    # And in this process, through the same loader.
    same = load_exported(tmp_path / "exported")(images)
    np.testing.assert_allclose(same[0]["boxes"], expected[0]["boxes"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_exported_variables_are_keyed_by_parameter_path(tmp_path):
    config, variables = tiny_model()
    export_inference(config, variables, tmp_path, batch_size=1)
    with np.load(tmp_path / "variables.npz") as data:
        names = set(data.files)
        np.testing.assert_array_equal(data["params/backbone/conv1/kernel"],
                                      variables["params"]["backbone"]["conv1"]["kernel"])
    assert len(names) == len(jax.tree_util.tree_leaves(variables))
    # A file whose paths do not match the exported function is refused, naming the file.
    with np.load(tmp_path / "variables.npz") as data:
        renamed = {name.replace("conv1", "convX"): data[name] for name in data.files}
    np.savez(tmp_path / "variables.npz", **renamed)
    with pytest.raises(ValueError, match="variables.npz do not have the paths"):
        load_exported(tmp_path)
