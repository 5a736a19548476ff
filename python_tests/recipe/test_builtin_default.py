"""The built-in default (SmolLM2-135M-Instruct teacher from its GGUF package, a pruned student,
WordNet definitions) runs end to end through the `distillm` command, for a few steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distillm_ext.recipe.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_builtin_default_runs_a_few_steps(tmp_path):
    run = tmp_path / "default"
    result = subprocess.run(
        [sys.executable, "-m", "distillm_ext.recipe.cli", "train", "train.max_steps=3", "eval.num_examples=8",
         "eval.max_new_tokens=8", f"output.dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher" in result.stdout and "student after" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["teacher"]["examples"] == 8
    config = json.loads((run / "config.json").read_text())
    assert config["teacher"]["path"] == "builtin" and len(config["student"]["keep_layers"]) == 12
    assert (run / "plots" / "training.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["on_policy", "adaptive"])
def test_builtin_default_trains_on_student_outputs(tmp_path, mode):
    run = tmp_path / mode
    # adaptive with phi = 1 and a one-batch buffer: generate, then replay or generate.
    result = subprocess.run(
        [sys.executable, "-m", "distillm_ext.recipe.cli", "train", f"sgo.mode={mode}", "sgo.init_threshold=1.0",
         "sgo.buffer_size=8", "train.max_steps=3", "eval.num_examples=8", "eval.max_new_tokens=8",
         "eval.teacher=false", f"output.dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run)
    sources = [r["source"] for r in records if r["kind"] == "train"]
    assert sources[0] == "generate" and "dataset" not in sources
    assert all(r["kd_loss"] == r["kd_loss"] for r in records if r["kind"] == "train")
    assert (run / "plots" / "sgo.png").is_file()
