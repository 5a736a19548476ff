"""skew_kl_topk and its building block _kd_topk_forward (every loss type) against the float64
reference (reference.topk_kd_reference), against the dense losses at K = V, and their
registration (opcheck, torch.compile) and input errors."""

import pytest
import torch

import distillm_ext
from distillm_ext.losses import SparseTeacher, make_loss
from distillm_ext.reference import skew_kl_topk_reference, topk_kd_reference
from conftest import assert_close_to_reference

LOSS_TYPES = ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"]


def sparse_teacher(teacher_logits, k, temperature=1.0, dtype=torch.float32, ids_dtype=torch.int64):
    """The teacher's top-k ids and log-probabilities at temperature T, as a cache stores them."""
    top = torch.log_softmax(teacher_logits.double() / temperature, dim=-1).topk(k, dim=-1)
    return top.indices.to(ids_dtype), top.values.to(dtype)


def make_case(shape, device, k, temperature=1.0, scale=3.0, seed=0, student_dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    ids, log_probs = sparse_teacher(teacher, k, temperature)
    labels = torch.randint(0, 100, shape[:-1], generator=generator)
    labels[torch.rand(shape[:-1], generator=generator) < 0.3] = -100
    return (student.to(device, student_dtype), ids.to(device), log_probs.to(device), labels.to(device))


def loss_and_grad(function, student, *args, **kwargs):
    """Loss, and the gradient of a fixed random weighting of it (so "none" is tested too)."""
    student = student.detach().clone().requires_grad_()
    loss = function(student, *args, **kwargs)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (loss * weights.to(loss.device, loss.dtype)).sum().backward()
    return loss, student.grad


def assert_grad_close(grad, reference_grad, rtol=1e-4):
    """Within rtol of the largest entry of the float64 gradient."""
    scale = reference_grad.abs().max().item()
    error = (grad.double().cpu() - reference_grad.cpu()).abs().max().item()
    assert error <= rtol * scale, (error, rtol * scale)


def rows_with_grad(student, ids, log_probs, labels, loss, temperature=1.0, alpha=0.1, beta=0.5):
    """_kd_topk_forward's per-position loss and the gradient of their sum."""
    return torch.ops.distillm._kd_topk_forward(student, ids, log_probs, labels, loss, alpha, beta, temperature,
                                               -100, True, 1.0)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("k", [1, 8, 301])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_skew_kl_topk_matches_float64_reference(device, reverse, alpha, k, reduction):
    temperature = 2.0
    student, ids, log_probs, labels = make_case((3, 5, 301), device, k, temperature)  # k = 301 = V
    options = dict(alpha=alpha, reverse=reverse, temperature=temperature, reduction=reduction)
    fused, grad = loss_and_grad(distillm_ext.skew_kl_topk, student, ids, log_probs, labels, **options)
    reference, reference_grad = loss_and_grad(skew_kl_topk_reference, student.double(), ids, log_probs.double(),
                                              labels, **options)
    assert fused.dtype == torch.float32 and fused.shape == reference.shape
    assert_close_to_reference(fused, reference, rtol=1e-5)
    assert_grad_close(grad, reference_grad)
    assert (grad[labels == -100] == 0).all(), "ignored positions must get exactly zero gradient"


@pytest.mark.parametrize("loss", LOSS_TYPES)
@pytest.mark.parametrize("k", [1, 8, 257])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_every_loss_type_matches_float64_reference(device, loss, k, temperature):
    student, ids, log_probs, labels = make_case((4, 6, 257), device, k, temperature, seed=k)
    rows, grad = rows_with_grad(student, ids, log_probs, labels, loss, temperature)
    reference, reference_grad = loss_and_grad(topk_kd_reference, student.double(), ids, log_probs.double(), labels,
                                              loss=loss, temperature=temperature, reduction="none")
    # The building block's gradient is of the unweighted sum: compare with the reference's.
    student64 = student.double().requires_grad_()
    topk_kd_reference(student64, ids, log_probs.double(), labels, loss=loss, temperature=temperature,
                      reduction="sum").backward()
    valid = labels != -100
    assert_close_to_reference(rows[valid], reference[valid], rtol=1e-5)
    assert_grad_close(grad, student64.grad)


def test_strided_rows_are_read_in_place(device):
    """`logits[:, :-1]` and a transposed batch: the rows are not contiguous as a whole."""
    student, ids, log_probs, labels = make_case((3, 7, 129), device, 8)
    sliced = student[:, :-1]
    fused, grad = loss_and_grad(distillm_ext.skew_kl_topk, sliced, ids[:, :-1], log_probs[:, :-1], labels[:, :-1])
    reference, reference_grad = loss_and_grad(skew_kl_topk_reference, sliced.double(), ids[:, :-1],
                                              log_probs[:, :-1].double(), labels[:, :-1])
    assert_close_to_reference(fused, reference, rtol=1e-5)
    assert_grad_close(grad, reference_grad)
    transposed = student.transpose(0, 1)
    fused = distillm_ext.skew_kl_topk(transposed, ids.transpose(0, 1), log_probs.transpose(0, 1), reduction="none")
    assert_close_to_reference(fused.transpose(0, 1), distillm_ext.skew_kl_topk(student, ids, log_probs,
                                                                               reduction="none"), rtol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_all_ids_equal_dense_skew_kl(device, reverse, temperature):
    """K = V with exact log-probabilities: the tail is empty and the loss is skew_kl's."""
    generator = torch.Generator().manual_seed(5)
    student = (torch.randn(4, 9, 500, generator=generator) * 3).to(device)
    teacher = (torch.randn(4, 9, 500, generator=generator) * 3).to(device)
    ids, log_probs = sparse_teacher(teacher, 500, temperature)
    options = dict(alpha=0.1, reverse=reverse, temperature=temperature, reduction="none")
    sparse, sparse_grad = loss_and_grad(distillm_ext.skew_kl_topk, student, ids.to(device), log_probs.to(device),
                                        **options)
    dense, dense_grad = loss_and_grad(distillm_ext.skew_kl, student, teacher, **options)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_all_ids_equal_every_dense_loss(device, loss):
    generator = torch.Generator().manual_seed(6)
    student = (torch.randn(5, 300, generator=generator) * 2).to(device)
    teacher = (torch.randn(5, 300, generator=generator) * 2).to(device)
    ids, log_probs = sparse_teacher(teacher, 300)
    rows, _ = rows_with_grad(student, ids.to(device), log_probs.to(device), None, loss)
    dense = make_loss(loss, alpha=0.1, beta=0.5, reduction="none")(student, teacher)
    torch.testing.assert_close(rows, dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gap", [-20.0, 20.0])
def test_tail_masses_near_zero_and_one(device, reverse, gap):
    """gap 20: the student holds all but ~1e-7 of its mass on the kept ids (its tail is tiny);
    gap -20: it holds ~1e-7 there (its tail is ~1). Both tails must keep their digits, which a
    float32 1 - sum(kept) would not. (Far larger gaps leave the float64 reference itself without
    the digits: its tail gradient is then a difference of two nearly equal numbers.)"""
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(6, 400, generator=generator, dtype=torch.float64)
    teacher = torch.randn(6, 400, generator=generator, dtype=torch.float64) * 2
    ids, log_probs = sparse_teacher(teacher, 16)
    student.scatter_add_(1, ids, torch.full(ids.shape, gap, dtype=torch.float64))
    student = student.float().to(device)
    ids, log_probs = ids.to(device), log_probs.to(device)
    for alpha in (0.0, 0.1):
        options = dict(alpha=alpha, reverse=reverse, reduction="sum")
        fused, grad = loss_and_grad(distillm_ext.skew_kl_topk, student, ids, log_probs, **options)
        reference, reference_grad = loss_and_grad(skew_kl_topk_reference, student.double(), ids, log_probs.double(),
                                                  **options)
        assert_close_to_reference(fused, reference, rtol=1e-5)
        assert_grad_close(grad, reference_grad)


@pytest.mark.parametrize("student_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_and_int32_ids(device, student_dtype, teacher_dtype):
    student, ids, log_probs, labels = make_case((2, 5, 211), device, 8, student_dtype=student_dtype)
    ids, log_probs = ids.to(torch.int32), log_probs.to(teacher_dtype)
    fused, grad = loss_and_grad(distillm_ext.skew_kl_topk, student, ids, log_probs, labels)
    reference, reference_grad = loss_and_grad(skew_kl_topk_reference, student.double(), ids, log_probs.double(),
                                              labels)
    assert grad.dtype == student_dtype
    assert_close_to_reference(fused, reference, rtol=1e-5)
    assert_grad_close(grad, reference_grad, rtol=1e-2)  # the gradient is rounded to the student's dtype


def test_masked_student_entries_get_no_gradient(device):
    student, ids, log_probs, labels = make_case((3, 100), device, 4)
    student[:, 90:] = float("-inf")  # padded vocabulary rows
    ids = ids.clamp_max(89)  # not all distinct any more: take ids from the live rows instead
    ids = torch.stack([torch.randperm(90, generator=torch.Generator().manual_seed(i))[:4] for i in range(3)])
    ids = ids.to(device)
    fused, grad = loss_and_grad(distillm_ext.skew_kl_topk, student, ids, log_probs, labels)
    reference, reference_grad = loss_and_grad(skew_kl_topk_reference, student.double(), ids, log_probs.double(),
                                              labels)
    assert_close_to_reference(fused, reference, rtol=1e-5)
    assert (grad[:, 90:] == 0).all()


def test_no_valid_position_and_num_items(device):
    student, ids, log_probs, labels = make_case((2, 4, 50), device, 5)
    none_valid = torch.full_like(labels, -100)
    loss, grad = loss_and_grad(distillm_ext.skew_kl_topk, student, ids, log_probs, none_valid)
    assert loss.item() == 0.0 and (grad == 0).all()
    total = distillm_ext.skew_kl_topk(student, ids, log_probs, labels, reduction="sum")
    per_item = distillm_ext.skew_kl_topk(student, ids, log_probs, labels, num_items=torch.tensor(7.0))
    torch.testing.assert_close(per_item, total / 7.0)


def test_backward_scales_by_the_incoming_gradient(device):
    student, ids, log_probs, labels = make_case((2, 4, 50), device, 5)
    _, once = loss_and_grad(lambda *a: distillm_ext.skew_kl_topk(*a), student, ids, log_probs, labels)
    _, thrice = loss_and_grad(lambda *a: 3.0 * distillm_ext.skew_kl_topk(*a), student, ids, log_probs, labels)
    torch.testing.assert_close(thrice, 3.0 * once)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck(device, reduction):
    student, ids, log_probs, labels = make_case((2, 5, 67), device, 6)
    student.requires_grad_()
    kwargs = dict(alpha=0.1, reverse=True, temperature=2.0, ignore_index=-100, reduction=reduction)
    torch.library.opcheck(torch.ops.distillm.skew_kl_topk.default, (student, ids, log_probs, labels), kwargs)
    torch.library.opcheck(torch.ops.distillm.skew_kl_topk.default, (student, ids.int(), log_probs.half()), kwargs)
    if reduction == "mean":
        torch.library.opcheck(torch.ops.distillm.skew_kl_topk.default, (student, ids, log_probs, labels),
                              dict(kwargs, num_items=torch.tensor(5.0, device=device)))


@pytest.mark.parametrize("compute_grad", [False, True])
@pytest.mark.parametrize("loss", ["skl", "jsd", "tvd"])
def test_opcheck_building_block(device, compute_grad, loss):
    student, ids, log_probs, labels = make_case((2, 5, 67), device, 6)
    args = (student, ids, log_probs, labels, loss, 0.1, 0.5, 1.0, -100, compute_grad)
    torch.library.opcheck(torch.ops.distillm._kd_topk_forward.default, args)


def test_compile_fullgraph_matches_eager(device):
    student, ids, log_probs, labels = make_case((2, 5, 67), device, 6)

    def step(student, ids, log_probs, labels):
        return distillm_ext.skew_kl_topk(student * 1.5, ids, log_probs, labels, alpha=0.2, reverse=True) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_student = student.clone().requires_grad_()
    eager = step(eager_student, ids, log_probs, labels)
    eager.backward()
    compiled_student = student.clone().requires_grad_()
    result = compiled(compiled_student, ids, log_probs, labels)
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(compiled_student.grad, eager_student.grad)


@pytest.mark.parametrize("change, message", [
    (lambda s, i, p: (s, i.float(), p), "teacher_ids must be an integer tensor"),
    (lambda s, i, p: (s, i.clone().fill_(0).add_(torch.arange(i.shape[-1], device=i.device)) + 62, p),
     r"teacher_ids must be in \[0, 67\)"),
    (lambda s, i, p: (s, i.clone().fill_(0).add_(torch.arange(i.shape[-1], device=i.device)) - 1, p),
     r"teacher_ids must be in \[0, 67\)"),
    (lambda s, i, p: (s, i[:1], p[:1]), "teacher_ids must have shape"),
    (lambda s, i, p: (s, i, p[..., :-1]), "teacher_logprobs must have the shape of teacher_ids"),
    (lambda s, i, p: (s, i, p.long()), "teacher_logprobs must be float32, float16 or bfloat16"),
    (lambda s, i, p: (s[..., :5], i, p), "more than the vocabulary"),
    (lambda s, i, p: (s, torch.zeros_like(i), p), "must be distinct"),
])
def test_bad_input_is_a_one_line_error_naming_the_argument(change, message):
    student, ids, log_probs, _ = make_case((2, 5, 67), "cpu", 6)
    student, ids, log_probs = change(student, ids, log_probs)
    with pytest.raises((RuntimeError, ValueError, IndexError), match=message) as error:
        distillm_ext.skew_kl_topk(student, ids, log_probs)
    assert "\n" not in str(error.value).split("\n\nException raised from")[0].strip()


@pytest.mark.parametrize("loss", LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_modules_take_a_sparse_teacher(device, loss, reduction):
    """make_loss's modules accept a SparseTeacher in place of the teacher's logits, with the
    same loss and gradient as the reference."""
    student, ids, log_probs, labels = make_case((3, 4, 120), device, 8, temperature=2.0)
    module = make_loss(loss, alpha=0.1, beta=0.5, temperature=2.0, reduction=reduction)
    fused, grad = loss_and_grad(module, student, SparseTeacher(ids, log_probs), labels)
    reference, reference_grad = loss_and_grad(topk_kd_reference, student.double(), ids, log_probs.double(), labels,
                                              loss=loss, temperature=2.0, reduction=reduction)
    assert_close_to_reference(fused, reference, rtol=1e-5)
    assert_grad_close(grad, reference_grad)
