"""maskrcnn_jax: Mask R-CNN in JAX/Flax with torchvision numerics."""

from maskrcnn_jax import xla_cpu  # noqa: F401  (XLA CPU defaults, before JAX starts its backend)

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import maskrcnn_jax.ops.boxes` must not pull in flax.
    if name == "Predictor":
        from maskrcnn_jax.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'maskrcnn_jax' has no attribute {name!r}")
