"""The DistiLLM loss types as nn.Modules over the fused skew-KL operator.

Every module maps (student_logits (..., V), teacher_logits (..., V), labels (...) or None) to a
float32 loss and differentiates with respect to the student only. `make_loss(type, ...)` builds
one from a config name: fkl, rkl, skl (= sfkl), srkl, jsd, tvd. With reduction="mean", a
`num_items` argument replaces the call's valid positions as the denominator (see
distillm_ext.skew_kl).
"""

from typing import Optional

import torch
from torch import nn

from .ops import IGNORE_INDEX, REDUCTIONS, skew_kl


class _DistillationLoss(nn.Module):
    def __init__(self, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction

    def _common(self) -> dict:
        return dict(temperature=self.temperature, ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")


class SkewForwardKL(_DistillationLoss):
    """SKL_alpha = KL(p || alpha p + (1 - alpha) q), p the teacher, q the student."""

    reverse = False

    def __init__(self, alpha: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.alpha = alpha

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None, num_items=None) -> torch.Tensor:
        return skew_kl(student_logits, teacher_logits, labels, alpha=self.alpha, reverse=self.reverse,
                       num_items=num_items, **self._common())


class SkewReverseKL(SkewForwardKL):
    """SRKL_alpha = KL(q || alpha q + (1 - alpha) p)."""

    reverse = True


class ForwardKL(SkewForwardKL):
    """KL(p || q): SKL at alpha = 0."""

    def __init__(self, **kwargs):
        super().__init__(alpha=0.0, **kwargs)


class ReverseKL(SkewReverseKL):
    """KL(q || p): SRKL at alpha = 0."""

    def __init__(self, **kwargs):
        super().__init__(alpha=0.0, **kwargs)


class GeneralizedJSD(_DistillationLoss):
    """GKD's JSD_beta = beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q.

    That is beta SKL_beta + (1 - beta) SRKL_(1-beta): two calls of the fused operator.
    """

    def __init__(self, beta: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd: beta must be in (0, 1), got {beta}")
        self.beta = beta

    def forward(self, student_logits, teacher_logits, labels=None, num_items=None):
        common = dict(self._common(), num_items=num_items)
        towards_teacher = skew_kl(student_logits, teacher_logits, labels, alpha=self.beta, **common)
        towards_student = skew_kl(student_logits, teacher_logits, labels, alpha=1.0 - self.beta,
                                  reverse=True, **common)
        return self.beta * towards_teacher + (1.0 - self.beta) * towards_student


class TotalVariation(_DistillationLoss):
    """0.5 sum_v |p_v - q_v| per position; entries with a -inf logit count 0. Plain PyTorch
    (no fused kernel yet), float32 math."""

    def forward(self, student_logits, teacher_logits, labels=None, num_items=None):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"tvd: reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if num_items is not None and self.reduction != "mean":
            raise ValueError("tvd: num_items is the denominator of reduction='mean'; it cannot be "
                             f"used with reduction={self.reduction!r}")
        q = torch.softmax(student_logits.float() / self.temperature, dim=-1)
        p = torch.softmax(teacher_logits.float() / self.temperature, dim=-1)
        kept = ~(torch.isneginf(student_logits) | torch.isneginf(teacher_logits))
        per_position = 0.5 * ((p - q).abs() * kept).sum(-1)
        if labels is None:
            valid = torch.ones_like(per_position)
        else:
            valid = (labels != self.ignore_index).to(per_position.dtype)
        per_position = per_position * valid
        if self.reduction == "none":
            return per_position
        total = per_position.sum()
        if self.reduction == "sum":
            return total
        if num_items is None:
            return total / valid.sum().clamp_min(1)
        return total / torch.as_tensor(num_items, dtype=total.dtype, device=total.device)


LOSSES = {
    "fkl": ForwardKL,
    "rkl": ReverseKL,
    "skl": SkewForwardKL,
    "sfkl": SkewForwardKL,
    "srkl": SkewReverseKL,
    "jsd": GeneralizedJSD,
    "tvd": TotalVariation,
}


def make_loss(loss_type: str, *, alpha: float = 0.1, beta: float = 0.5, temperature: float = 1.0,
              ignore_index: int = -100, reduction: str = "mean") -> nn.Module:
    """Builds the loss module named `loss_type`; alpha/beta go to the types that take them."""
    try:
        cls = LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss type {loss_type!r}; choose one of {sorted(LOSSES)}") from None
    common = dict(temperature=temperature, ignore_index=ignore_index, reduction=reduction)
    if cls in (SkewForwardKL, SkewReverseKL):
        return cls(alpha=alpha, **common)
    if cls is GeneralizedJSD:
        return cls(beta=beta, **common)
    return cls(**common)
