"""loss.fused_linear in the trainer: the same run as the logits path to float32 rounding, no
full logits built, and models it cannot serve are detected (off with a warning, or an error)."""

import logging
import sys

import pytest
import torch
from tiny_models import make_model, overrides

from distillm_ext.recipe.config import load_config
from distillm_ext.recipe.forwards import (FinalHiddenStates, HiddenStateForwards, fused_linear_unsupported,
                                          make_kd_path)
from distillm_ext.recipe.kd_loss import FusedLinearKDLoss, LogitsKDLoss, TeacherHiddenStates, TeacherLogits
from distillm_ext.recipe.trainer import Trainer
from test_trainer import _run, final_weights, train, train_records


def assert_same_runs(runs):
    for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
        fused, logits = ([r[key] for r in train_records(runs[f])] for f in (True, False))
        # ce_loss is None at kd_ratio=1 (nothing was computed): it must be None on both paths.
        assert [value is None for value in fused] == [value is None for value in logits], key
        fused, logits = ([value for value in run if value is not None] for run in (fused, logits))
        assert fused == pytest.approx(logits, rel=1e-5, abs=1e-7), key
    # AdamW divides by sqrt(v): a gradient entry near 0 steps by ~lr whatever its size, so float32
    # rounding of a 1e-9 gradient (different summation orders) moves a weight by up to ~lr * 1e-3.
    expected, actual = final_weights(runs[False], 4), final_weights(runs[True], 4)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
@pytest.mark.parametrize("loss_type", ["skl", "srkl", "jsd", "tvd"])
def test_fused_linear_run_matches_the_logits_run(tiny, tmp_path, loss_type, kd_ratio):
    runs = {}
    for fused in (True, False):
        runs[fused] = tmp_path / f"fused-{fused}"
        train(overrides(tiny, runs[fused], loss__type=loss_type, loss__kd_ratio=kd_ratio, train__max_steps=4,
                        train__grad_accum=2, loss__fused_linear=fused))
    assert_same_runs(runs)


def test_fused_linear_matches_the_logits_run_under_ddp(tiny, tmp_path):
    """Two DDP processes: the student's hidden states come through the DDP wrapper, so its
    gradients, the output embedding's included, are all-reduced as on the logits path."""
    runs = {}
    for fused in (True, False):
        runs[fused] = tmp_path / f"fused-{fused}"
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "distillm_ext.recipe.cli", "train",
              *overrides(tiny, runs[fused], loss__type="srkl", loss__kd_ratio=0.5, train__max_steps=4,
                         train__grad_accum=2, loss__fused_linear=fused)])
    assert_same_runs(runs)


def test_no_full_logits_are_built(tiny, tmp_path):
    trainer = Trainer(load_config(None, overrides(tiny, tmp_path / "run", train__max_steps=2)))
    assert trainer.forwards.fused_linear
    positions, in_step = [], [False]
    for model in (trainer.student, trainer.teacher):
        model.get_output_embeddings().register_forward_hook(
            lambda m, args, out: positions.append(out.shape[1]) if in_step[0] and out.dim() == 3 else None)
    train_step = trainer.train_step

    def recorded_step(timer):
        in_step[0] = True
        try:
            return train_step(timer)
        finally:
            in_step[0] = False

    trainer.train_step = recorded_step
    trainer.fit()
    # Two steps, teacher and student: the last position's logits only. (The 2-D outputs are the
    # one-time check that the head reads the caught hidden states, on the last position too.)
    assert positions == [1] * 4


def test_models_with_transformed_logits_fall_back_to_logits(caplog):
    model = make_model(30, 1)
    assert fused_linear_unsupported(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in fused_linear_unsupported(model)
    config = load_config(None, []).loss
    with caplog.at_level(logging.WARNING):
        forwards, loss = make_kd_path(config, model, model, make_model(30, 1), vocab_size=30)
    assert not forwards.fused_linear and isinstance(loss, LogitsKDLoss)
    assert "loss.fused_linear: off" in caplog.text


def test_logits_that_are_not_the_head_of_the_base_model_output_are_an_error():
    """A model that transforms its logits without saying so in its config (here: doubles them)
    is caught on the first micro-batch, before any update."""
    student, teacher = make_model(30, 1, seed=1), make_model(30, 1)

    def doubled_logits(**inputs):
        output = student(**inputs)
        output.logits = output.logits * 2
        return output

    forwards = HiddenStateForwards(student, doubled_logits, teacher)
    batch = {"input_ids": torch.randint(0, 30, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with pytest.raises(RuntimeError, match="student's output embedding does not read its base model"):
        forwards.student_outputs(batch)


def test_final_hidden_states_are_what_the_head_reads():
    model = make_model(30, 2)
    ids = torch.randint(0, 30, (2, 7))
    hidden, last = FinalHiddenStates(model)(model, {"input_ids": ids})
    full = model(input_ids=ids).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(model.get_output_embeddings()(hidden), full)


def kd_tensors(vocab=30, hidden_size=8, seed=0):
    """A batch of hidden states, output embeddings and targets, with prompt positions ignored."""
    g = torch.Generator().manual_seed(seed)
    student_hidden, teacher_hidden = torch.randn(2, 8, hidden_size, generator=g), torch.randn(2, 8, 12, generator=g)
    student_weight, teacher_weight = torch.randn(vocab, hidden_size, generator=g), torch.randn(vocab + 3, 12, generator=g)
    targets = torch.randint(0, vocab, (2, 8), generator=g)
    targets[:, :3] = -100
    return student_hidden, student_weight.requires_grad_(), teacher_hidden, teacher_weight, targets


@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
def test_the_two_loss_modules_agree_on_tensors(kd_ratio):
    """The loss modules take tensors and a teacher signal, no models: the fused-linear loss from
    hidden states equals the logits loss on the logits they make (the teacher's padded rows
    outside both), value and gradient."""
    config = load_config(None, [f"loss.kd_ratio={kd_ratio}", "loss.type=srkl"]).loss
    student_hidden, student_weight, teacher_hidden, teacher_weight, targets = kd_tensors()
    num_items = torch.tensor(float((targets != -100).sum()))
    fused = FusedLinearKDLoss(config)(student_hidden, student_weight, None,
                                      TeacherHiddenStates(teacher_hidden, teacher_weight), targets, num_items)
    (fused_grad,) = torch.autograd.grad(fused[0], student_weight)
    logits = LogitsKDLoss(config, vocab_size=30)(student_hidden @ student_weight.T,
                                                 TeacherLogits(teacher_hidden @ teacher_weight.T), targets, num_items)
    (logits_grad,) = torch.autograd.grad(logits[0], student_weight)
    for fused_value, logits_value in zip(fused, logits):
        torch.testing.assert_close(fused_value, logits_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, logits_grad, rtol=1e-5, atol=1e-6)
    assert (fused[2] > 0) == (kd_ratio < 1)  # the CE sum, only when it is mixed in


def test_logits_path_backward_makes_no_pass_over_the_kd_gradient():
    """The trainer hands the KD op the step's denominator (num_items), so `loss.backward()` gives
    the op an incoming gradient of exactly 1 and its fused gradient is used as written: no
    multiply over a [tokens, vocab] tensor in the backward (there was one when the trainer
    multiplied the loss by its scale after the op)."""
    config = load_config(None, ["loss.fused_linear=false"]).loss
    student_hidden, student_weight, teacher_hidden, teacher_weight, targets = kd_tensors()
    student_logits = (student_hidden @ student_weight.T).detach().requires_grad_()
    teacher = TeacherLogits(teacher_hidden @ teacher_weight.T)
    loss, kd, _ = LogitsKDLoss(config, vocab_size=30)(student_logits, teacher, targets, num_items=torch.tensor(10.0))
    logits_shape = [2, 8, 30]
    with torch.profiler.profile(record_shapes=True) as profile:
        loss.backward()
    multiplies = [e for e in profile.events() if e.name in ("aten::mul_", "aten::mul") and logits_shape in e.input_shapes]
    assert not multiplies, [(e.name, e.input_shapes) for e in multiplies]
    assert loss.item() == pytest.approx(kd.item() / 10.0, rel=1e-6)
