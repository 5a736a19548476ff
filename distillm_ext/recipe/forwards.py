"""The training forwards of both models, producing what the KD loss takes (kd_loss.py).

Two paths, the same numbers to float32 rounding:
- hidden states (loss.fused_linear, the default where the models allow it): both models return
  their final hidden states, caught by a hook while the LM computes the logits of the last
  position only; the loss reads them with the output embeddings (FusedLinearKDLoss);
- logits: both models return full logits (LogitsKDLoss);
- no teacher (teacher.path=none, `distillm sft`): the student's hidden states alone
  (ResponseCrossEntropyLoss).
With an offline teacher (teacher.cache), CacheFirstForwards takes the teacher's side of dataset
batches from the cache, and leaves the others (student outputs) to the live teacher.

`make_kd_path` picks the path and pairs it with its loss. The student is always called through
its training forward (the DDP wrapper, when there is one), so that its gradients are
synchronized across ranks. Positions are shifted here: the outputs at position t predict the
target at t + 1.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable, Optional

import torch
from torch import nn

from .config import ConfigError, LossConfig
from .kd_loss import FusedLinearKDLoss, LogitsKDLoss, ResponseCrossEntropyLoss, TeacherHiddenStates, TeacherLogits
from .models import causal_lm

log = logging.getLogger(__name__)

# Config fields of Hugging Face models whose logits are not `hidden @ W.T + b` (Gemma 2's soft
# cap, Cohere's and Granite's scales, ...).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fused_linear_unsupported(model: nn.Module) -> Optional[str]:
    """Why `model`'s logits cannot be computed from its final hidden states by the fused-linear
    loss; None when they can."""
    model = causal_lm(model)
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

    A hook on the Hugging Face base model inside any wrapper (DDP, FSDP, peft) catches its
    output; the LM itself computes the logits of the last position only (logits_to_keep=1).
    Returns (hidden states, last position's logits); the logits let the caller check, once, that
    the output embedding really reads these hidden states.
    """

    def __init__(self, model: nn.Module):
        lm = causal_lm(model)
        self.base_model, self.head = lm.base_model, lm.get_output_embeddings()

    def __call__(self, forward: Callable, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        caught = []
        handle = self.base_model.register_forward_hook(lambda module, args, output: caught.append(output[0]))
        try:
            logits = forward(**inputs, logits_to_keep=1).logits
        finally:
            handle.remove()
        return caught[-1], logits


@torch.no_grad()
def check_head_input(states: FinalHiddenStates, hidden: torch.Tensor, last_logits: torch.Tensor, role: str) -> None:
    """The output embedding applied to the caught hidden states must give the model's own logits;
    otherwise the base model's output is not what the head reads (a model that transforms it in
    between), and the fused-linear loss would be wrong."""
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


def _training_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


class HiddenStateForwards:
    """Both models' final hidden states (see the module docstring). `bf16`: the student's output
    layer runs in bfloat16, as autocast would run it on the logits path."""

    fused_linear = True

    def __init__(self, student: nn.Module, student_forward: Callable, teacher: Optional[nn.Module],
                 autocast: Callable = contextlib.nullcontext, bf16: bool = False):
        self.student_forward, self.teacher, self.autocast, self.bf16 = student_forward, teacher, autocast, bf16
        self.student_states = FinalHiddenStates(student)
        self.teacher_states = FinalHiddenStates(teacher) if teacher is not None else None
        self._checked = {"student": False, "teacher": False}

    def _states(self, states: FinalHiddenStates, forward: Callable, batch: dict, role: str) -> torch.Tensor:
        with self.autocast():
            hidden, last_logits = states(forward, _training_inputs(batch))
        if not self._checked[role]:
            check_head_input(states, hidden, last_logits, role)
            self._checked[role] = True
        return hidden[:, :-1]

    def teacher_signal(self, batch: dict) -> Optional[TeacherHiddenStates]:
        if self.teacher is None:
            return None
        with torch.no_grad():
            hidden = self._states(self.teacher_states, self.teacher, batch, "teacher")
        head = self.teacher_states.head
        return TeacherHiddenStates(hidden, head.weight, head.bias)

    def student_outputs(self, batch: dict) -> dict:
        """The student's side of the loss, as FusedLinearKDLoss's keyword arguments."""
        hidden = self._states(self.student_states, self.student_forward, batch, "student")
        weight, bias = self.student_states.head.weight, self.student_states.head.bias
        if self.bf16:  # what autocast does to the student's output layer on the logits path
            weight, bias = weight.bfloat16(), None if bias is None else bias.bfloat16()
        return {"student_hidden": hidden, "student_weight": weight, "student_bias": bias}


class LogitsForwards:
    """Both models' full logits."""

    fused_linear = False

    def __init__(self, student_forward: Callable, teacher: nn.Module, autocast: Callable = contextlib.nullcontext):
        self.student_forward, self.teacher, self.autocast = student_forward, teacher, autocast

    def teacher_signal(self, batch: dict) -> TeacherLogits:
        with torch.no_grad(), self.autocast():
            return TeacherLogits(self.teacher(**_training_inputs(batch)).logits[:, :-1])

    def student_outputs(self, batch: dict) -> dict:
        """The student's side of the loss, as LogitsKDLoss's keyword arguments."""
        with self.autocast():
            return {"student_logits": self.student_forward(**_training_inputs(batch)).logits[:, :-1]}


class CacheFirstForwards:
    """The teacher's side of a batch from the offline cache when the batch carries example ids
    (a dataset batch, whose rows the cache holds), else from the live forwards (student outputs,
    which no cache can hold); the student's side from the live forwards."""

    def __init__(self, cache, live):
        self.cache, self.live = cache, live
        self.fused_linear = live.fused_linear

    def teacher_signal(self, batch: dict):
        if "example_ids" in batch:
            return self.cache.signal(batch["example_ids"], batch["input_ids"].device)
        return self.live.teacher_signal(batch)

    def student_outputs(self, batch: dict) -> dict:
        return self.live.student_outputs(batch)


def make_kd_path(config: LossConfig, student: nn.Module, student_forward: Callable, teacher: Optional[nn.Module],
                 vocab_size: int, autocast: Callable = contextlib.nullcontext, bf16: bool = False, cache=None):
    """(forwards, loss): hidden states and FusedLinearKDLoss when loss.fused_linear is set and
    the models allow it (else a warning says why not), logits and LogitsKDLoss otherwise; the
    student alone and ResponseCrossEntropyLoss with neither a teacher nor a `cache`
    (teacher_cache.TeacherCache, which may stand in for the teacher altogether)."""
    if teacher is None and cache is None:
        reason = fused_linear_unsupported(student)
        if reason is not None:
            raise ConfigError(f"training without a teacher reads the student's final hidden states, and the "
                              f"student cannot provide them: {reason}")
        return HiddenStateForwards(student, student_forward, None, autocast, bf16), ResponseCrossEntropyLoss()
    forwards, loss = LogitsForwards(student_forward, teacher, autocast), LogitsKDLoss(config, vocab_size)
    if config.fused_linear:
        for role, model in (("student", student), ("teacher", teacher)):
            reason = None if model is None else fused_linear_unsupported(model)
            if reason is not None:
                log.warning("loss.fused_linear: off, because the %s cannot use it: %s", role, reason)
                break
        else:
            forwards = HiddenStateForwards(student, student_forward, teacher, autocast, bf16)
            loss = FusedLinearKDLoss(config, vocab_size)
    return (forwards if cache is None else CacheFirstForwards(cache, forwards)), loss
