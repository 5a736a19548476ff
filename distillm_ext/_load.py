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
    """How the loaded extension was built, and which CPU code path it runs.

    Keys: 'cuda', 'cuda_version', 'cuda_archs', 'torch_version', 'debug'; 'cpu_capability', the
    CPU kernels' instruction set ('avx512', 'avx2' or 'default': the best this CPU runs, or
    the one DISTILLM_CPU_CAPABILITY names), and 'cpu_capabilities', every one this CPU and
    build can run, best first."""
    return dict(_C.build_info())
