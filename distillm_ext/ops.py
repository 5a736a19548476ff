"""Typed Python face of the compiled operators (torch.ops.distillm.*).

The autograd formula and the shape (Meta) kernel of every op live in C++ (csrc/), so the ops
are differentiable and traceable from libtorch as well as from Python; nothing is registered
here.
"""

from typing import Optional, Union

import torch

from ._load import _C  # loading distillm_ext._C registers the ops

REDUCTIONS = ("mean", "sum", "none")
# The label of a position that no loss counts (prompt, padding): Hugging Face's convention.
IGNORE_INDEX = -100


def skew_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    alpha: float = 0.1,
    reverse: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: Optional[Union[torch.Tensor, float]] = None,
) -> torch.Tensor:
    """Fused skew KL divergence per token, with p = softmax(teacher/T), q = softmax(student/T).

    reverse=False: SKL_alpha  = KL(p || alpha p + (1 - alpha) q)   (alpha = 0: forward KL)
    reverse=True:  SRKL_alpha = KL(q || alpha q + (1 - alpha) p)   (alpha = 0: reverse KL)

    Args:
        student_logits: (..., V) float32/float16/bfloat16; the last dimension contiguous
            (a `logits[:, :-1]` slice is read in place, without a copy). Gets the gradient.
        teacher_logits: (..., V), any of the same dtypes; treated as a constant.
        labels: optional (...) integer tensor; positions equal to `ignore_index` count for
            nothing and get exactly zero gradient.
        alpha: mixture weight in [0, 1). temperature: > 0.
        reduction: "mean" (over valid positions; 0 when there are none), "sum", or "none"
            (float32 loss of shape (...), 0 at ignored positions).
        num_items: for "mean", the denominator instead of this call's valid positions: a
            number or a one-element tensor, e.g. the valid positions of every micro-batch and
            rank, so that gradient accumulation averages as one big batch would. A tensor on
            the logits' device costs no host sync; the kernel folds it into the gradient, so
            `loss.backward()` then makes no further pass over it.

    Returns:
        float32 loss: a scalar, or shape (...) for reduction="none".
    """
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        num_items = torch.tensor(float(num_items))
    return torch.ops.distillm.skew_kl(
        student_logits, teacher_logits, labels, alpha=alpha, reverse=reverse,
        temperature=temperature, ignore_index=ignore_index, reduction=reduction, num_items=num_items)


def skew_kl_topk(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    alpha: float = 0.1,
    reverse: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: Optional[Union[torch.Tensor, float]] = None,
) -> torch.Tensor:
    """skew_kl with a sparse teacher: known only at K ids per position (an offline top-k cache).

    Both distributions are coarsened to K + 1 classes, the K kept ids and one tail holding the
    rest of each one's mass (the teacher's tail is max(0, 1 - sum of its K probabilities)), and
    the skew KL is taken between those. By the data-processing inequality it is a lower bound of
    the dense loss; with K = V and exact log-probabilities it equals skew_kl.
    reference.topk_kd_reference is the definition.

    Args:
        student_logits: (..., V) float32/float16/bfloat16, the last dimension contiguous. Gets
            the gradient.
        teacher_ids: (..., K) int32/int64, distinct within each position, in [0, V).
        teacher_logprobs: (..., K) float32/float16/bfloat16: the teacher's log-probabilities at
            temperature `temperature` at those ids (log_softmax(teacher / T) gathered).
        labels, alpha, reverse, temperature, ignore_index, reduction, num_items: as for skew_kl.

    The ids are checked (range and distinctness): on CUDA that reads them, one host sync.
    """
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        num_items = torch.tensor(float(num_items))
    return torch.ops.distillm.skew_kl_topk(
        student_logits, teacher_ids, teacher_logprobs, labels, alpha=alpha, reverse=reverse,
        temperature=temperature, ignore_index=ignore_index, reduction=reduction, num_items=num_items)


def fused_linear_skew_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    *,
    alpha: float = 0.1,
    reverse: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 0,
) -> torch.Tensor:
    """skew_kl of the logits `hidden @ weight[:V].T (+ bias[:V])`, without ever building them.

    V = min(Vs, Vt): vocabularies padded to different sizes share their first rows. Positions
    are processed `chunk_size` at a time (0: automatic, about the hidden states' size of
    float32 workspace); positions labelled `ignore_index` are skipped before any matmul.
    Logits are float32 whatever the input dtype.

    Args:
        student_hidden: (..., Hs) final (normed) hidden states; gets a gradient.
        student_weight: (Vs, Hs) output embedding, the dtype of student_hidden; gets a gradient.
        teacher_hidden: (..., Ht) and teacher_weight (Vt, Ht): constants.
        labels: optional (...) integer tensor, as for skew_kl.
        student_bias, teacher_bias: optional (Vs,) / (Vt,) output biases; the student's gets a
            gradient.
        alpha, reverse, temperature, ignore_index, reduction: as for skew_kl.

    Returns:
        float32 loss: a scalar, or shape (...) for reduction="none".
    """
    return torch.ops.distillm.fused_linear_skew_kl(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
        teacher_bias, alpha=alpha, reverse=reverse, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    *,
    loss: str = "skl",
    alpha: float = 0.1,
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_ratio: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any DistiLLM loss type, and cross-entropy on the labels, from hidden states and output
    embeddings (see fused_linear_skew_kl), both from the same chunk logits.

    `loss` is a type of make_loss (fkl, rkl, skl, sfkl, srkl, jsd, tvd), with its alpha or beta.
    Returns (kd_ratio * KD + (1 - kd_ratio) * CE, KD, CE), each float32 and reduced alike. Only
    the first is differentiable; CE needs labels when kd_ratio < 1, and is 0 when kd_ratio == 1.
    """
    return torch.ops.distillm.fused_linear_kd(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
        teacher_bias, loss=loss, alpha=alpha, beta=beta, temperature=temperature, kd_ratio=kd_ratio,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)


def fused_linear_kd_topk(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    *,
    loss: str = "skl",
    alpha: float = 0.1,
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_ratio: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_linear_kd with a sparse teacher, as skew_kl_topk has one: any loss type between the
    student's logits `hidden @ weight.T (+ bias)`, never built for more than a chunk of
    positions, and the teacher's (..., K) top-k ids and log-probabilities at temperature T (an
    offline cache: no teacher model is needed). The vocabulary is the student's (Vs rows).

    Returns (kd_ratio * KD + (1 - kd_ratio) * CE, KD, CE) as fused_linear_kd does.
    """
    return torch.ops.distillm.fused_linear_kd_topk(
        student_hidden, student_weight, teacher_ids, teacher_logprobs, labels, student_bias, loss=loss,
        alpha=alpha, beta=beta, temperature=temperature, kd_ratio=kd_ratio, ignore_index=ignore_index,
        reduction=reduction, chunk_size=chunk_size)


def release_cached_gradients() -> int:
    """Frees the memory skew_kl keeps for reuse, and returns how many bytes that was.

    On CPU the op keeps up to two freed gradients (the size of the student logits) and writes
    the next gradient into one of them: faulting in fresh pages cost about half of a forward +
    backward (benchmarks/RESULTS.md). Like torch.cuda.empty_cache(), call this to give that
    memory back when no more losses will be computed for a while.
    """
    return _C.release_cached_gradients()
