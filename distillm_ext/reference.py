"""Pure-PyTorch references of every loss: the straightforward many-tensor formulation.

Tests compare the fused kernels against these in float64, and the benchmarks time them (eager
and under torch.compile) as the baselines. Same signature and semantics as distillm_ext.skew_kl.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _default_compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _reduce(per_position: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int,
            reduction: str) -> torch.Tensor:
    if labels is None:
        valid = torch.ones_like(per_position, dtype=torch.bool)
    else:
        valid = labels != ignore_index
    per_position = torch.where(valid, per_position, torch.zeros_like(per_position))
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return per_position.sum()
    if reduction == "mean":
        return per_position.sum() / valid.sum().clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def skew_kl_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    alpha: float = 0.1,
    reverse: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """KL(first || alpha first + (1 - alpha) second); first = p (SKL) or q (SRKL).

    Computed in `compute_dtype`, by default the inputs' dtype promoted to at least float32
    (pass float64 inputs for a reference, bfloat16 for what plain PyTorch gets in bfloat16).
    The mixture's log is taken in log space so that it stays exact where one distribution
    underflows.
    """
    dtype = compute_dtype or _default_compute_dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return _reduce(_skew_terms(log_q, log_p, alpha, reverse).sum(-1), labels, ignore_index, reduction)


def _skew_terms(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float, reverse: bool) -> torch.Tensor:
    """f (log f - log(alpha f + (1 - alpha) s)) per entry, f = p (SKL) or q (SRKL); entries where
    either log-probability is -inf, or f underflows, are dropped (0)."""
    log_first, log_second = (log_q, log_p) if reverse else (log_p, log_q)
    first = log_first.exp()
    dropped = torch.isneginf(log_q) | torch.isneginf(log_p) | (first == 0)
    # Dropped entries are replaced before the logs meet, so no inf - inf reaches a gradient.
    log_first = torch.where(dropped, torch.zeros_like(log_first), log_first)
    log_second = torch.where(dropped, torch.zeros_like(log_second), log_second)
    if alpha == 0:
        log_mix = log_second
    else:
        log_mix = torch.logaddexp(log_first + math.log(alpha), log_second + math.log1p(-alpha))
    return torch.where(dropped, torch.zeros_like(first), first * (log_first - log_mix))


def _tvd_terms(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    dropped = torch.isneginf(log_q) | torch.isneginf(log_p)
    return torch.where(dropped, torch.zeros_like(log_q), 0.5 * (log_p.exp() - log_q.exp()).abs())


def _divergence_terms(log_q, log_p, loss: str, alpha: float, beta: float) -> torch.Tensor:
    """Per-entry terms of a loss type (make_loss's names) between two sets of log-probabilities."""
    if loss in ("fkl", "rkl", "skl", "sfkl", "srkl"):
        return _skew_terms(log_q, log_p, alpha if loss in ("skl", "sfkl", "srkl") else 0.0, loss in ("rkl", "srkl"))
    if loss == "jsd":
        return beta * _skew_terms(log_q, log_p, beta, False) + (1 - beta) * _skew_terms(log_q, log_p, 1 - beta, True)
    if loss == "tvd":
        return _tvd_terms(log_q, log_p)
    raise ValueError(f"unknown loss {loss!r}")


def jsd_reference(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0,
                  ignore_index=-100, reduction="mean"):
    """Generalized JSD_beta (GKD) = beta SKL_beta + (1 - beta) SRKL_(1-beta), 0 < beta < 1."""
    common = dict(temperature=temperature, ignore_index=ignore_index, reduction=reduction)
    return (beta * skew_kl_reference(student_logits, teacher_logits, labels, alpha=beta, **common)
            + (1 - beta) * skew_kl_reference(student_logits, teacher_logits, labels,
                                             alpha=1 - beta, reverse=True, **common))


def tvd_reference(student_logits, teacher_logits, labels=None, *, temperature=1.0,
                  ignore_index=-100, reduction="mean"):
    """Total variation distance 0.5 sum_v |p_v - q_v|; entries with a -inf logit count 0."""
    dtype = _default_compute_dtype(student_logits, teacher_logits)
    q = F.softmax(student_logits.to(dtype) / temperature, dim=-1)
    p = F.softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    dropped = torch.isneginf(student_logits) | torch.isneginf(teacher_logits)
    terms = torch.where(dropped, torch.zeros_like(p), 0.5 * (p - q).abs())
    return _reduce(terms.sum(-1), labels, ignore_index, reduction)


def fused_linear_kd_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                              student_bias=None, teacher_bias=None, *, loss="skl", alpha=0.1, beta=0.5,
                              temperature=1.0, kd_ratio=1.0, ignore_index=-100, reduction="mean", chunk_size=0):
    """distillm_ext.fused_linear_kd the straightforward way: materialize both logits over the
    shared vocabulary V = min(Vs, Vt), then the loss references and cross-entropy. Computed in
    the inputs' dtype promoted to at least float32. Returns (loss, kd, ce). chunk_size is
    accepted for the same signature, and unused: there are no chunks here."""
    dtype = _default_compute_dtype(student_hidden, teacher_hidden)
    vocab = min(student_weight.shape[0], teacher_weight.shape[0])

    def logits(hidden, weight, bias):
        z = hidden.to(dtype) @ weight[:vocab].to(dtype).T
        return z if bias is None else z + bias[:vocab].to(dtype)

    z = logits(student_hidden, student_weight, student_bias)
    u = logits(teacher_hidden, teacher_weight, teacher_bias)
    common = dict(temperature=temperature, ignore_index=ignore_index, reduction=reduction)
    if loss in ("fkl", "rkl", "skl", "sfkl", "srkl"):
        kd = skew_kl_reference(z, u, labels, alpha=alpha if loss in ("skl", "sfkl", "srkl") else 0.0,
                               reverse=loss in ("rkl", "srkl"), **common)
    elif loss == "jsd":
        kd = jsd_reference(z, u, labels, beta=beta, **common)
    elif loss == "tvd":
        kd = tvd_reference(z, u, labels, **common)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    return _mix_with_cross_entropy(kd, z, labels, kd_ratio, ignore_index, reduction)


def _mix_with_cross_entropy(kd, z, labels, kd_ratio, ignore_index, reduction):
    """(kd_ratio * kd + (1 - kd_ratio) * CE(z, labels), kd, CE), as the fused-linear ops return."""
    if kd_ratio == 1.0:
        return kd, kd.detach(), torch.zeros_like(kd)
    targets = labels.masked_fill(labels == ignore_index, 0)
    ce_rows = F.cross_entropy(z.flatten(0, -2), targets.flatten(), reduction="none").view(labels.shape)
    ce = _reduce(ce_rows, labels, ignore_index, reduction)
    mixed = ce if kd_ratio == 0.0 else kd_ratio * kd + (1 - kd_ratio) * ce
    return mixed, kd.detach(), ce.detach()


def topk_kd_reference(student_logits, teacher_ids, teacher_logprobs, labels=None, *, loss="skl", alpha=0.1,
                      beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean"):
    """The definition of the sparse-teacher losses (distillm_ext.skew_kl_topk and the top-k
    fused-linear loss). The teacher is known at K distinct ids per position, as
    log-probabilities at temperature T. Both distributions are coarsened to K + 1 classes, the
    kept ids and the tail:
        p̄ = (p_i1 .. p_iK, max(0, 1 - sum_k p_ik)),   q̄ = (q_i1 .. q_iK, 1 - sum_k q_ik),
    q = softmax(student / T), and the loss type is applied to (p̄, q̄) as to two distributions
    over K + 1 entries. q's tail is summed over the ids outside the top-k themselves, so that
    it keeps its digits when it is tiny. Computed in the student's dtype promoted to at least
    float32 (pass float64 for a reference)."""
    dtype = _default_compute_dtype(student_logits, teacher_logprobs)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    ids = teacher_ids.long()
    kept = torch.zeros_like(log_q, dtype=torch.bool).scatter_(-1, ids, True)
    log_q_tail = torch.logsumexp(log_q.masked_fill(kept, -math.inf), dim=-1, keepdim=True)
    log_p = teacher_logprobs.to(dtype)
    p_tail = (1 - log_p.exp().sum(-1, keepdim=True)).clamp_min(0)
    coarse_q = torch.cat([log_q.gather(-1, ids), log_q_tail], dim=-1)
    coarse_p = torch.cat([log_p, p_tail.log()], dim=-1)
    return _reduce(_divergence_terms(coarse_q, coarse_p, loss, alpha, beta).sum(-1), labels, ignore_index, reduction)


def skew_kl_topk_reference(student_logits, teacher_ids, teacher_logprobs, labels=None, *, alpha=0.1, reverse=False,
                           temperature=1.0, ignore_index=-100, reduction="mean"):
    """distillm_ext.skew_kl_topk the straightforward way (topk_kd_reference, skl or srkl)."""
    return topk_kd_reference(student_logits, teacher_ids, teacher_logprobs, labels, loss="srkl" if reverse else "skl",
                             alpha=alpha, temperature=temperature, ignore_index=ignore_index, reduction=reduction)


def fused_linear_kd_topk_reference(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels=None,
                                   student_bias=None, *, loss="skl", alpha=0.1, beta=0.5, temperature=1.0,
                                   kd_ratio=1.0, ignore_index=-100, reduction="mean", chunk_size=0):
    """distillm_ext.fused_linear_kd_topk the straightforward way: the student's logits over its
    whole vocabulary, then topk_kd_reference and cross-entropy. Returns (loss, kd, ce)."""
    dtype = _default_compute_dtype(student_hidden)
    z = student_hidden.to(dtype) @ student_weight.to(dtype).T
    if student_bias is not None:
        z = z + student_bias.to(dtype)
    kd = topk_kd_reference(z, teacher_ids, teacher_logprobs, labels, loss=loss, alpha=alpha, beta=beta,
                           temperature=temperature, ignore_index=ignore_index, reduction=reduction)
    return _mix_with_cross_entropy(kd, z, labels, kd_ratio, ignore_index, reduction)
