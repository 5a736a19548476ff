"""Builds distillm_ext._C: with CUDA when a CUDA torch and nvcc are present, CPU-only otherwise.

Environment:
  DISTILLM_CPU_ONLY=1     never build the CUDA kernels
  FORCE_CUDA=1            build them, or fail, even if torch/nvcc detection says no
  CUDA_HOME               CUDA toolkit root (default: /usr/local/cuda when it has bin/nvcc)
  TORCH_CUDA_ARCH_LIST    default "8.0;9.0+PTX" (A100, H100/H200, PTX for newer GPUs)
  MAX_JOBS                parallel compile jobs (default: all cores)
  DEBUG=1                 -O0 -g
"""

import os
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).parent.resolve()

# The nvcc on PATH may be a wrapper script outside the toolkit; torch locates CUDA through
# CUDA_HOME at import time, so set it first.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda() -> bool:
    if env_flag("DISTILLM_CPU_ONLY"):
        return False
    has_toolkit = cpp_extension.CUDA_HOME is not None and Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists()
    if env_flag("FORCE_CUDA"):
        if not has_toolkit:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to a directory with bin/nvcc")
        return True
    # Decided from the torch build and the toolkit, never from a GPU being present.
    return torch.version.cuda is not None and has_toolkit


def pip_cuda_include_dirs() -> list[str]:
    """cuBLAS/cuSPARSE headers that pip's CUDA torch ships under site-packages/nvidia/*/include.

    torch's CUDA headers include them, and a minimal toolkit lacks them."""
    found = []
    for entry in sys.path:
        nvidia = Path(entry, "nvidia")
        if nvidia.is_dir():
            found += sorted(str(p) for p in nvidia.glob("*/include") if p.is_dir())
    return found


def library_sources() -> list[str]:
    """csrc/sources.txt, the one list of the operator library's sources (CMake reads it too)."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def extension():
    debug = env_flag("DEBUG")
    with_cuda = want_cuda()
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math lets GCC turn the math header's selects into blends so the row loops
    # vectorize; it changes no result (nothing here reads floating-point exception flags).
    # -fopenmp: at::parallel_for is inline and only runs in parallel when its caller is
    # compiled with OpenMP (torch's CPU build uses OpenMP).
    cxx_flags = [*opt, "-fopenmp", "-fno-trapping-math", "-ffp-contract=fast", "-Wall",
                 "-Wno-unknown-pragmas"]
    listed = library_sources()
    sources = [s for s in listed if not s.endswith(".cu")] + ["csrc/python_module.cpp"]
    macros = [("DISTILLM_DEBUG", None)] if debug else []
    include_dirs = [str(ROOT / "csrc")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "distillm_ext._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    macros += [
        ("DISTILLM_WITH_CUDA", None),
        ("DISTILLM_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ("DISTILLM_CUDA_ARCHS", f'"{archs}"'),
    ]
    nvcc_flags = [*opt, "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "distillm_ext._C", sources + [s for s in listed if s.endswith(".cu")],
        include_dirs=include_dirs + pip_cuda_include_dirs(), define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])


class BuildExtensionInTree(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Compiles in build/ of the source tree, also for editable installs, which would otherwise
    compile in a fresh temporary directory every time: ninja then rebuilds only what changed,
    and re-running the set-up on an unchanged tree takes seconds, not minutes."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = str(ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtensionInTree})
