"""The KD loss of a micro-batch, from tensors: KD (and CE, when loss.kd_ratio < 1) over its
response tokens. No models, timers or autocast in here; forwards.py makes the tensors.

What the teacher contributes is a *teacher signal*: the live teacher's final hidden states with
its output embedding (TeacherHiddenStates, for the fused-linear loss) or its logits
(TeacherLogits); the offline teacher's top-k (TeacherTopK, from a `distillm cache-teacher`
cache); or nothing (`distillm sft`: ResponseCrossEntropyLoss). FusedLinearKDLoss takes a live
teacher's hidden states or a TeacherTopK, LogitsKDLoss its logits or a TeacherTopK, so a run
can mix cached and live steps (dataset batches from the cache, student outputs from the live
teacher).

Both modules return (loss, kd, ce): `kd` and `ce` are detached sums over the response tokens, for
logging; `loss` = (kd_ratio * kd + (1 - kd_ratio) * ce) / num_items is the one to differentiate,
num_items being the step's denominator (the response tokens of every micro-batch and rank, per
rank). The KD op divides by it itself, so that `loss.backward()` hands it an incoming gradient of
1 and its fused gradient needs no further pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..losses import SparseTeacher, make_loss
from ..ops import IGNORE_INDEX, fused_linear_kd, fused_linear_kd_topk
from .config import LossConfig

Denominator = Union[float, torch.Tensor]


@dataclass
class TeacherHiddenStates:
    """A live teacher's final (normed) hidden states and the output embedding that reads them."""

    hidden: torch.Tensor                  # (B, T, H), positions aligned with the targets
    weight: torch.Tensor                  # (V_t, H)
    bias: Optional[torch.Tensor] = None   # (V_t,)


@dataclass
class TeacherLogits:
    """A live teacher's logits."""

    logits: torch.Tensor  # (B, T, V_t), positions aligned with the targets


@dataclass
class TeacherTopK:
    """An offline teacher: its top-k ids and log-probabilities (at loss.temperature) at the
    response positions of a batch only, the positions where targets != -100 in row-major
    order."""

    ids: torch.Tensor       # (N, K) int32, in [0, V) for the V output rows both models share
    logprobs: torch.Tensor  # (N, K) float32


class FusedLinearKDLoss(nn.Module):
    """KD from the student's final hidden states and output embedding, a chunk of response
    tokens at a time, so no [tokens, vocab] logits exist and prompt and padding tokens cost no
    output-layer FLOPs: distillm_ext.fused_linear_kd against a TeacherHiddenStates (the first V
    rows of both embeddings compared, V the smaller of the two), fused_linear_kd_topk against a
    TeacherTopK (over the first `vocab_size` rows of the student's)."""

    def __init__(self, config: LossConfig, vocab_size: Optional[int] = None):
        super().__init__()
        self.config, self.vocab_size = config, vocab_size

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                student_bias: Optional[torch.Tensor], teacher: Union[TeacherHiddenStates, TeacherTopK],
                targets: torch.Tensor, num_items: Denominator = 1.0):
        """student_hidden: (B, T, H_s); student_weight: (V_s, H_s); targets: (B, T) int64, -100
        where no loss is taken."""
        config = self.config
        if isinstance(teacher, TeacherTopK):
            kept = targets != IGNORE_INDEX
            weight = student_weight[:self.vocab_size]
            bias = None if student_bias is None else student_bias[:self.vocab_size]
            loss, kd, ce = fused_linear_kd_topk(
                student_hidden[kept].to(weight.dtype), weight, teacher.ids, teacher.logprobs, targets[kept], bias,
                loss=config.type, alpha=config.alpha, beta=config.beta, temperature=config.temperature,
                kd_ratio=config.kd_ratio, ignore_index=IGNORE_INDEX, reduction="sum")
            return loss / num_items, kd, ce
        loss, kd, ce = fused_linear_kd(
            student_hidden.to(student_weight.dtype), student_weight, teacher.hidden.to(teacher.weight.dtype),
            teacher.weight, targets, student_bias, teacher.bias, loss=config.type, alpha=config.alpha,
            beta=config.beta, temperature=config.temperature, kd_ratio=config.kd_ratio, ignore_index=IGNORE_INDEX,
            reduction="sum")
        return loss / num_items, kd, ce


class LogitsKDLoss(nn.Module):
    """KD from the student's logits against TeacherLogits or a TeacherTopK, over the first
    `vocab_size` rows both models share: the fused skew-KL op family, and cross-entropy."""

    def __init__(self, config: LossConfig, vocab_size: int):
        super().__init__()
        self.kd_ratio, self.vocab_size = config.kd_ratio, vocab_size
        self.kd = make_loss(config.type, alpha=config.alpha, beta=config.beta, temperature=config.temperature,
                            reduction="mean")

    def forward(self, student_logits: torch.Tensor, teacher: Union[TeacherLogits, TeacherTopK],
                targets: torch.Tensor, num_items: Denominator = 1.0):
        """student_logits: (B, T, V_s); targets: (B, T) int64, -100 where no loss is taken."""
        vocab, kd_ratio = self.vocab_size, self.kd_ratio
        student_logits = student_logits[..., :vocab]
        if isinstance(teacher, TeacherTopK):  # the response positions alone, as the cache has them
            kept = targets != IGNORE_INDEX
            student_logits, targets = student_logits[kept], targets[kept]
            teacher_side = SparseTeacher(teacher.ids, teacher.logprobs)
        else:
            teacher_side = teacher.logits[..., :vocab]
        kd_mean = self.kd(student_logits, teacher_side, targets, num_items=num_items)
        ce = torch.zeros((), device=kd_mean.device)
        if kd_ratio < 1.0:
            ce = nn.functional.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]).float(),
                                             targets.flatten(), reduction="sum")
        loss = kd_mean if kd_ratio == 1.0 else kd_ratio * kd_mean + (1.0 - kd_ratio) * ce / num_items
        return loss, kd_mean.detach() * num_items, ce.detach()


class ResponseCrossEntropyLoss(nn.Module):
    """Supervised fine-tuning, with no teacher: cross-entropy on the targets, from the student's
    final hidden states and output embedding at the target positions only (prompt and padding
    cost no output-layer FLOPs); float32 logits. `kd` is 0."""

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                student_bias: Optional[torch.Tensor], teacher: None, targets: torch.Tensor,
                num_items: Denominator = 1.0):
        """student_hidden: (B, T, H); student_weight: (V, H); targets: (B, T) int64, -100 where no
        loss is taken."""
        kept = targets != IGNORE_INDEX
        logits = nn.functional.linear(student_hidden[kept].to(student_weight.dtype), student_weight, student_bias)
        ce = nn.functional.cross_entropy(logits.float(), targets[kept], reduction="sum")
        return ce / num_items, torch.zeros((), device=ce.device), ce.detach()
