"""Options of the model builder for larger models: teacher.dtype (the teacher's weights in a
narrower dtype, the loss still float32) and train.activation_checkpointing (each student decoder
layer recomputed in the backward: the same losses), under ddp and fsdp."""

import sys

import pytest
import torch
from test_fsdp import CLI, assert_same_run, torchrun
from test_trainer import KILL_AT_STEP_5, _run, final_weights, train_records
from tiny_models import overrides

from distillm_ext.recipe.config import load_config
from distillm_ext.recipe.models import decoder_layers
from distillm_ext.recipe.trainer import Trainer


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_narrower_teacher_halves_its_bytes_and_the_loss_stays_float32(tiny, tmp_path, dtype):
    full = Trainer(load_config(None, overrides(tiny, tmp_path / "full")))
    narrow = Trainer(load_config(None, overrides(tiny, tmp_path / "narrow", teacher__dtype=dtype, train__max_steps=8)))
    assert parameter_bytes(narrow.teacher) * 2 == parameter_bytes(full.teacher)
    assert all(p.dtype == getattr(torch, dtype) for p in narrow.teacher.parameters())
    batch = narrow.source.next_batch(0)[0]
    loss, kd, _ = narrow.loss(**narrow.forwards.student_outputs(batch), teacher=narrow.forwards.teacher_signal(batch),
                              targets=batch["labels"][:, 1:])
    assert loss.dtype == kd.dtype == torch.float32
    summary = narrow.fit()
    assert summary["student_after"]["val_loss"] < summary["student_before"]["val_loss"]


def test_activation_checkpointing_recomputes_each_layer_and_keeps_the_losses(tiny, tmp_path):
    losses, forwards_per_step = {}, {}
    for checkpointing in (False, True):
        run = tmp_path / str(checkpointing)
        trainer = Trainer(load_config(None, overrides(tiny, run, train__max_steps=3,
                                                      train__activation_checkpointing=checkpointing)))
        # A pre-hook of a module inside the first layer: the layer's own hooks stay outside its
        # checkpoint, and a recomputation stops (early) once it has what the backward needs.
        calls = []
        decoder_layers(trainer.student)[1][0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
        trainer.fit()
        losses[checkpointing] = [r["loss"] for r in train_records(run)]
        forwards_per_step[checkpointing] = len(calls)
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    # Evaluation forwards count in both; the difference is one recomputation per training step.
    assert forwards_per_step[True] - forwards_per_step[False] == 3


def test_fsdp_with_a_bf16_teacher_and_checkpointing_resumes_bitwise(tiny, tmp_path):
    """Two ranks match one process, and SIGKILL + --resume is bitwise, with both options on."""
    options = dict(teacher__dtype="bfloat16", train__activation_checkpointing=True)
    one, straight, killed = tmp_path / "one", tmp_path / "straight", tmp_path / "killed"
    common = dict(train__max_steps=8, output__checkpoint_interval=2, **options)
    _run([sys.executable, *CLI, *overrides(tiny, one, **common)])
    _run(torchrun(*CLI, *overrides(tiny, straight, train__parallel="fsdp", **common)))
    assert_same_run(one, straight, 8)
    died = _run(torchrun("--no-python", sys.executable, "-c", KILL_AT_STEP_5,
                         *overrides(tiny, killed, train__parallel="fsdp", **common)), check=False)
    assert died.returncode != 0
    _run(torchrun(*CLI, "--resume", *overrides(tiny, killed, train__parallel="fsdp", **common)))
    assert [r["loss"] for r in train_records(killed)] == [r["loss"] for r in train_records(straight)]
    expected, actual = final_weights(straight, 8), final_weights(killed, 8)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
