"""Schema, autograd, fake-tensor and AOT registration (opcheck), and torch.compile."""

import pytest
import torch

import distillm_ext
from conftest import DEVICES


def sample_inputs(device, requires_grad=True):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 67, generator=generator).to(device).requires_grad_(requires_grad)
    teacher = torch.randn(2, 5, 67, generator=generator).to(device)
    labels = torch.randint(0, 67, (2, 5), generator=generator).to(device)
    labels[0, :2] = -100
    return student, teacher, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck_skew_kl(device, reduction, reverse):
    student, teacher, labels = sample_inputs(device)
    kwargs = dict(alpha=0.1, reverse=reverse, temperature=2.0, ignore_index=-100, reduction=reduction)
    torch.library.opcheck(torch.ops.distillm.skew_kl.default, (student, teacher, labels), kwargs)
    torch.library.opcheck(torch.ops.distillm.skew_kl.default, (student, teacher), kwargs)
    if reduction == "mean":
        torch.library.opcheck(torch.ops.distillm.skew_kl.default, (student, teacher, labels),
                              dict(kwargs, num_items=torch.tensor(5.0, device=device)))


@pytest.mark.parametrize("compute_grad", [False, True])
def test_opcheck_forward_building_block(device, compute_grad):
    student, teacher, labels = sample_inputs(device, requires_grad=False)
    args = (student, teacher, labels, 0.1, True, 1.0, -100, compute_grad)
    torch.library.opcheck(torch.ops.distillm._skew_kl_forward.default, args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_matches_eager(device, reduction):
    student, teacher, labels = sample_inputs(device)

    def step(student, teacher, labels):
        loss = distillm_ext.skew_kl(student * 1.5, teacher, labels, alpha=0.2, reverse=True,
                                    reduction=reduction)
        return (loss * 2.0).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_student = student.detach().clone().requires_grad_()
    eager_loss = step(eager_student, teacher, labels)
    eager_loss.backward()
    compiled_loss = compiled(student, teacher, labels)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(student.grad, eager_student.grad)


def test_compile_with_num_items_on_the_device(device):
    """Under tracing the denominator is a (fake) tensor, which reaches the kernel as grad_divisor."""
    student, teacher, labels = sample_inputs(device)

    def step(student, teacher, labels, num_items):
        return distillm_ext.skew_kl(student, teacher, labels, num_items=num_items) * 3.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    num_items = torch.tensor(9.0, device=device)
    eager_student = student.detach().clone().requires_grad_()
    eager_loss = step(eager_student, teacher, labels, num_items)
    eager_loss.backward()
    compiled_loss = compiled(student, teacher, labels, num_items)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(student.grad, eager_student.grad)


def test_compile_with_dynamic_shapes(device):
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t: distillm_ext.skew_kl(s, t), fullgraph=True, dynamic=True)
    for rows in (3, 7):
        student = torch.randn(rows, 33, device=device)
        teacher = torch.randn(rows, 33, device=device)
        torch.testing.assert_close(compiled(student, teacher), distillm_ext.skew_kl(student, teacher))


def test_build_info_describes_the_loaded_extension():
    info = distillm_ext.build_info()
    assert set(info) >= {"cuda", "cuda_version", "cuda_archs", "torch_version", "debug"}
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert "9.0" in info["cuda_archs"]


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_cuda_forward_does_not_synchronize():
    student, teacher, labels = sample_inputs("cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = distillm_ext.skew_kl(student, teacher, labels)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_cuda_matches_cpu():
    student, teacher, labels = sample_inputs("cpu")
    for reverse in (False, True):
        cpu = distillm_ext.skew_kl(student, teacher, labels, reverse=reverse, reduction="none")
        gpu = distillm_ext.skew_kl(student.cuda(), teacher.cuda(), labels.cuda(), reverse=reverse,
                                   reduction="none")
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=2e-6, atol=2e-6)


def test_opcheck_forward_building_block_with_a_gradient_divisor(device):
    student, teacher, labels = sample_inputs(device, requires_grad=False)
    divisor = torch.tensor(3.0, device=device)
    args = (student, teacher, labels, 0.1, False, 1.0, -100, True, 2.0, divisor)
    torch.library.opcheck(torch.ops.distillm._skew_kl_forward.default, args)
