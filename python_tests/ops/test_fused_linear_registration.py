"""The fused-linear ops' schema, autograd, fake-tensor and AOT registration (opcheck), and
torch.compile(fullgraph=True)."""

import pytest
import torch

import distillm_ext
from test_fused_linear import STUDENT_INPUTS, make_case


def args_of(case):
    names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "labels",
             "student_bias", "teacher_bias")
    return tuple(case.get(name) for name in names)


def with_student_grads(case):
    return {k: v.requires_grad_(k in STUDENT_INPUTS) if v.is_floating_point() else v for k, v in case.items()}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss, kd_ratio", [("skl", 1.0), ("jsd", 0.5), ("tvd", 0.0)])
def test_opcheck_fused_linear_kd(device, reduction, loss, kd_ratio):
    case = with_student_grads(make_case(device, leading=(2, 5)))
    kwargs = dict(loss=loss, kd_ratio=kd_ratio, reduction=reduction, chunk_size=3)
    torch.library.opcheck(torch.ops.distillm.fused_linear_kd.default, args_of(case), kwargs)


def test_opcheck_fused_linear_skew_kl(device):
    case = with_student_grads(make_case(device, leading=(2, 5), bias=False))
    kwargs = dict(alpha=0.2, reverse=True, temperature=2.0)
    torch.library.opcheck(torch.ops.distillm.fused_linear_skew_kl.default, args_of(case), kwargs)


@pytest.mark.parametrize("grad_mask", [(False, False, False), (True, True, True)])
def test_opcheck_forward_building_block(device, grad_mask):
    case = make_case(device, leading=(2, 5))
    args = (*args_of(case), "srkl", 0.1, 0.5, 1.0, 0.5, -100, 4, list(grad_mask), 0.25, None)
    torch.library.opcheck(torch.ops.distillm._fused_linear_kd_forward.default, args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_matches_eager(device, reduction):
    case = make_case(device, leading=(2, 5))

    def step(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias):
        loss, kd, ce = distillm_ext.fused_linear_kd(
            student_hidden * 1.5, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
            teacher_bias, loss="srkl", kd_ratio=0.7, reduction=reduction)
        return (loss * 2.0).sum() + 0 * kd.sum()

    torch._dynamo.reset()
    compiled_case = with_student_grads({k: v.clone() for k, v in case.items()})
    eager_case = with_student_grads(case)
    eager = step(*args_of(eager_case))
    eager.backward()
    compiled = torch.compile(step, fullgraph=True)(*args_of(compiled_case))
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for name in STUDENT_INPUTS:
        torch.testing.assert_close(compiled_case[name].grad, eager_case[name].grad)
