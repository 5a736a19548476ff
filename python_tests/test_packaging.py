"""A CPU-only build (DISTILLM_CPU_ONLY=1) from a copy of the sources, installed and imported
in a fresh interpreter: the package builds and loads without the CUDA toolchain."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_only_wheel_builds_installs_and_loads(tmp_path):
    source = tmp_path / "source"
    for name in ("csrc", "distillm_ext", "setup.py", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("*.so", "__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    env = dict(os.environ, DISTILLM_CPU_ONLY="1")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(pip + ["wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
                   env=env, check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("distillm_ext-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True)
    probe = ("import json, distillm_ext, torch; "
             "print(json.dumps([distillm_ext.__file__, distillm_ext.build_info(), "
             "distillm_ext.skew_kl(torch.zeros(2, 5), torch.zeros(2, 5)).item()]))")
    # cwd: `python -c` puts the working directory first on sys.path, and the repository root
    # holds the editable build.
    result = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
                            cwd=tmp_path, capture_output=True, text=True, check=True)
    location, info, loss = json.loads(result.stdout.strip().splitlines()[-1])
    assert location.startswith(str(tmp_path / "site"))
    assert info["cuda"] is False
    assert loss == 0.0
