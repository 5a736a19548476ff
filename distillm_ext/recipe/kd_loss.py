"""The loss of one micro-batch: KD (and CE, when loss.kd_ratio < 1) over its response tokens.

Two paths, the same numbers to float32 rounding:
- fused-linear (loss.fused_linear, the default where the models allow it): the teacher and the
  student return their final hidden states, and distillm_ext.fused_linear_kd computes the loss
  from those and the output embeddings a chunk of response tokens at a time, so no
  [tokens, vocab] logits tensor exists, and prompt and padding tokens cost no output-layer FLOPs;
- logits: both models return full logits, then the fused skew-KL op (and cross-entropy).

The student is always called through `student_forward` (the DDP wrapper, when there is one), so
that its gradients are synchronized across ranks.
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Optional

import torch
from torch import nn

from ..losses import make_loss
from ..ops import IGNORE_INDEX, fused_linear_kd
from .config import LossConfig

log = logging.getLogger(__name__)

# Config fields of Hugging Face models whose logits are not `hidden @ W.T + b` (Gemma 2's soft
# cap, Cohere's and Granite's scales, ...).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fused_linear_unsupported(model: nn.Module) -> Optional[str]:
    """Why `model`'s logits cannot be computed from its final hidden states by the fused-linear
    loss; None when they can."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"its output embedding is {type(head).__name__}, not a Linear layer"
    if getattr(model, "base_model", model) is model:
        return "it has no separate base model whose output the output embedding reads"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "its forward() takes no logits_to_keep, so it would still build the full logits"
    for name in LOGIT_TRANSFORMS:
        value = getattr(model.config, name, None)
        if value not in (None, 1, 1.0):
            return f"config.{name} = {value} transforms its logits"
    return None


class FinalHiddenStates:
    """Calls a causal LM for its final (normed) hidden states, the input of its output embedding.

    A hook on the base model catches its output; the LM itself computes the logits of the last
    position only (logits_to_keep=1). The call still goes through `forward`, which may be a
    wrapper (DDP) around the LM. Returns (hidden states, last position's logits); the logits let
    the caller check, once, that the output embedding really reads these hidden states.
    """

    def __init__(self, model: nn.Module):
        self.base_model = model.base_model
        self.head = model.get_output_embeddings()

    def __call__(self, forward: Callable, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        caught = []
        handle = self.base_model.register_forward_hook(lambda module, args, output: caught.append(output[0]))
        try:
            logits = forward(**inputs, logits_to_keep=1).logits
        finally:
            handle.remove()
        return caught[-1], logits


class MicroBatchLoss:
    """(loss, kd, ce) of a micro-batch's response tokens: kd and ce are detached sums, for
    logging; `loss` = (kd_ratio * kd + (1 - kd_ratio) * ce) / num_items is the one to
    differentiate, num_items being the step's denominator (the response tokens of every
    micro-batch and rank, per rank). The KD op divides by it itself, so that `loss.backward()`
    hands it an incoming gradient of 1 and its fused gradient needs no further pass.

    `vocab_size`: the vocabulary rows both models share; `bf16`: the student's output layer runs in
    bfloat16, as autocast would run it.
    """

    def __init__(self, config: LossConfig, student: nn.Module, teacher: nn.Module, vocab_size: int,
                 bf16: bool = False):
        self.config, self.vocab_size, self.bf16 = config, vocab_size, bf16
        self.fused = config.fused_linear
        if self.fused:
            for role, model in (("student", student), ("teacher", teacher)):
                reason = fused_linear_unsupported(model)
                if reason is not None:
                    log.warning("loss.fused_linear: off, because the %s cannot use it: %s", role, reason)
                    self.fused = False
        if self.fused:
            self.student_states, self.teacher_states = FinalHiddenStates(student), FinalHiddenStates(teacher)
            self._checked = False
        else:
            self.loss_fn = make_loss(config.type, alpha=config.alpha, beta=config.beta,
                                     temperature=config.temperature, reduction="mean")

    def __call__(self, student_forward: Callable, teacher: nn.Module, batch: dict, timer, autocast,
                 num_items=1.0):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        targets = batch["labels"][:, 1:]
        if self.fused:
            loss, kd, ce = self._fused(student_forward, teacher, inputs, targets, timer, autocast)
            return loss / num_items, kd, ce
        return self._from_logits(student_forward, teacher, inputs, targets, timer, autocast, num_items)

    def _from_logits(self, student_forward, teacher, inputs, targets, timer, autocast, num_items):
        with timer.section("teacher_forward"), torch.no_grad(), autocast():
            teacher_logits = teacher(**inputs).logits
        with timer.section("student_forward"), autocast():
            student_logits = student_forward(**inputs).logits
        with timer.section("loss"):
            vocab, kd_ratio = self.vocab_size, self.config.kd_ratio
            student_logits = student_logits[:, :-1, :vocab]
            kd_mean = self.loss_fn(student_logits, teacher_logits[:, :-1, :vocab], targets, num_items=num_items)
            ce = torch.zeros((), device=kd_mean.device)
            if kd_ratio < 1.0:
                ce = nn.functional.cross_entropy(student_logits.flatten(0, 1).float(), targets.flatten(),
                                                 reduction="sum")
            loss = kd_mean if kd_ratio == 1.0 else kd_ratio * kd_mean + (1.0 - kd_ratio) * ce / num_items
        return loss, kd_mean.detach() * num_items, ce.detach()

    def _fused(self, student_forward, teacher, inputs, targets, timer, autocast):
        with timer.section("teacher_forward"), torch.no_grad(), autocast():
            teacher_hidden, teacher_last = self.teacher_states(teacher, inputs)
        with timer.section("student_forward"), autocast():
            student_hidden, student_last = self.student_states(student_forward, inputs)
        if not self._checked:
            self._check_head_input(self.teacher_states, teacher_hidden, teacher_last, "teacher")
            self._check_head_input(self.student_states, student_hidden, student_last, "student")
            self._checked = True
        with timer.section("loss"):
            student_head, teacher_head = self.student_states.head, self.teacher_states.head
            weight, bias = student_head.weight, student_head.bias
            if self.bf16:  # what autocast does to the student's output layer in the logits path
                weight, bias = weight.bfloat16(), None if bias is None else bias.bfloat16()
            teacher_weight = teacher_head.weight
            config = self.config
            return fused_linear_kd(
                student_hidden[:, :-1].to(weight.dtype), weight, teacher_hidden[:, :-1].to(teacher_weight.dtype),
                teacher_weight, targets, bias, teacher_head.bias, loss=config.type, alpha=config.alpha,
                beta=config.beta, temperature=config.temperature, kd_ratio=config.kd_ratio,
                ignore_index=IGNORE_INDEX, reduction="sum")

    @staticmethod
    @torch.no_grad()
    def _check_head_input(states: FinalHiddenStates, hidden: torch.Tensor, last_logits: torch.Tensor, role: str):
        """The output embedding applied to the caught hidden states must give the model's own
        logits; otherwise the base model's output is not what the head reads (a model that
        transforms it in between), and the fused-linear loss would be wrong."""
        head = states.head
        expected = last_logits[:, -1].float()
        actual = head(hidden[:, -1].to(head.weight.dtype)).float()
        tolerance = 3e-2 if head.weight.dtype != torch.float32 or hidden.dtype != torch.float32 else 1e-4
        scale = expected.abs().max().item()
        if not torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * scale):
            raise RuntimeError(
                f"loss.fused_linear: the {role}'s output embedding does not read its base model's output "
                f"(largest logit difference {(actual - expected).abs().max().item():.3g}); set "
                f"loss.fused_linear=false for this model")
