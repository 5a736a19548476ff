"""The CPU gradient cache of skew_kl: freed gradients are reused, never while alive, always
fully overwritten, and released on request."""

import pytest
import torch

import distillm_ext
from distillm_ext.reference import skew_kl_reference

ROWS, VOCAB = 16, 32000  # 2 MB of float32: above the size the cache leaves to malloc


@pytest.fixture(autouse=True)
def empty_cache():
    distillm_ext.release_cached_gradients()
    yield
    distillm_ext.release_cached_gradients()


def inputs(rows=ROWS, vocab=VOCAB, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=generator)
    return student, teacher


def gradient(student, teacher, labels=None, **kwargs):
    distillm_ext.skew_kl(student, teacher, labels, **kwargs).backward()
    grad, student.grad = student.grad, None
    return grad


def reference_gradient(student, teacher, labels=None, **kwargs):
    s = student.detach().double().requires_grad_()
    skew_kl_reference(s, teacher.double(), labels, **kwargs).backward()
    return s.grad


def test_a_freed_gradient_is_reused():
    student, teacher = inputs()
    address = gradient(student, teacher).data_ptr()  # freed on return
    assert gradient(student, teacher).data_ptr() == address


def test_a_live_gradient_is_never_handed_out_again():
    student, teacher = inputs()
    first = gradient(student, teacher, reverse=False)
    second = gradient(student, teacher, reverse=True)
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first.double(), reference_gradient(student, teacher, reverse=False))
    torch.testing.assert_close(second.double(), reference_gradient(student, teacher, reverse=True))


def test_a_reused_block_is_fully_overwritten():
    """Stale values of the previous gradient must not survive, in particular on ignored rows
    (exactly zero) and on rows whose logits are all -inf."""
    student, teacher = inputs(seed=1)
    gradient(student, teacher, alpha=0.5)  # leaves a block full of nonzero values
    labels = torch.arange(ROWS)
    labels[::3] = -100
    student, teacher = inputs(seed=2)
    with torch.no_grad():
        student[1] = float("-inf")
    grad = gradient(student, teacher, labels)
    assert (grad[labels == -100] == 0).all()
    assert (grad[1] == 0).all()
    valid = (labels != -100) & (torch.arange(ROWS) != 1)
    expected = reference_gradient(student, teacher, labels)
    torch.testing.assert_close(grad[valid].double(), expected[valid])


def test_a_much_larger_block_is_not_used_for_a_small_gradient():
    student, teacher = inputs(rows=4 * ROWS)
    big = gradient(student, teacher).data_ptr()
    small_student, small_teacher = inputs()
    assert gradient(small_student, small_teacher).data_ptr() != big


def test_release_gives_the_blocks_back():
    student, teacher = inputs()
    gradient(student, teacher)
    assert distillm_ext.release_cached_gradients() == ROWS * VOCAB * 4
    assert distillm_ext.release_cached_gradients() == 0


def test_at_most_two_blocks_are_kept():
    first, second, third = (gradient(*inputs(rows=ROWS + k)) for k in range(3))
    kept = sum(g.numel() * g.element_size() for g in (second, third))
    del first, second, third  # freed in this order: the first block is the one evicted
    assert distillm_ext.release_cached_gradients() == kept


def test_small_gradients_bypass_the_cache():
    student, teacher = inputs(rows=2, vocab=100)
    gradient(student, teacher)
    assert distillm_ext.release_cached_gradients() == 0
