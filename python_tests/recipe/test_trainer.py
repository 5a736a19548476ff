"""The trainer on tiny random models: every loss trains, outputs are written, resume is exact,
two processes match one, and faults stop the run cleanly."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import overrides

from distillm_ext.recipe.config import load_config
from distillm_ext.recipe.metrics import read_metrics
from distillm_ext.losses import LOSSES
from distillm_ext.recipe.stopping import RunStopped
from distillm_ext.recipe.optim import lr_factor
from distillm_ext.recipe.trainer import NonFiniteError, Trainer

REPO = Path(__file__).resolve().parents[2]


def train(args, **kwargs) -> dict:
    return Trainer(load_config(None, args), **kwargs).fit()


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def final_weights(run_dir: Path, step: int) -> dict:
    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "model" / "model.safetensors")


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_loss_type_trains(tiny, tmp_path, loss_type):
    run = tmp_path / loss_type
    summary = train(overrides(tiny, run, loss__type=loss_type, train__max_steps=12))
    losses = [r["kd_loss"] for r in train_records(run)]
    assert len(losses) == 12 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses  # it learns, by a clear margin
    assert summary["student_after"]["val_loss"] < summary["student_before"]["val_loss"]


def test_run_directory_outputs(tiny, tmp_path):
    run = tmp_path / "run"
    summary = train(overrides(tiny, run, output__plots=True, eval__interval=3, loss__kd_ratio=0.5,
                              output__checkpoint_interval=2, output__keep_checkpoints=2))
    assert json.loads((run / "config.json").read_text())["loss"]["kd_ratio"] == 0.5
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"teacher_forward", "student_forward", "student_backward", "loss", "optimizer"} <= set(train_rows[0]["time"])
    assert all(r["ce_loss"] is not None and r["tokens_per_s"] > 0 and r["source"] == "dataset" for r in train_rows)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 3, 6]
    assert (run / "plots" / "training.png").stat().st_size > 10_000
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-000004", "step-000006"]
    assert (run / "checkpoints" / "step-000006" / "model" / "model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text()) == summary


def test_lr_schedules():
    assert [round(lr_factor(s, 2, 10, "constant"), 3) for s in (0, 1, 2, 9)] == [0.333, 0.667, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "cosine") == 1.0 and lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, 2, 10, "linear") == pytest.approx(0.5) and lr_factor(10, 2, 10, "linear") == 0.0


def _run(args, env_extra=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


KILL_AT_STEP_5 = """
import os, signal, sys
from distillm_ext.recipe.config import load_config
from distillm_ext.recipe.trainer import Trainer

def kill(trainer, step):
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)

Trainer(load_config(None, sys.argv[1:]), callbacks=(kill,)).fit()
"""


def test_sigkill_then_resume_is_bitwise_identical(tiny, tmp_path):
    common = dict(train__max_steps=8, output__checkpoint_interval=2, output__keep_checkpoints=3)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run([sys.executable, "-m", "distillm_ext.recipe.cli", "train", *overrides(tiny, straight, **common)])
    died = _run([sys.executable, "-c", KILL_AT_STEP_5, *overrides(tiny, killed, **common)], check=False)
    assert died.returncode == -9, died.stderr
    assert (killed / "checkpoints" / "step-000004").is_dir() and not (killed / "checkpoints" / "step-000006").exists()
    _run([sys.executable, "-m", "distillm_ext.recipe.cli", "train", "--resume", *overrides(tiny, killed, **common)])
    expected, actual = final_weights(straight, 8), final_weights(killed, 8)
    assert [r["step"] for r in train_records(killed)] == list(range(1, 9))  # step 5 logged once
    assert [r["loss"] for r in train_records(killed)] == [r["loss"] for r in train_records(straight)]
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_two_processes_match_one(tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(train__max_steps=4, train__grad_accum=2)
    _run([sys.executable, "-m", "distillm_ext.recipe.cli", "train", *overrides(tiny, one, **common)])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "distillm_ext.recipe.cli", "train", *overrides(tiny, two, **common)])
    expected, actual = final_weights(one, 4), final_weights(two, 4)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    losses_one = [r["loss"] for r in train_records(one)]
    losses_two = [r["loss"] for r in train_records(two)]
    assert losses_two == pytest.approx(losses_one, rel=1e-5)  # metrics reduced over both ranks


def test_non_finite_weights_stop_the_run_at_the_next_step(tiny, tmp_path):
    def poison(trainer, step):
        if step == 2:
            with torch.no_grad():
                next(trainer.student.parameters()).fill_(float("nan"))

    run = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm at step 3.*step-000002"):
        train(overrides(tiny, run, output__checkpoint_interval=2), callbacks=(poison,))
    weights = final_weights(run, 2)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (run / "checkpoints" / "step-000004").exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny, tmp_path):
    def interrupt(trainer, step):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # the run finishes step 4, saves it and stops

    run = tmp_path / "interrupted"
    with pytest.raises(RunStopped, match="stopped at step 4"):
        train(overrides(tiny, run), callbacks=(interrupt,))
    assert (run / "checkpoints" / "step-000004").is_dir()
    summary = train(overrides(tiny, run), resume=True)
    assert summary["steps"] == 6


def test_resume_without_checkpoint_is_an_error(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(load_config(None, overrides(tiny, tmp_path / "empty")), resume=True)


def test_the_results_table_states_the_share_of_the_teachers_lead_recovered():
    from distillm_ext.recipe.cli import results_table

    scores = lambda loss, rouge: {"val_loss": loss, "rougeL": rouge}  # noqa: E731
    table = results_table({"teacher": scores(5.0, 20.0), "student_before": scores(9.0, 0.0),
                           "student_after": scores(6.0, 5.0)})
    assert table.splitlines()[-1].split() == ["gap", "recovered", "75%", "25%"]
    assert "gap" not in results_table({"teacher": None, "student_before": scores(9.0, 0.0),
                                       "student_after": scores(6.0, 5.0)})
