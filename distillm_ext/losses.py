"""The DistiLLM loss types as nn.Modules over the fused skew-KL operators.

Every module maps (student_logits (..., V), teacher, labels (...) or None) to a float32 loss and
differentiates with respect to the student only. The teacher is its logits (..., V), or a
SparseTeacher: its top-k ids and log-probabilities per position (an offline cache), for which
the loss is taken on the K kept ids plus one tail class (distillm_ext.skew_kl_topk). `make_loss(type, ...)` builds
one from a config name: fkl, rkl, skl (= sfkl), srkl, jsd, tvd. With reduction="mean", a
`num_items` argument replaces the call's valid positions as the denominator (see
distillm_ext.skew_kl).
"""

from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from .ops import IGNORE_INDEX, REDUCTIONS, skew_kl, skew_kl_topk


class SparseTeacher(NamedTuple):
    """A teacher known at K ids per position: ids (..., K) int32/int64 and their
    log-probabilities at the loss's temperature (..., K)."""

    ids: torch.Tensor
    logprobs: torch.Tensor


Teacher = Union[torch.Tensor, SparseTeacher]


def _skew(student_logits: torch.Tensor, teacher: Teacher, labels, **kwargs) -> torch.Tensor:
    """skew_kl against dense teacher logits, skew_kl_topk against a SparseTeacher."""
    if isinstance(teacher, SparseTeacher):
        return skew_kl_topk(student_logits, teacher.ids, teacher.logprobs, labels, **kwargs)
    return skew_kl(student_logits, teacher, labels, **kwargs)


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

    def forward(self, student_logits: torch.Tensor, teacher: Teacher,
                labels: Optional[torch.Tensor] = None, num_items=None) -> torch.Tensor:
        return _skew(student_logits, teacher, labels, alpha=self.alpha, reverse=self.reverse,
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

    def forward(self, student_logits, teacher: Teacher, labels=None, num_items=None):
        common = dict(self._common(), num_items=num_items)
        towards_teacher = _skew(student_logits, teacher, labels, alpha=self.beta, **common)
        towards_student = _skew(student_logits, teacher, labels, alpha=1.0 - self.beta, reverse=True, **common)
        return self.beta * towards_teacher + (1.0 - self.beta) * towards_student


class TotalVariation(_DistillationLoss):
    """0.5 sum_v |p_v - q_v| per position; entries with a -inf logit count 0. Against a
    SparseTeacher: over the K kept ids and the tail. Plain PyTorch (no fused kernel yet),
    float32 math."""

    def forward(self, student_logits, teacher: Teacher, labels=None, num_items=None):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"tvd: reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if num_items is not None and self.reduction != "mean":
            raise ValueError("tvd: num_items is the denominator of reduction='mean'; it cannot be "
                             f"used with reduction={self.reduction!r}")
        per_position = (self._sparse_terms if isinstance(teacher, SparseTeacher) else self._dense_terms)(
            student_logits, teacher)
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

    def _dense_terms(self, student_logits, teacher_logits):
        q = torch.softmax(student_logits.float() / self.temperature, dim=-1)
        p = torch.softmax(teacher_logits.float() / self.temperature, dim=-1)
        kept = ~(torch.isneginf(student_logits) | torch.isneginf(teacher_logits))
        return 0.5 * ((p - q).abs() * kept).sum(-1)

    def _sparse_terms(self, student_logits, teacher: SparseTeacher):
        q = torch.softmax(student_logits.float() / self.temperature, dim=-1)
        ids = teacher.ids.long()
        q_kept = q.gather(-1, ids)
        q_tail = q.scatter(-1, ids, 0.0).sum(-1)  # summed over the tail itself: keeps its digits
        p_kept = teacher.logprobs.float().exp()
        p_tail = (1 - p_kept.sum(-1)).clamp_min(0)
        live = (q_kept > 0) & (p_kept > 0)  # a class with no mass on either side is dropped
        tail_live = (q_tail > 0) & (p_tail > 0)
        return 0.5 * (((p_kept - q_kept).abs() * live).sum(-1) + (p_tail - q_tail).abs() * tail_live)


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
