"""torch.ops.distillm.fused_linear_kd_topk against the float64 reference that materializes the
student's logits (reference.fused_linear_kd_topk_reference): every loss type, K in {1, 8, V},
CE, biases, chunking, ignored positions; at K = V against fused_linear_kd; registration and
bad input."""

import pytest
import torch

import distillm_ext
from distillm_ext.reference import fused_linear_kd_topk_reference
from conftest import assert_close_to_reference

LOSS_TYPES = ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"]
VOCAB = 61
STUDENT_INPUTS = ("student_hidden", "student_weight", "student_bias")


def make_case(device, k, dtype=torch.float32, leading=(3, 11), hs=24, ht=40, temperature=1.0, bias=True, seed=0):
    """A student (hidden states, output embedding, bias) and a teacher's top-k at temperature T,
    logits spread like a trained model's (std ~3); labels with prompt/padding positions. Also
    returns the teacher's dense inputs, for fused_linear_kd."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale

    teacher = dict(teacher_hidden=randn(*leading, ht), teacher_weight=randn(VOCAB, ht, scale=3 / ht**0.5))
    top = torch.log_softmax(teacher["teacher_hidden"] @ teacher["teacher_weight"].T / temperature, -1).topk(k, -1)
    case = dict(student_hidden=randn(*leading, hs), student_weight=randn(VOCAB, hs, scale=3 / hs**0.5))
    if bias:
        case["student_bias"] = randn(VOCAB, scale=0.5)
    case = {name: value.to(device, dtype) for name, value in case.items()}
    labels = torch.randint(0, VOCAB, leading, generator=g)
    labels[torch.rand(leading, generator=g) < 0.3] = -100
    case.update(teacher_ids=top.indices.to(device), teacher_logprobs=top.values.float().to(device),
                labels=labels.to(device))
    return case, {name: value.to(device, dtype) for name, value in teacher.items()}


def loss_and_grads(function, case, **kwargs):
    case = {k: (v.detach().clone().requires_grad_(k in STUDENT_INPUTS) if v.is_floating_point() else v)
            for k, v in case.items()}
    loss, kd, ce = function(**case, **kwargs)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (loss * weights.to(loss.device, loss.dtype)).sum().backward()
    return loss, kd, ce, {k: case[k].grad for k in STUDENT_INPUTS if k in case}


def assert_matches_reference(case, grad_rtol=1e-4, **kwargs):
    loss, kd, ce, grads = loss_and_grads(distillm_ext.fused_linear_kd_topk, case, **kwargs)
    as64 = {k: v.double() if v.is_floating_point() else v for k, v in case.items()}
    ref_loss, ref_kd, ref_ce, ref_grads = loss_and_grads(fused_linear_kd_topk_reference, as64, **kwargs)
    for actual, expected in [(loss, ref_loss), (kd, ref_kd), (ce, ref_ce)]:
        assert actual.dtype == torch.float32
        assert_close_to_reference(actual, expected, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        error = (grad.double().cpu() - ref_grads[name].cpu()).abs().max().item()
        assert error <= grad_rtol * scale, (name, error, scale)


@pytest.mark.parametrize("loss", LOSS_TYPES)
@pytest.mark.parametrize("k", [1, 8, VOCAB])
def test_every_loss_type_matches_float64_reference(device, loss, k):
    case, _ = make_case(device, k, temperature=2.0, seed=k)
    assert_matches_reference(case, loss=loss, temperature=2.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kd_ratio", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("chunk_size", [0, 4])
def test_reductions_cross_entropy_and_chunks(device, reduction, kd_ratio, chunk_size):
    case, _ = make_case(device, 8)
    assert_matches_reference(case, loss="srkl", kd_ratio=kd_ratio, reduction=reduction, chunk_size=chunk_size)


def test_without_labels_or_bias(device):
    case, _ = make_case(device, 8, bias=False)
    del case["labels"]
    assert_matches_reference(case, loss="skl")


@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_all_ids_equal_fused_linear_kd(device, loss):
    """K = V with exact log-probabilities: fused_linear_kd's loss and gradients."""
    case, teacher = make_case(device, VOCAB, temperature=1.5)
    sparse = loss_and_grads(distillm_ext.fused_linear_kd_topk, case, loss=loss, temperature=1.5, kd_ratio=0.7)
    dense_case = {k: v for k, v in case.items() if not k.startswith("teacher_")}
    dense = loss_and_grads(distillm_ext.fused_linear_kd, dict(dense_case, **teacher), loss=loss, temperature=1.5,
                           kd_ratio=0.7)
    for actual, expected in zip(sparse[:3], dense[:3]):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for name in sparse[3]:
        torch.testing.assert_close(sparse[3][name], dense[3][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_student(device, dtype):
    case, _ = make_case(device, 8, dtype=dtype)
    loss, kd, _, grads = loss_and_grads(distillm_ext.fused_linear_kd_topk, case)
    as64 = {k: v.double() if v.is_floating_point() else v for k, v in case.items()}
    ref_loss, *_ = loss_and_grads(fused_linear_kd_topk_reference, as64)
    assert_close_to_reference(loss, ref_loss, rtol=1e-4)
    assert grads["student_weight"].dtype == dtype


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(device, reduction):
    case, _ = make_case(device, 6)
    for name in STUDENT_INPUTS:
        case[name].requires_grad_()
    args = tuple(case[name] for name in ("student_hidden", "student_weight", "teacher_ids", "teacher_logprobs",
                                         "labels", "student_bias"))
    kwargs = dict(loss="jsd", kd_ratio=0.5, reduction=reduction, chunk_size=8)
    torch.library.opcheck(torch.ops.distillm.fused_linear_kd_topk.default, args, kwargs)


def test_opcheck_building_block(device):
    case, _ = make_case(device, 6)
    args = (case["student_hidden"], case["student_weight"], case["teacher_ids"], case["teacher_logprobs"],
            case["labels"], case["student_bias"], "skl", 0.1, 0.5, 1.0, 0.5, -100, 0, [True, True, True], 1.0, None)
    torch.library.opcheck(torch.ops.distillm._fused_linear_kd_topk_forward.default, args)


def test_compile_fullgraph_matches_eager(device):
    case, _ = make_case(device, 6)

    def step(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels, student_bias):
        loss, kd, ce = distillm_ext.fused_linear_kd_topk(student_hidden * 1.5, student_weight, teacher_ids,
                                                         teacher_logprobs, labels, student_bias, kd_ratio=0.5)
        return loss * 2.0

    names = ("student_hidden", "student_weight", "teacher_ids", "teacher_logprobs", "labels", "student_bias")
    torch._dynamo.reset()
    results = []
    for function in (step, torch.compile(step, fullgraph=True)):
        inputs = {k: (case[k].clone().requires_grad_() if k in STUDENT_INPUTS else case[k]) for k in names}
        loss = function(**inputs)
        loss.backward()
        results.append((loss, [inputs[k].grad for k in STUDENT_INPUTS]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for compiled, eager in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("change, message", [
    (dict(teacher_ids=lambda t: t.float()), "fused_linear_kd_topk: teacher_ids must be an integer tensor"),
    (dict(teacher_ids=lambda t: t + VOCAB), r"teacher_ids must be in \[0, 61\)"),
    (dict(teacher_ids=lambda t: t[:1], teacher_logprobs=lambda t: t[:1]), "teacher_ids must have shape"),
    (dict(teacher_logprobs=lambda t: t[..., :-1]), "teacher_logprobs must have the shape"),
    (dict(student_weight=lambda t: t[:4], student_bias=lambda t: t[:4]), "more than the vocabulary"),
])
def test_bad_input_names_the_argument(change, message):
    case, _ = make_case("cpu", 6)
    for name, function in change.items():
        case[name] = function(case[name])
    with pytest.raises((RuntimeError, ValueError, IndexError), match=message):
        distillm_ext.fused_linear_kd_topk(**case)
