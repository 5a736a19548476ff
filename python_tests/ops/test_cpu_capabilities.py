"""Every CPU copy of the kernels meets the same float64-reference tolerances.

The kernels are compiled once per CPU capability (avx512, avx2, default) and one is chosen per
process: the best this CPU runs, or the one DISTILLM_CPU_CAPABILITY names. The rest of the
suite tests the chosen one; here the op-family tests run again in a subprocess under every
other capability this CPU can run, so an AVX-512 machine tests all three.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import distillm_ext

TESTS = Path(__file__).parent
# The tests of the ops' numbers: values, gradients, edge cases, properties and bad input.
OP_FAMILY_TESTS = ["test_skew_kl.py", "test_properties.py", "test_losses.py",
                   "test_gradient_cache.py", "test_bad_input.py", "test_fused_linear.py",
                   "test_skew_kl_topk.py", "test_fused_linear_topk.py"]
CAPABILITIES = ["avx512", "avx2", "default"]


def run_under(capability, *command):
    env = dict(os.environ, DISTILLM_CPU_CAPABILITY=capability)
    return subprocess.run([sys.executable, *command], cwd=TESTS, env=env, capture_output=True,
                          text=True, timeout=900)


def test_build_info_names_the_active_capability():
    info = distillm_ext.build_info()
    assert info["cpu_capability"] in CAPABILITIES
    assert info["cpu_capability"] in info["cpu_capabilities"]
    assert info["cpu_capabilities"][-1] == "default"  # every CPU runs the baseline
    forced = os.environ.get("DISTILLM_CPU_CAPABILITY")
    if forced:
        assert info["cpu_capability"] == forced
    else:  # the best the CPU runs
        assert info["cpu_capability"] == info["cpu_capabilities"][0]


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_op_family_under_capability(capability):
    info = distillm_ext.build_info()
    if capability not in info["cpu_capabilities"]:
        pytest.skip(f"this CPU or build cannot run the {capability} copy")
    if capability == info["cpu_capability"]:
        pytest.skip(f"{capability} is this process's copy: the rest of the suite tests it")
    active = run_under(capability, "-c", "import distillm_ext; print(distillm_ext.build_info()['cpu_capability'])")
    assert active.returncode == 0, active.stderr
    assert active.stdout.strip() == capability
    result = run_under(capability, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OP_FAMILY_TESTS)
    assert result.returncode == 0, f"under DISTILLM_CPU_CAPABILITY={capability}:\n{result.stdout[-6000:]}"


@pytest.mark.parametrize("value, message", [("sse4", "is not a CPU capability"),
                                            ("AVX2", "is not a CPU capability")])
def test_unknown_capability_is_a_clear_error(value, message):
    result = run_under(value, "-c", "import distillm_ext; distillm_ext.build_info()")
    assert result.returncode != 0
    assert f"DISTILLM_CPU_CAPABILITY={value} {message}; use one of avx512, avx2, default" in result.stderr
