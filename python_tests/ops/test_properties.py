"""Property tests (hypothesis): random shapes, masks, scales and settings against float64."""

import math

import torch
from hypothesis import given, settings, strategies as st

import distillm_ext
from distillm_ext.reference import skew_kl_reference
from conftest import assert_close_to_reference


@st.composite
def cases(draw):
    rows = draw(st.integers(0, 4))
    vocab = draw(st.integers(1, 300))
    scale = draw(st.sampled_from([1e-3, 1.0, 5.0, 100.0, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    for logits in (student, teacher):
        logits[torch.rand(rows, vocab, generator=generator) < draw(st.sampled_from([0.0, 0.1, 0.9]))] = -math.inf
    labels = torch.randint(0, 5, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.3] = -100
    options = dict(alpha=draw(st.sampled_from([0.0, 0.05, 0.5, 0.95])), reverse=draw(st.booleans()),
                   temperature=draw(st.sampled_from([0.7, 1.0, 3.0])), reduction="none")
    return student.float(), teacher.float(), labels, options


@settings(max_examples=150, deadline=None, derandomize=True)  # the same cases in every CI run
@given(cases())
def test_matches_reference_on_random_cases(case):
    student, teacher, labels, options = case
    student.requires_grad_()
    loss = distillm_ext.skew_kl(student, teacher, labels, **options)
    reference = skew_kl_reference(student.detach().double(), teacher.double(), labels, **options)
    assert loss.shape == reference.shape
    # Rows whose logits are all -inf in either input have no distribution: 0 by definition.
    assert not torch.isnan(loss).any()
    # Float32 log-probabilities carry ~1e-7 absolute error, so losses far below that (nearly
    # equal distributions) are held to 2e-7 absolute.
    assert_close_to_reference(loss, torch.nan_to_num(reference, nan=0.0), rtol=1e-5, min_scale=0.02)
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[labels == -100] == 0).all()
    assert (student.grad[torch.isneginf(student)] == 0).all()
