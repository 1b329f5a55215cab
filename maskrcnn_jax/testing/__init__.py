"""Helpers for comparing with torchvision (tests, benchmarks, `maskrcnn_jax.torchvision.compare`)."""


def import_torchvision():
    """Import torchvision with its compiled ops (nms, roi_align), or raise a clear error.

    Needs the `torch` extra: `pip install -e '.[torch]'` (torch 2.14.1 + torchvision 0.29.1; its
    CUDA build's ops load and run on the CPU too).
    """
    try:
        import torch
        import torchvision
    except ImportError as e:
        raise ImportError(
            "comparing with torchvision needs torch and torchvision: "
            "pip install -e '.[torch]'") from e
    try:
        torch.ops.torchvision.nms  # noqa: B018  (raises if the compiled ops are missing)
    except (RuntimeError, AttributeError) as e:
        raise ImportError(
            f"torchvision {torchvision.__version__}'s compiled ops do not load beside torch "
            f"{torch.__version__}; install the pair of the torch extra: pip install -e '.[torch]'"
        ) from e
    return torchvision
