"""Helpers for comparing with torchvision (tests, benchmarks, `maskrcnn_jax.compare`)."""


def import_torchvision():
    """Import torchvision; where its compiled ops do not load (a CPU-only torch build), first
    install the pure-torch stand-ins of `maskrcnn_jax.testing.torchvision_cpu`."""
    try:
        import torchvision
        import torch

        torch.ops.torchvision.nms  # noqa: B018  (raises if the compiled ops are missing)
        return torchvision
    except (ImportError, RuntimeError, AttributeError):
        from maskrcnn_jax.testing.torchvision_cpu import torchvision

        return torchvision
