"""Loads the compiled operators (distillm_ext._C) and turns a failed load into advice."""

import torch

try:
    from . import _C  # registers torch.ops.distillm.*
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        f"distillm_ext._C could not be loaded ({error}). It is built by `pip install "
        f"--no-build-isolation -e .` against the torch that runs it; this torch is "
        f"{torch.__version__} (CUDA {torch.version.cuda}). Rebuild after changing torch, or see "
        f"README.md for the build flags (DISTILLM_CPU_ONLY, FORCE_CUDA, CUDA_HOME)."
    ) from error


def build_info() -> dict:
    """How the loaded extension was built: {'cuda', 'cuda_version', 'cuda_archs', 'torch_version', 'debug'}."""
    return dict(_C.build_info())
