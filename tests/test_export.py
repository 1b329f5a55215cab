"""Exported StableHLO reloads (without the model code) and gives the Predictor's outputs."""

import subprocess
import sys

import jax
import numpy as np

from maskrcnn_jax.config import model_config
from maskrcnn_jax.export import export_inference, load_exported
from maskrcnn_jax.model import MaskRCNN, frozen
from maskrcnn_jax.predictor import Predictor


def _tiny():
    config = model_config(backbone="tiny", num_classes=3, min_size=96, max_size=128,
                          canvas_size=(128, 128), rpn_pre_nms_top_n_test=50,
                          rpn_post_nms_top_n_test=30, box_detections_per_img=10,
                          box_score_thresh=0.0)
    model = MaskRCNN(frozen(config))
    images = np.zeros((1, 128, 128, 3), np.float32)
    sizes = np.array([[96, 128]], np.int32)
    variables = model.init(jax.random.key(0), images, sizes, sizes)
    return config, jax.device_get(variables)


def test_exported_matches_predictor(tmp_path):
    config, variables = _tiny()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)]
    export_inference(config, variables, tmp_path / "exported", batch_size=1)
    expected = Predictor(config, variables)(images)
    # Load in a fresh interpreter that never imports the model code (flax, maskrcnn_jax.model).
    script = (
        "import sys, pickle\n"
        "from maskrcnn_jax.export import load_exported\n"
        "import numpy as np\n"
        f"images = [np.asarray(a) for a in pickle.load(open({str(tmp_path / 'images.pkl')!r}, 'rb'))]\n"
        f"out = load_exported({str(tmp_path / 'exported')!r})(images)\n"
        "assert 'flax' not in sys.modules and 'maskrcnn_jax.model' not in sys.modules, 'model code loaded'\n"
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
