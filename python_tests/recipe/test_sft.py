"""`distillm sft`: supervised fine-tuning through the same trainer, with no teacher; and the
built-in teacher made by it on first use, atomically, leaving the caller's random streams alone."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import overrides

from distillm_ext.recipe import builtin_teacher
from distillm_ext.recipe.cli import main
from distillm_ext.recipe.config import SFT_SETTINGS, ConfigError, load_config
from distillm_ext.recipe.trainer import Trainer
from test_trainer import train_records


def sft_overrides(tiny, run, **extra):
    return overrides(tiny, run, **{"student__path": tiny["student"], "teacher__path": "none", **extra})


def test_sft_trains_the_student_on_the_responses_without_a_teacher(tiny, tmp_path, capsys):
    run = tmp_path / "sft"
    assert main(["sft", *sft_overrides(tiny, run, train__max_steps=12)]) == 0
    table = capsys.readouterr().out.split("run directory")[0]
    assert "student after" in table and "teacher" not in table
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"] is None
    assert summary["student_after"]["val_loss"] < 0.9 * summary["student_before"]["val_loss"]
    records = train_records(run)
    assert all(r["kd_loss"] == 0.0 and r["loss"] == r["ce_loss"] > 0 for r in records)
    config = json.loads((run / "config.json").read_text())
    assert config["teacher"]["path"] == "none" and config["loss"]["kd_ratio"] == 0.0


def test_sft_refuses_a_teacher(tiny, tmp_path, capsys):
    assert main(["sft", *sft_overrides(tiny, tmp_path / "run", teacher__path=tiny["teacher"])]) == 2
    assert "distillm sft trains without a teacher: config key 'teacher.path' must be none" in capsys.readouterr().err


def test_sft_builds_no_teacher(tiny, tmp_path):
    trainer = Trainer(load_config(None, sft_overrides(tiny, tmp_path / "run") + SFT_SETTINGS))
    assert trainer.teacher is None and trainer.vocab_size == trainer.student.config.vocab_size


def test_a_distilling_run_without_its_kd_term_is_sft(tiny, tmp_path):
    """loss.kd_ratio=0 never reads the teacher, so none is loaded (a loss study's gold baseline
    pays for no teacher forwards), and the run trains step for step as `distillm sft` does."""
    def steps(run):
        return [(r["loss"], r["kd_loss"], r["ce_loss"], r["grad_norm"]) for r in train_records(run)]

    own_student = {"student__path": tiny["student"], "train__max_steps": 4}
    assert main(["train", *overrides(tiny, tmp_path / "gold", **own_student), "loss.kd_ratio=0"]) == 0
    assert main(["sft", *sft_overrides(tiny, tmp_path / "sft", train__max_steps=4)]) == 0
    assert steps(tmp_path / "gold") == steps(tmp_path / "sft")
    assert all(kd == 0.0 for _, kd, _, _ in steps(tmp_path / "gold"))
    pruned = Trainer(load_config(None, overrides(tiny, tmp_path / "pruned") + ["loss.kd_ratio=0"]))
    assert pruned.teacher is None and pruned.student.config.num_hidden_layers == 2  # still built from its layers


@pytest.mark.parametrize("setting, message", [
    ("loss.kd_ratio=0.5", "'loss.kd_ratio' must be 0 without a teacher"),
    ("sgo.mode=on_policy", "'sgo.mode' must be off without a teacher"),
])
def test_a_run_without_a_teacher_needs_cross_entropy_alone(tiny, tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, sft_overrides(tiny, tmp_path / "run") + SFT_SETTINGS + [setting])


def test_the_builtin_student_needs_a_teacher(tiny, tmp_path):
    with pytest.raises(ConfigError, match='student.path "builtin" is the teacher with fewer layers'):
        Trainer(load_config(None, sft_overrides(tiny, tmp_path / "run", student__path="builtin") + SFT_SETTINGS))


@pytest.fixture
def tiny_builtin(tiny, tmp_path, monkeypatch):
    """The built-in teacher's tuning, on the tiny teacher and data, in a fresh cache."""
    monkeypatch.setenv("DISTILLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin_teacher, "untuned_dir", lambda: tiny["teacher"])
    recipe = [item for item in overrides(tiny, "unused", train__max_steps=4) if not item.startswith("output.dir")]
    monkeypatch.setattr(builtin_teacher, "TUNING_RECIPE", ["student.path=builtin-untuned", *recipe])
    return tmp_path / "cache" / builtin_teacher.TUNED_NAME


def test_the_builtin_teacher_is_tuned_once_and_keeps_the_callers_random_streams(tiny, tiny_builtin):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert builtin_teacher.tuned_dir() == tiny_builtin
    assert torch.equal(torch.rand(3), expected)
    tuned, untuned = (load_file(d / "model.safetensors") for d in (tiny_builtin, tiny["teacher"]))
    assert tuned.keys() == untuned.keys() and any(not torch.equal(tuned[k], untuned[k]) for k in tuned)
    assert sorted(p.name for p in tiny_builtin.parent.iterdir()) == [tiny_builtin.name]  # no leftovers
    assert builtin_teacher.tuned_dir() == tiny_builtin  # the second time, from the cache


def test_an_interrupted_tuning_never_looks_finished(tiny_builtin, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        builtin_teacher.tuned_dir()
    assert not tiny_builtin.parent.exists() or list(tiny_builtin.parent.iterdir()) == []
