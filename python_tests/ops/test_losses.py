"""The six DistiLLM loss modules against their pure-PyTorch references."""

import pytest
import torch

from distillm_ext import LOSSES, make_loss
from distillm_ext.reference import jsd_reference, skew_kl_reference, tvd_reference
from conftest import assert_close_to_reference


def reference_for(loss_type, alpha=0.1, beta=0.5):
    return {
        "fkl": lambda *a, **k: skew_kl_reference(*a, alpha=0.0, **k),
        "rkl": lambda *a, **k: skew_kl_reference(*a, alpha=0.0, reverse=True, **k),
        "skl": lambda *a, **k: skew_kl_reference(*a, alpha=alpha, **k),
        "sfkl": lambda *a, **k: skew_kl_reference(*a, alpha=alpha, **k),
        "srkl": lambda *a, **k: skew_kl_reference(*a, alpha=alpha, reverse=True, **k),
        "jsd": lambda *a, **k: jsd_reference(*a, beta=beta, **k),
        "tvd": tvd_reference,
    }[loss_type]


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_loss_module_matches_reference(device, loss_type):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 4, 301, generator=generator, dtype=torch.float64) * 2)
    teacher = (torch.randn(3, 4, 301, generator=generator, dtype=torch.float64) * 2)
    labels = torch.randint(0, 301, (3, 4), generator=generator)
    labels[1, 1:] = -100
    module = make_loss(loss_type, alpha=0.2, beta=0.3, temperature=1.5)
    fused_input = student.float().to(device).requires_grad_()
    loss = module(fused_input, teacher.float().to(device), labels.to(device))
    loss.backward()
    reference_input = student.clone().requires_grad_()
    expected = reference_for(loss_type, alpha=0.2, beta=0.3)(reference_input, teacher, labels, temperature=1.5)
    expected.backward()
    assert_close_to_reference(loss, expected, rtol=1e-5)
    assert_close_to_reference(fused_input.grad, reference_input.grad, rtol=1e-4)


def test_unknown_loss_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown loss type 'kl'.*'fkl'"):
        make_loss("kl")


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5])
def test_jsd_beta_out_of_range(beta):
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        make_loss("jsd", beta=beta)


def test_modules_print_their_settings():
    assert "alpha=0.3" in repr(make_loss("srkl", alpha=0.3))


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_num_items_replaces_the_mean_denominator(loss_type):
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(4, 6, 30, generator=generator)
    teacher = torch.randn(4, 6, 30, generator=generator)
    labels = torch.randint(0, 30, (4, 6), generator=generator)
    labels[0, :3] = -100
    total = make_loss(loss_type, reduction="sum")(student, teacher, labels)
    for num_items in (17, torch.tensor(17.0)):
        mean = make_loss(loss_type, reduction="mean")(student, teacher, labels, num_items=num_items)
        torch.testing.assert_close(mean, total / 17, rtol=1e-6, atol=0)
