"""torch.ops.distillm.skew_kl against the float64 reference: values, gradients, edge cases."""

import math

import pytest
import torch

import distillm_ext
from distillm_ext.reference import skew_kl_reference
from conftest import assert_close_to_reference


def make_inputs(shape, device, dtype=torch.float32, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale)
    teacher = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale)
    return student.to(device=device, dtype=dtype), teacher.to(device=device, dtype=dtype)


def make_labels(leading_shape, device, ignore_fraction=0.3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 100, leading_shape, generator=generator)
    labels[torch.rand(leading_shape, generator=generator) < ignore_fraction] = -100
    return labels.to(device)


def loss_and_grad(function, student, teacher, labels, **kwargs):
    """Loss, and the gradient of a fixed random weighting of it (so "none" is tested too)."""
    student = student.detach().clone().requires_grad_()
    loss = function(student, teacher, labels, **kwargs)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (loss * weights.to(loss.device, loss.dtype)).sum().backward()
    return loss, student.grad


def run_both(student, teacher, labels=None, **kwargs):
    """(fused loss, fused grad, float64 reference loss, reference grad)."""
    fused, grad = loss_and_grad(distillm_ext.skew_kl, student, teacher, labels, **kwargs)
    reference, reference_grad = loss_and_grad(skew_kl_reference, student.double(), teacher.double(),
                                              labels, **kwargs)
    return fused, grad, reference, reference_grad


def assert_grad_close(grad, reference_grad, student, teacher, labels=None, rtol=1e-5, **kwargs):
    """Within rtol of the float64 gradient at its scale, or within 3x the error of the float32
    PyTorch reference where float32 itself cannot do better: an SRKL gradient near the mode of
    a sharp q is q (g - G) with g and G equal to ~5 digits, so one rounding of g (1 ulp of ~2)
    is already ~1e-2 of it; PyTorch float32 errs by up to 1e-4 of the scale there too."""
    _, float32_grad = loss_and_grad(skew_kl_reference, student.float(), teacher.float(), labels, **kwargs)
    scale = reference_grad.abs().max().item()
    float32_error = (float32_grad.double() - reference_grad).abs().max().item()
    error = (grad.double() - reference_grad).abs().max().item()
    assert error <= max(rtol * scale, 3 * float32_error), (error, rtol * scale, float32_error)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(device, reverse, alpha, temperature, reduction):
    student, teacher = make_inputs((3, 5, 1001), device)  # odd V: not a multiple of any vector width
    labels = make_labels((3, 5), device)
    options = dict(alpha=alpha, reverse=reverse, temperature=temperature, reduction=reduction)
    fused, grad, reference, reference_grad = run_both(student, teacher, labels, **options)
    assert fused.dtype == torch.float32
    assert fused.shape == reference.shape
    assert_close_to_reference(fused, reference, rtol=1e-5)
    assert_grad_close(grad, reference_grad, student, teacher, labels, **options)
    ignored = labels == -100
    assert (grad[ignored] == 0).all(), "ignored positions must get exactly zero gradient"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_backward_of_a_scalar_loss(device, reduction):
    """`loss.backward()`, an incoming gradient of exactly 1: on CPU the kernel writes the mean's
    1/count itself and the backward leaves the gradient as it is; the result must not change."""
    student, teacher = make_inputs((4, 6, 333), device)
    labels = make_labels((4, 6), device)
    fused_student = student.clone().requires_grad_()
    distillm_ext.skew_kl(fused_student, teacher, labels, reverse=True, reduction=reduction).backward()
    reference_student = student.double().requires_grad_()
    skew_kl_reference(reference_student, teacher.double(), labels, reverse=True, reduction=reduction).backward()
    assert_close_to_reference(fused_student.grad, reference_student.grad, rtol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.9])
def test_neg_inf_columns_are_dropped(device, reverse, alpha):
    student, teacher = make_inputs((6, 131), device)
    student[:, 7] = -math.inf          # banned for the student only
    teacher[:, 11] = -math.inf         # banned for the teacher only
    student[:, 100:] = -math.inf       # vocabulary padding, both
    teacher[:, 100:] = -math.inf
    fused, grad, reference, reference_grad = run_both(student, teacher, alpha=alpha, reverse=reverse,
                                                      reduction="none")
    assert torch.isfinite(fused).all()
    assert_close_to_reference(fused, reference, rtol=1e-5)
    assert_close_to_reference(grad, reference_grad, rtol=1e-5)
    assert (grad[:, 100:] == 0).all() and (grad[:, 7] == 0).all()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_extreme_logits_stay_finite_and_correct(device, reverse, alpha):
    student, teacher = make_inputs((4, 257), device, scale=1e4)
    fused, grad, reference, reference_grad = run_both(student, teacher, alpha=alpha, reverse=reverse,
                                                      reduction="none")
    assert torch.isfinite(fused).all() and torch.isfinite(grad).all()
    assert_close_to_reference(fused, reference, rtol=1e-5)
    # One-hot distributions: the true gradient is ~1e-31, so hold it to the scale of O(1).
    assert_close_to_reference(grad, reference_grad, rtol=1e-5, min_scale=1.0)


@pytest.mark.parametrize("vocab", [1, 2, 7, 33, 262_144])
def test_vocabulary_sizes(device, vocab):
    student, teacher = make_inputs((2, vocab), device)
    fused, grad, reference, reference_grad = run_both(student, teacher, reverse=True)
    assert_close_to_reference(fused, reference, rtol=1e-5, min_scale=1e-6)  # V = 1: loss 0
    assert_close_to_reference(grad, reference_grad, rtol=1e-5, min_scale=1e-6)


def test_identical_distributions_give_zero(device):
    student, _ = make_inputs((4, 50), device)
    for reverse in (False, True):
        loss = distillm_ext.skew_kl(student, student.clone(), reverse=reverse, reduction="none")
        assert loss.abs().max().item() < 1e-6


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.9])
def test_nearly_equal_distributions_keep_their_small_loss(device, alpha):
    """Between nearly equal distributions the loss (~2e-6) is a sum of terms that cancel, and
    any rounding of the softmax denominators enters it whole. Plain float sums of the exps erred
    by up to 3.5e-7 here (PyTorch float32: 5e-7); compensated ones stay near 1e-7."""
    worst = 0.0
    for seed in range(10):
        student, teacher = make_inputs((8, 1001), device, scale=1e-3, seed=seed)
        for reverse in (False, True):
            options = dict(alpha=alpha, reverse=reverse, temperature=0.7, reduction="none")
            fused = distillm_ext.skew_kl(student, teacher, **options)
            reference = skew_kl_reference(student.double(), teacher.double(), **options)
            worst = max(worst, (fused.double() - reference).abs().max().item())
    assert worst < 2e-7, worst


def test_loss_is_non_negative(device):
    student, teacher = make_inputs((64, 300), device, scale=10.0)
    for reverse in (False, True):
        assert (distillm_ext.skew_kl(student, teacher, reverse=reverse, reduction="none") >= -1e-6).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_valid_position_gives_zero_loss_and_gradient(device, reduction):
    student, teacher = make_inputs((2, 3, 40), device)
    student.requires_grad_()
    labels = torch.full((2, 3), -100, device=device)
    loss = distillm_ext.skew_kl(student, teacher, labels, reduction=reduction)
    assert (loss == 0).all()
    loss.sum().backward()
    assert (student.grad == 0).all()


def test_zero_rows_give_zero_loss(device):
    student = torch.zeros((0, 17), device=device, requires_grad=True)
    teacher = torch.zeros((0, 17), device=device)
    loss = distillm_ext.skew_kl(student, teacher)
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad.shape == (0, 17)
    assert distillm_ext.skew_kl(student, teacher, reduction="none").shape == (0,)


def test_nan_is_not_hidden(device):
    student, teacher = make_inputs((3, 20), device)
    student[1, 4] = math.nan
    teacher[2, 9] = math.nan
    per_row = distillm_ext.skew_kl(student, teacher, reduction="none")
    assert not torch.isnan(per_row[0]) and torch.isnan(per_row[1]) and torch.isnan(per_row[2])
    for reverse in (False, True):
        assert torch.isnan(distillm_ext.skew_kl(student, teacher, reverse=reverse))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("nan_side", ["student", "teacher"])
def test_all_nan_row_gives_nan_loss_and_gradient(device, reverse, nan_side):
    """A row of NaN leaves the row maximum at -inf, like an all -inf (dropped) row; it must not
    be dropped. (A diverged model produces exactly such rows.)"""
    student, teacher = make_inputs((3, 37), device)
    (student if nan_side == "student" else teacher)[1] = math.nan
    student.requires_grad_(True)
    per_row = distillm_ext.skew_kl(student, teacher, reverse=reverse, reduction="none")
    assert torch.isfinite(per_row[[0, 2]]).all() and torch.isnan(per_row[1])
    per_row[[0, 2]].sum().backward()
    assert torch.isfinite(student.grad[[0, 2]]).all() and torch.isnan(student.grad[1]).all()
    all_dropped = torch.full((1, 37), -math.inf, device=device)
    assert distillm_ext.skew_kl(all_dropped, teacher[:1], reverse=reverse).item() == 0.0


def test_sliced_logits_are_read_in_place(device):
    """`logits[:, :-1]` of a (B, T, V) output: same values as a contiguous copy, and no copy made."""
    student_full, teacher_full = make_inputs((3, 9, 4099), device)
    student, teacher = student_full[:, :-1], teacher_full[:, 1:]
    assert not student.is_contiguous()
    labels = make_labels((3, 8), device)
    fused, grad, reference, reference_grad = run_both(student, teacher, labels)
    assert_close_to_reference(fused, reference, rtol=1e-5)
    assert_close_to_reference(grad, reference_grad, rtol=1e-5)
    if device == "cpu":
        with torch.autograd.profiler.profile(profile_memory=True) as prof:
            torch.ops.distillm._skew_kl_forward(student, teacher, None, 0.1, False, 1.0, -100, False)
        allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.function_events)
        assert allocated < student.numel() * student.element_size() // 4


def test_mixed_precision_inputs_match_reference(device):
    student, teacher = make_inputs((4, 7, 515), device)
    for student_dtype, teacher_dtype in [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                         (torch.float16, torch.bfloat16)]:
        s, t = student.to(student_dtype), teacher.to(teacher_dtype)
        fused = distillm_ext.skew_kl(s, t, reduction="none")
        reference = skew_kl_reference(s.double(), t.double(), reduction="none")
        assert_close_to_reference(fused, reference, rtol=1e-5)  # float32 math on the rounded inputs


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_pytorch_error(device, reverse, dtype):
    """|fused - ref64| <= 2 |plain PyTorch in the same dtype - ref64| + atol, for loss and gradient."""
    student, teacher = make_inputs((8, 16, 2003), device, dtype=dtype)
    labels = make_labels((8, 16), device)
    fused, grad, reference, reference_grad = run_both(student, teacher, labels, reverse=reverse)
    plain, plain_grad = loss_and_grad(skew_kl_reference, student, teacher, labels, reverse=reverse,
                                      compute_dtype=dtype)  # same loss weighting as run_both
    assert grad.dtype == dtype
    loss_error = (fused.double().cpu() - reference.cpu()).abs().item()
    plain_loss_error = (plain.double().cpu() - reference.cpu()).abs().item()
    assert loss_error <= 2 * plain_loss_error + 1e-6
    grad_error = (grad.double() - reference_grad).abs()
    plain_grad_error = (plain_grad.double() - reference_grad).abs()
    scale = reference_grad.abs().max().item()
    assert (grad_error <= 2 * plain_grad_error + 1e-2 * scale).all()


def test_large_row_offsets_use_64_bit_indexing():
    """Row offsets past 2**31 elements: a strided view into a sparse, untouched allocation."""
    vocab, row_stride = 4096, 2**31 + 4096
    storage = torch.empty(row_stride + vocab, dtype=torch.bfloat16)  # pages never touched stay virtual
    student = storage.as_strided((2, vocab), (row_stride, 1))
    source, teacher = make_inputs((2, vocab), "cpu", dtype=torch.bfloat16)
    student.copy_(source)
    fused = distillm_ext.skew_kl(student, teacher, reduction="none")
    reference = skew_kl_reference(source.double(), teacher.double(), reduction="none")
    assert_close_to_reference(fused, reference, rtol=1e-5)


def test_teacher_gets_no_gradient(device):
    student, teacher = make_inputs((3, 30), device)
    student.requires_grad_()
    teacher.requires_grad_()
    distillm_ext.skew_kl(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_no_grad_and_inference_mode_give_the_same_loss(device):
    student, teacher = make_inputs((5, 61), device)
    student.requires_grad_()
    with_grad = distillm_ext.skew_kl(student, teacher)
    with torch.no_grad():
        no_grad = distillm_ext.skew_kl(student, teacher)
    with torch.inference_mode():
        inference = distillm_ext.skew_kl(student, teacher)
    assert with_grad.item() == no_grad.item() == inference.item()


def test_second_backward_through_the_same_graph_is_a_clear_error(device):
    student, teacher = make_inputs((3, 30), device)
    student.requires_grad_()
    loss = distillm_ext.skew_kl(student, teacher)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


def test_double_backward_is_a_clear_error(device):
    student, teacher = make_inputs((3, 30), device)
    student.requires_grad_()
    loss = distillm_ext.skew_kl(student, teacher)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, student, create_graph=True)


def test_backward_scales_by_the_incoming_gradient(device):
    student, teacher = make_inputs((4, 33), device)
    labels = make_labels((4,), device, ignore_fraction=0.25)
    grads = []
    for factor in (1.0, -2.5):
        s = student.clone().requires_grad_()
        (factor * distillm_ext.skew_kl(s, teacher, labels)).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[1], -2.5 * grads[0])


@pytest.mark.parametrize("reverse", [False, True])
def test_gradient_divisor_is_applied_by_the_kernel(device, reverse):
    """grad_divisor (a one-element tensor; a mean's count on CUDA, read by the kernel) divides
    the gradient as grad_scale multiplies it, and leaves the loss alone."""
    student, teacher = make_inputs((6, 97), device)
    labels = make_labels((6,), device)
    forward = torch.ops.distillm._skew_kl_forward
    loss, grad = forward(student, teacher, labels, 0.1, reverse, 0.7, -100, True, 1.0)
    divided_loss, divided = forward(student, teacher, labels, 0.1, reverse, 0.7, -100, True, 3.0,
                                    torch.tensor(4.0, device=device))
    torch.testing.assert_close(divided_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(divided, 0.75 * grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("divisor, message", [
    (torch.tensor(2.0, dtype=torch.float64), "grad_divisor must be one float32 element"),
    (torch.tensor([2.0, 3.0]), "grad_divisor must be one float32 element"),
])
def test_bad_gradient_divisor_is_a_clear_error(divisor, message):
    student, teacher = make_inputs((2, 5), "cpu")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.distillm._skew_kl_forward(student, teacher, None, 0.1, False, 1.0, -100, True, 1.0, divisor)



@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_is_the_mean_denominator(device, as_tensor):
    """mean with num_items = N is the sum over positions over N, in value and gradient: the
    denominator of a mean over every micro-batch and rank."""
    student, teacher = make_inputs((3, 5, 40), device)
    labels = make_labels((3, 5), device)
    num_items = torch.tensor(23.0, device=device) if as_tensor else 23
    mean, mean_grad = loss_and_grad(distillm_ext.skew_kl, student, teacher, labels, num_items=num_items)
    total, total_grad = loss_and_grad(distillm_ext.skew_kl, student, teacher, labels, reduction="sum")
    torch.testing.assert_close(mean, total / 23, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean_grad, total_grad / 23, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    (dict(reduction="sum", num_items=4), "num_items is the denominator of reduction='mean'"),
    (dict(num_items=torch.tensor([2.0, 3.0])), "num_items must be one real number"),
])
def test_bad_num_items_is_a_clear_error(kwargs, message):
    student, teacher = make_inputs((2, 5), "cpu")
    with pytest.raises(ValueError, match=message):
        distillm_ext.skew_kl(student, teacher, **kwargs)
