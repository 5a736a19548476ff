"""torch.ops.distillm.fused_linear_kd / fused_linear_skew_kl against the float64 reference that
materializes the logits: values and the three gradients, every loss type, CE, padded
vocabularies, biases, chunking, ignored positions, bad input, and the op's registrations."""

import pytest
import torch

import distillm_ext
from distillm_ext.reference import fused_linear_kd_reference, jsd_reference
from conftest import assert_close_to_reference

LOSS_TYPES = ["fkl", "rkl", "skl", "srkl", "jsd", "tvd"]
VOCAB = 61  # shared rows; the student's weight has 5 more (a vocabulary padded further)


def make_case(device, dtype=torch.float32, leading=(3, 11), hs=24, ht=40, student_extra=5, bias=True,
              ignore_fraction=0.3, seed=0):
    """Hidden states, weights and biases scaled so that the logits spread like a trained
    model's (std ~3), and labels with prompt/padding positions."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    case = dict(student_hidden=randn(*leading, hs), student_weight=randn(VOCAB + student_extra, hs, scale=3 / hs**0.5),
                teacher_hidden=randn(*leading, ht), teacher_weight=randn(VOCAB, ht, scale=3 / ht**0.5))
    if bias:
        case["student_bias"] = randn(VOCAB + student_extra, scale=0.5)
        case["teacher_bias"] = randn(VOCAB, scale=0.5)
    labels = torch.randint(0, VOCAB, leading, generator=g)
    labels[torch.rand(leading, generator=g) < ignore_fraction] = -100
    case["labels"] = labels.to(device)
    return case


STUDENT_INPUTS = ("student_hidden", "student_weight", "student_bias")


def loss_and_grads(function, case, **kwargs):
    """(loss, kd, ce, gradients of a fixed random weighting of loss) for the student's inputs."""
    case = {k: (v.detach().clone().requires_grad_(k in STUDENT_INPUTS) if v.is_floating_point() else v)
            for k, v in case.items()}
    loss, kd, ce = function(**case, **kwargs)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (loss * weights.to(loss.device, loss.dtype)).sum().backward()
    return loss, kd, ce, {k: case[k].grad for k in STUDENT_INPUTS if k in case}


def as_float64(case):
    return {k: v.double() if v.is_floating_point() else v for k, v in case.items()}


def assert_matches_reference(case, rtol=2e-5, **kwargs):
    loss, kd, ce, grads = loss_and_grads(distillm_ext.fused_linear_kd, case, **kwargs)
    ref_loss, ref_kd, ref_ce, ref_grads = loss_and_grads(fused_linear_kd_reference, as_float64(case), **kwargs)
    for actual, expected in [(loss, ref_loss), (kd, ref_kd), (ce, ref_ce)]:
        assert actual.dtype == torch.float32
        assert_close_to_reference(actual, expected, rtol=rtol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == case[name].dtype and grad.shape == case[name].shape
        assert_close_to_reference(grad, ref_grads[name], rtol=rtol)


@pytest.mark.parametrize("loss", LOSS_TYPES)
@pytest.mark.parametrize("kd_ratio", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(device, loss, kd_ratio, reduction):
    assert_matches_reference(make_case(device), loss=loss, kd_ratio=kd_ratio, reduction=reduction, chunk_size=8)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.9])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_skew_settings_match_reference(device, alpha, temperature):
    for loss in ("skl", "srkl"):
        assert_matches_reference(make_case(device, bias=False), loss=loss, alpha=alpha, temperature=temperature)


def test_jsd_beta_matches_reference(device):
    assert_matches_reference(make_case(device), loss="jsd", beta=0.2, kd_ratio=0.5)


@pytest.mark.parametrize("reverse", [False, True])
def test_fused_linear_skew_kl_equals_skew_kl_of_the_logits(device, reverse):
    case = make_case(device)
    z = case["student_hidden"] @ case["student_weight"][:VOCAB].T + case["student_bias"][:VOCAB]
    u = case["teacher_hidden"] @ case["teacher_weight"].T + case["teacher_bias"]
    kwargs = dict(alpha=0.2, reverse=reverse, temperature=1.5)
    expected = distillm_ext.skew_kl(z, u, case["labels"], **kwargs)
    actual = distillm_ext.fused_linear_skew_kl(**case, **kwargs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_chunk_size_does_not_change_the_result(device):
    case = make_case(device, leading=(50,))
    results = [loss_and_grads(distillm_ext.fused_linear_kd, case, loss="jsd", kd_ratio=0.5, chunk_size=chunk)
               for chunk in (0, 1, 7, 50, 1000)]
    for loss, kd, ce, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][3][name], rtol=1e-5, atol=1e-7)


def test_ignored_positions_are_never_multiplied(device):
    """NaN hidden states at ignored positions change nothing: those rows are skipped before any
    matmul (had they entered a GEMM, NaN would spread through the weight gradient)."""
    case = make_case(device)
    poisoned = dict(case)
    ignored = case["labels"] == -100
    for name in ("student_hidden", "teacher_hidden"):
        poisoned[name] = case[name].masked_fill(ignored.unsqueeze(-1), float("nan"))
    loss, _, _, grads = loss_and_grads(distillm_ext.fused_linear_kd, poisoned, kd_ratio=0.5)
    clean_loss, _, _, clean_grads = loss_and_grads(distillm_ext.fused_linear_kd, case, kd_ratio=0.5)
    torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, clean_grads[name], rtol=0, atol=0)
    assert (grads["student_hidden"][ignored] == 0).all()


def test_padding_rows_of_the_student_weight_get_zero_gradient(device):
    _, _, _, grads = loss_and_grads(distillm_ext.fused_linear_kd, make_case(device), kd_ratio=0.5)
    assert grads["student_weight"][:VOCAB].abs().sum() > 0
    assert (grads["student_weight"][VOCAB:] == 0).all() and (grads["student_bias"][VOCAB:] == 0).all()


def test_without_labels_every_position_counts(device):
    case = make_case(device)
    del case["labels"]
    assert_matches_reference(case, loss="srkl")


def test_all_positions_ignored_gives_zero(device):
    case = make_case(device, ignore_fraction=1.0)
    loss, kd, ce, grads = loss_and_grads(distillm_ext.fused_linear_kd, case, kd_ratio=0.5)
    assert loss.item() == 0 and kd.item() == 0 and ce.item() == 0
    assert all((grad == 0).all() for grad in grads.values())


def test_only_the_requested_gradients_are_computed(device):
    case = make_case(device)
    weight = case["student_weight"].requires_grad_()
    (grad,) = torch.autograd.grad(distillm_ext.fused_linear_skew_kl(**case), weight)
    every = {k: v.detach().requires_grad_(k in STUDENT_INPUTS) for k, v in case.items() if k != "labels"}
    every_grads = torch.autograd.grad(distillm_ext.fused_linear_skew_kl(**every, labels=case["labels"]),
                                      [every[k] for k in STUDENT_INPUTS])
    torch.testing.assert_close(grad, every_grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_not_rounded(device, dtype):
    """Low-precision inputs, float32 logits: the loss and gradients match the float64 reference
    of the same (rounded) inputs far better than logits rounded to the input dtype would
    (Liger-Kernel#1432: 4-23% gradient error). The remaining error is the gradient entering the
    backward GEMMs in the input dtype, as in any bf16 training."""
    case = make_case(device, dtype=dtype)
    loss, _, _, grads = loss_and_grads(distillm_ext.fused_linear_kd, case, loss="jsd")
    ref_loss, _, _, ref_grads = loss_and_grads(fused_linear_kd_reference, as_float64(case), loss="jsd")
    assert_close_to_reference(loss, ref_loss, rtol=1e-5)
    for name, grad in grads.items():
        assert grad.dtype == dtype
        assert_close_to_reference(grad, ref_grads[name], rtol=1e-2)


def test_retain_graph_reuse_is_a_clear_error():
    case = make_case("cpu")
    hidden = case["student_hidden"].requires_grad_()
    loss = distillm_ext.fused_linear_skew_kl(**case)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()
    assert hidden.grad is not None


def test_no_grad_and_inference_mode_give_the_same_value():
    case = make_case("cpu")
    with torch.no_grad():
        expected = distillm_ext.fused_linear_kd(**case, kd_ratio=0.4)
    with torch.inference_mode():
        actual = distillm_ext.fused_linear_kd(**case, kd_ratio=0.4)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def bad(case, **changes):
    return {**case, **changes}


@pytest.mark.parametrize("change, message", [
    (lambda c: bad(c, student_weight=c["student_weight"][:, :-1]), "student_weight has hidden size 23"),
    (lambda c: bad(c, teacher_hidden=c["teacher_hidden"][:, :-1]), "the same positions"),
    (lambda c: bad(c, student_weight=c["student_weight"].double()), "must have the dtype of student_hidden"),
    (lambda c: bad(c, teacher_weight=c["teacher_weight"][:0]), "the vocabulary is empty"),
    (lambda c: bad(c, labels=c["labels"][:, :-1]), "labels must have the leading shape"),
    (lambda c: bad(c, labels=c["labels"].float()), "labels must be an integer tensor"),
    (lambda c: bad(c, student_bias=c["student_bias"][:-1]), "student_bias must have shape"),
    (lambda c: bad(c, student_hidden=c["student_hidden"].long()), "must be float32, float16 or bfloat16"),
    (lambda c: bad(c, teacher_weight=c["teacher_weight"][0]), "must be a \\(vocabulary, hidden\\) matrix"),
    (lambda c: bad(c, teacher_hidden=c["teacher_hidden"].to("meta")), "teacher_hidden is on meta"),
])
def test_bad_input_is_a_clear_error(change, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        distillm_ext.fused_linear_kd(**change(make_case("cpu")))


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="kl"), "unknown loss 'kl'"),
    (dict(alpha=1.0), "alpha must be in"),
    (dict(beta=0.0), "beta must be in"),
    (dict(temperature=0.0), "temperature must be"),
    (dict(kd_ratio=1.5), "kd_ratio must be in"),
    (dict(chunk_size=-1), "chunk_size must be >= 0"),
    (dict(reduction="max"), "reduction must be"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        distillm_ext.fused_linear_kd(**make_case("cpu"), **kwargs)


def test_cross_entropy_needs_labels_inside_the_shared_vocabulary():
    case = make_case("cpu")
    case["labels"][0, 0] = VOCAB + 2  # a padding row of the student: no teacher row, no CE target
    with pytest.raises(IndexError, match=r"in \[0, 61\)"):
        distillm_ext.fused_linear_kd(**case, kd_ratio=0.5)
    del case["labels"]
    with pytest.raises(ValueError, match="pass labels"):
        distillm_ext.fused_linear_kd(**case, kd_ratio=0.5)


def test_strided_hidden_states_give_the_same_result(device):
    """Hidden states in any layout (a transposed copy, a `[:, :-1]` slice) are read as they are,
    and their gradient comes back in their shape."""
    case = make_case(device, leading=(3, 12))
    transposed = case["student_hidden"].transpose(0, 1).contiguous().transpose(0, 1)
    sliced = {**case, "student_hidden": case["student_hidden"][:, :-1], "teacher_hidden": case["teacher_hidden"][:, :-1],
              "labels": case["labels"][:, :-1]}
    expected = loss_and_grads(distillm_ext.fused_linear_kd, case, kd_ratio=0.5)
    actual = loss_and_grads(distillm_ext.fused_linear_kd, {**case, "student_hidden": transposed}, kd_ratio=0.5)
    torch.testing.assert_close(actual[0], expected[0])
    for name in STUDENT_INPUTS:
        torch.testing.assert_close(actual[3][name], expected[3][name])
    assert_matches_reference(sliced, kd_ratio=0.5)


@pytest.mark.parametrize("leading", [(1,), (7,), (2, 9)], ids=["one row", "7 rows", "2x9"])
def test_shapes_that_fill_no_chunk_evenly(device, leading):
    """One row, and row counts that are not a multiple of the chunk; V = 61 is no multiple of any
    vector width."""
    assert_matches_reference(make_case(device, leading=leading, ignore_fraction=0.0), loss="srkl", kd_ratio=0.5,
                             chunk_size=4)


@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_minus_infinity_biases_drop_their_rows(device, loss):
    """A -inf bias (a banned token) in either model: those vocabulary entries count 0, as for
    skew_kl on the logits; labels avoid them, so CE stays finite."""
    case = make_case(device)
    banned = torch.tensor([3, 17, 40])
    case["student_bias"][banned] = float("-inf")
    case["teacher_bias"][banned + 1] = float("-inf")
    labels = case["labels"]
    case["labels"] = torch.where(torch.isin(labels, torch.cat([banned, banned + 1]).to(labels.device)),
                                 torch.full_like(labels, 5), labels)
    assert_matches_reference(case, loss=loss, kd_ratio=0.5)


def plain_bf16_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                   student_bias=None, teacher_bias=None):
    """What plain PyTorch does in bf16: the logits GEMM in bf16 (rounded to 8 mantissa bits),
    then the loss in float32. Returns (loss, kd, ce) like fused_linear_kd."""
    vocab = min(student_weight.shape[0], teacher_weight.shape[0])
    z = student_hidden @ student_weight[:vocab].T + student_bias[:vocab]
    u = teacher_hidden @ teacher_weight[:vocab].T + teacher_bias[:vocab]
    loss = jsd_reference(z.float(), u.float(), labels)
    return loss, loss.detach(), torch.zeros_like(loss)


def test_bf16_is_more_accurate_than_plain_pytorch_bf16(device):
    """Against the float64 reference of the same bf16 inputs, the op errs less than the plain
    bf16 baseline, in the loss and in every gradient."""
    case = make_case(device, dtype=torch.bfloat16)
    reference = loss_and_grads(fused_linear_kd_reference, as_float64(case), loss="jsd")
    ours = loss_and_grads(distillm_ext.fused_linear_kd, case, loss="jsd")
    plain = loss_and_grads(plain_bf16_jsd, case)

    def error(result, name):
        return (result[3][name].double() - reference[3][name]).abs().max().item()

    assert abs(ours[0].item() - reference[0].item()) <= abs(plain[0].item() - reference[0].item())
    for name in STUDENT_INPUTS:
        assert error(ours, name) < error(plain, name), (name, error(ours, name), error(plain, name))
