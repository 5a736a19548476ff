"""The op-only install: in a fresh virtual environment that has torch and the build tools and
nothing else (no transformers, no datasets), `pip install --no-build-isolation .` of a copy of
the sources builds the extension (CPU-only: DISTILLM_CPU_ONLY=1, no CUDA toolchain needed),
asks for no other package, and the ops work."""

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
BUILD_TOOLS = ["setuptools", "wheel", "ninja", "pybind11"]


def declared() -> dict:
    """pyproject.toml's [project] table, the one list of dependencies."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        from pip._vendor import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def link_distributions(names, site: Path) -> None:
    """Links the installed distributions `names` and everything they require into `site`,
    so that a virtual environment sees them (through a .pth file) and no other package."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # an optional requirement this machine lacks
            continue
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
        for top in {file.parts[0] for file in dist.files or [] if file.parts[0] != ".."}:
            if not (site / top).exists():
                (site / top).symlink_to(dist.locate_file(top))


@pytest.mark.slow
def test_op_only_install_in_a_torch_only_environment(tmp_path):
    source = tmp_path / "source"
    for name in ("csrc", "distillm_ext", "setup.py", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("*.so", "__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    site = tmp_path / "torch_alone"
    site.mkdir()
    link_distributions(["torch", *BUILD_TOOLS], site)
    # --without-pip: no setuptools or pip of its own either, only what the .pth links; this
    # interpreter's pip installs into it (--python).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "torch_alone.pth").write_text(f"{site}\n")

    # --no-index, no pip configuration file or PIP_* variables (no find-links): pip may take
    # nothing from anywhere.
    # --no-deps: the resolver would also re-check torch's own requirements against the links;
    # what distillm_ext itself requires is read from its installed metadata below.
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--disable-pip-version-check",
                              "--no-index", "--no-deps", "--no-build-isolation", str(source)],
                             env={**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
                                  "DISTILLM_CPU_ONLY": "1", "PIP_CONFIG_FILE": os.devnull},
                             cwd=tmp_path, capture_output=True, text=True)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    probe = ("import importlib.util, json, torch, distillm_ext; from importlib import metadata; "
             "print(json.dumps([distillm_ext.__file__, distillm_ext.build_info()['cuda'], "
             "torch.ops.distillm.skew_kl(torch.zeros(2, 5), torch.zeros(2, 5)).item(), "
             "[importlib.util.find_spec(m) is None for m in ('transformers', 'datasets')], "
             "metadata.requires('distillm_ext')]))")
    result = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    location, cuda, loss, absent, requires = json.loads(result.stdout.strip().splitlines()[-1])
    assert location.startswith(str(venv))
    assert cuda is False
    assert loss == 0.0
    assert absent == [True, True], "the torch-only environment must not see transformers or datasets"
    assert [r for r in requires if "extra ==" not in r] == declared()["dependencies"]
    assert any(r.startswith("transformers") and 'extra == "train"' in r for r in requires)
