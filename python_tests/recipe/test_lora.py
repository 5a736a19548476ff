"""LoRA students (student.lora_r, peft): only the adapter trains, checkpoints hold the adapter in
peft's format, resume is bitwise, DDP and FSDP match one process, `distillm eval` reads a LoRA
run, `distillm export` merges it into a plain model, and bad settings are one-line errors."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_fsdp import CLI, torchrun
from test_trainer import KILL_AT_STEP_5, _run, train_records
from tiny_models import overrides

from distillm_ext.recipe.cli import main
from distillm_ext.recipe.config import ConfigError, load_config
from distillm_ext.recipe.trainer import Trainer

peft = pytest.importorskip("peft", reason="LoRA needs peft (the [train] extra)")


def lora_args(tiny, run, **extra):
    return overrides(tiny, run, **{"student__lora_r": 8, **extra})


def adapter(run, step):
    return load_file(run / "checkpoints" / f"step-{step:06d}" / "model" / "adapter_model.safetensors")


def test_only_the_adapter_trains_and_the_base_is_untouched(tiny, tmp_path):
    trainer = Trainer(load_config(None, lora_args(tiny, tmp_path / "run", train__max_steps=12)))
    student = trainer.student
    trainable, _ = student.get_nb_trainable_parameters()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    expected = peft.get_peft_model(Trainer(load_config(None, overrides(tiny, tmp_path / "plain"))).student, config)
    assert trainable == expected.get_nb_trainable_parameters()[0] > 0
    in_optimizer = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    assert in_optimizer == trainable  # AdamW state for the adapter alone
    base = {name: p.detach().clone() for name, p in student.named_parameters() if "lora_" not in name}
    summary = trainer.fit()
    assert all(torch.equal(p, base[name]) for name, p in student.named_parameters() if "lora_" not in name)
    assert summary["student_after"]["val_loss"] < summary["student_before"]["val_loss"]


def test_a_lora_checkpoint_is_the_adapter_and_eval_reads_it(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *lora_args(tiny, run, train__max_steps=4)]) == 0
    model_dir = run / "checkpoints" / "step-000004" / "model"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in model_dir.iterdir()}
    assert not (model_dir / "model.safetensors").exists()  # not a copy of the student
    capsys.readouterr()
    assert main(["eval", "--model", str(run)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["val_loss"] == pytest.approx(json.loads((run / "summary.json").read_text())["student_after"]["val_loss"])


def test_export_merges_the_adapter_into_a_plain_model(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from distillm_ext.recipe.models import load_trained

    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["train", *lora_args(tiny, run, train__max_steps=4)]) == 0
    assert main(["export", str(run), str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not hasattr(merged, "peft_config")
    adapted, _ = load_trained(run / "checkpoints" / "step-000004" / "model", load_config(run / "config.json"))
    tokens = torch.randint(3, merged.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, adapted(tokens).logits, rtol=0, atol=1e-5)
    assert main(["export", str(run), str(out)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--overwrite", str(run), str(out)]) == 0


def test_export_of_a_full_run_copies_its_model(tiny, tmp_path):
    run, out = tmp_path / "run", tmp_path / "exported"
    assert main(["train", *overrides(tiny, run, train__max_steps=2)]) == 0
    assert main(["export", str(run), str(out)]) == 0
    expected = (run / "checkpoints" / "step-000002" / "model" / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() == expected


@pytest.mark.parametrize("settings", [dict(loss__fused_linear=False), dict(sgo__mode="on_policy", sgo__buffer_size=16),
                                      dict(train__grad_accum=2, student__lora_dropout=0.1)],
                         ids=["logits", "on_policy", "accumulation+dropout"])
def test_every_training_path_trains_a_lora_student(tiny, tmp_path, settings):
    summary = Trainer(load_config(None, lora_args(tiny, tmp_path / "run", train__max_steps=8, **settings))).fit()
    assert summary["student_after"]["val_loss"] < summary["student_before"]["val_loss"]


def test_lora_sigkill_then_resume_is_bitwise_identical(tiny, tmp_path):
    common = dict(train__max_steps=8, output__checkpoint_interval=2, output__keep_checkpoints=3,
                  student__lora_dropout=0.1)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run([sys.executable, *CLI, *lora_args(tiny, straight, **common)])
    assert _run([sys.executable, "-c", KILL_AT_STEP_5, *lora_args(tiny, killed, **common)], check=False).returncode == -9
    _run([sys.executable, *CLI, "--resume", *lora_args(tiny, killed, **common)])
    assert [r["loss"] for r in train_records(killed)] == [r["loss"] for r in train_records(straight)]
    expected, actual = adapter(straight, 8), adapter(killed, 8)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    with pytest.raises(ConfigError, match="holds a LoRA adapter, and student.lora_r is 0 now"):
        Trainer(load_config(None, lora_args(tiny, killed, **{**common, "student__lora_r": 0})), resume=True)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_a_lora_student_as_one_process(tiny, tmp_path, parallel):
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(train__max_steps=4, output__checkpoint_interval=2)
    _run([sys.executable, *CLI, *lora_args(tiny, one, **common)])
    _run(torchrun(*CLI, *lora_args(tiny, two, train__parallel=parallel, **common)))
    losses = [r["loss"] for r in train_records(one)]
    assert [r["loss"] for r in train_records(two)] == pytest.approx(losses, rel=1e-5)
    expected, actual = adapter(one, 4), adapter(two, 4)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    if parallel == "fsdp":  # and resumes from its sharded checkpoint
        _run(torchrun(*CLI, "--resume", *lora_args(tiny, two, train__parallel=parallel, **{**common,
                                                                                          "train__max_steps": 6})))
        assert [r["step"] for r in train_records(two)] == list(range(1, 7))


@pytest.mark.parametrize("setting, message", [
    (dict(student__lora_r=-1), "config key 'student.lora_r' must be >= 0"),
    (dict(student__lora_targets="c_attn"), "student.lora_targets: the student .* has no Linear layer named 'c_attn'"),
    (dict(student__lora_targets="q_proj,lm_head"), "'lm_head' is the output embedding, which the fused-linear loss"),
    (dict(student__lora_targets="all-linear,q_proj"), "all-linear stands alone"),
])
def test_bad_lora_settings_are_one_line_errors(tiny, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message) as error:
        Trainer(load_config(None, lora_args(tiny, tmp_path / "run", **setting)))
    assert "\n" not in str(error.value)
