"""The CUDA kernel's formulas, checked on the CPU through their host emulation.

No GPU runs here, so the formulas of csrc/skew_kl/skew_kl_gpu_math.h (hardware ex2/lg2/rcp on
base-2 logits, y from logit differences, a polynomial near f = s) are run on the host by
csrc/skew_kl/skew_kl_cuda_emulation.cpp, with every MUFU result moved by its documented
worst-case error, and the kernel's split of rows among threads. DISTILLM_CUDA_EMULATION=<model>
makes the CPU op run it; here the op-family tests run under each error model in a subprocess:
hashed signs (errors that average out), and all up or all down (a bias that cannot).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# The op-family tests whose numbers go through the skew-KL row kernel.
EMULATED_TESTS = ["test_skew_kl.py", "test_properties.py", "test_losses.py", "test_bad_input.py",
                  "test_fused_linear.py"]
ERROR_MODELS = ["hashed", "high", "low"]


def run_emulated(model, *command):
    env = dict(os.environ, DISTILLM_CUDA_EMULATION=model)
    return subprocess.run([sys.executable, *command], cwd=TESTS, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("model", ERROR_MODELS)
def test_op_family_under_the_cuda_formulas(model):
    result = run_emulated(model, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EMULATED_TESTS)
    assert result.returncode == 0, f"under DISTILLM_CUDA_EMULATION={model}:\n{result.stdout[-6000:]}"


ROWS_AT_EVERY_ALIGNMENT = """
import torch, distillm_ext
from distillm_ext.reference import skew_kl_reference
generator = torch.Generator().manual_seed(0)
# bf16 rows starting at every offset from a 16-byte boundary (V = 50257 is odd), so the kernel's
# peeled head takes 0 to 7 entries; the emulation differs from the CPU kernel, and both from
# float64 by float rounding only.
full = (torch.randn(2, 8 * 50257 + 8, generator=generator) * 3).bfloat16()
for reverse in (False, True):
    for offset in range(8):
        student = full[0, offset:offset + 8 * 50257].view(8, 50257)
        teacher = full[1, offset:offset + 8 * 50257].view(8, 50257)
        student64, teacher64 = student.double().requires_grad_(), teacher.double()
        reference = skew_kl_reference(student64, teacher64, alpha=0.1, reverse=reverse, reduction="none")
        reference.sum().backward()
        leaf = student.detach().clone().requires_grad_()
        loss = distillm_ext.skew_kl(leaf, teacher, alpha=0.1, reverse=reverse, reduction="none")
        loss.sum().backward()
        assert (loss.double() - reference).abs().max() <= 1e-5 * reference.abs().max(), (reverse, offset)
        grad_error = (leaf.grad.double() - student64.grad).abs().max()
        assert grad_error <= 1e-2 * student64.grad.abs().max(), (reverse, offset, grad_error)
"""


def test_rows_at_every_alignment():
    result = run_emulated("hashed", "-c", ROWS_AT_EVERY_ALIGNMENT)
    assert result.returncode == 0, result.stderr[-4000:]


def test_emulation_is_what_runs():
    """The emulated numbers differ from the CPU kernel's (by rounding), so the variable is honored."""
    script = ("import torch, distillm_ext; g = torch.Generator().manual_seed(0); "
              "s, t = torch.randn(4, 1000, generator=g) * 3, torch.randn(4, 1000, generator=g) * 3; "
              "print(repr(distillm_ext.skew_kl(s, t, reduction='none').tolist()))")
    emulated = run_emulated("high", "-c", script)
    native = run_emulated("", "-c", script)
    assert emulated.returncode == 0 and native.returncode == 0, emulated.stderr + native.stderr
    assert emulated.stdout != native.stdout


def test_unknown_error_model_is_a_clear_error():
    result = run_emulated("exact", "-c", "import torch, distillm_ext; distillm_ext.skew_kl(torch.zeros(1, 3), torch.zeros(1, 3))")
    assert result.returncode != 0
    assert "DISTILLM_CUDA_EMULATION=exact is not an error model; use one of hashed, high, low" in result.stderr


def test_kernel_reads_the_gradient_divisor():
    """On CUDA the mean's count reaches the kernel as a device scalar it reads per row; the
    emulation reads it the same way (the CPU kernels fold it on the host instead)."""
    script = """
import torch, distillm_ext
generator = torch.Generator().manual_seed(0)
student, teacher = torch.randn(2, 6, 300, generator=generator) * 3, torch.randn(2, 6, 300, generator=generator) * 3
labels = torch.tensor([[1, -100, 2, 3, -100, 4], [5, 6, -100, 7, 8, 9]])
forward = torch.ops.distillm._skew_kl_forward
for reverse in (False, True):
    loss, grad = forward(student, teacher, labels, 0.1, reverse, 1.0, -100, True, 1.0)
    divided_loss, divided = forward(student, teacher, labels, 0.1, reverse, 1.0, -100, True, 2.0, torch.tensor(8.0))
    torch.testing.assert_close(divided_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(divided, 0.25 * grad, rtol=1e-6, atol=1e-9)
"""
    result = run_emulated("hashed", "-c", script)
    assert result.returncode == 0, result.stderr[-4000:]


def test_rows_beyond_32_bit_indices_are_a_clear_error():
    """The kernel indexes a row with 32 bits; a larger row is refused before any entry is read
    (torch.empty touches no memory, so the 2 GiB row costs nothing)."""
    script = ("import torch, distillm_ext; s = torch.empty(1, (1 << 30) + 1, dtype=torch.bfloat16); "
              "distillm_ext.skew_kl(s, s, reduction='sum')")
    result = run_emulated("hashed", "-c", script)
    assert result.returncode != 0
    assert "the CUDA kernel takes at most 2^30 vocabulary entries, got 1073741825" in result.stderr
