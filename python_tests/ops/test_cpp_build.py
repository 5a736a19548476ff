"""The libtorch build (CMakeLists.txt) and its C++ test program, end to end."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def cmake_configure_args(build_dir: Path) -> list:
    args = ["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    if torch.version.cuda:
        # A CUDA libtorch's CMake config looks for the toolkit and for nvrtc; pip's torch keeps
        # the latter under site-packages/nvidia/*/lib.
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCUDAToolkit_ROOT={cuda_home}"]
        nvrtc = sorted(Path(p) for entry in sys.path if Path(entry, "nvidia").is_dir()
                       for p in Path(entry, "nvidia").glob("*/lib/libnvrtc.so*"))
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    return args


@pytest.mark.slow
def test_libtorch_build_and_cpp_test(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX"))
    build_dir = tmp_path / "build"
    for command in (cmake_configure_args(build_dir),
                    ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)],
                    ["ctest", "--test-dir", str(build_dir), "--output-on-failure"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    output = subprocess.run([str(build_dir / "skew_kl_cpp_test")], capture_output=True, text=True)
    assert "8 passed, 0 failed" in output.stdout, output.stdout
