"""Typed Python face of the compiled operators (torch.ops.distillm.*).

The autograd formula and the shape (Meta) kernel of every op live in C++ (csrc/), so the ops
are differentiable and traceable from libtorch as well as from Python; nothing is registered
here.
"""

from typing import Optional

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

    Returns:
        float32 loss: a scalar, or shape (...) for reduction="none".
    """
    return torch.ops.distillm.skew_kl(
        student_logits, teacher_logits, labels, alpha=alpha, reverse=reverse,
        temperature=temperature, ignore_index=ignore_index, reduction=reduction)


def release_cached_gradients() -> int:
    """Frees the memory skew_kl keeps for reuse, and returns how many bytes that was.

    On CPU the op keeps up to two freed gradients (the size of the student logits) and writes
    the next gradient into one of them: faulting in fresh pages cost about half of a forward +
    backward (benchmarks/RESULTS.md). Like torch.cuda.empty_cache(), call this to give that
    memory back when no more losses will be computed for a while.
    """
    return _C.release_cached_gradients()
