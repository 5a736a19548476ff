"""The examples in examples/ run as their docstrings say, on tiny models, with finite losses."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(script: str, tiny: dict, *extra: str) -> str:
    command = [sys.executable, str(EXAMPLES / script), "--teacher", str(tiny["teacher"]),
               "--student", str(tiny["student"]), "--data", str(tiny["train"]), "--steps", "4",
               "--batch-size", "4", "--lr", "1e-3", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_plain_pytorch_loop(tiny):
    losses = [float(x) for x in re.findall(r"step \d+: loss (\S+)", run_example("distill_plain_loop.py", tiny))]
    assert len(losses) == 4 and all(math.isfinite(loss) and loss >= 0 for loss in losses)


def test_transformers_trainer_compute_loss(tiny, tmp_path):
    output = run_example("distill_hf_trainer.py", tiny, "--output-dir", str(tmp_path / "run"))
    losses = [float(x) for x in re.search(r"losses: (.*)", output).group(1).split()]
    assert len(losses) == 4 and all(math.isfinite(loss) and loss >= 0 for loss in losses)


def test_transformers_trainer_accumulation_averages_as_one_batch(tiny, tmp_path):
    """Batches of 4, or 2 accumulated twice: the same samples per step, and through
    num_items_in_batch the same loss per step (a per-micro-batch mean the Trainer did not
    divide by the accumulation steps would double it)."""
    runs = {}
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        output = run_example("distill_hf_trainer.py", tiny, "--output-dir", str(tmp_path / f"ga{grad_accum}"),
                             "--batch-size", str(batch_size), "--grad-accum", str(grad_accum))
        runs[grad_accum] = [float(x) for x in re.search(r"losses: (.*)", output).group(1).split()]
    assert runs[2] == pytest.approx(runs[1], rel=2e-3), runs


def test_trl_gkd_trainer_with_skew_kl_and_a_lora_student(tiny, tmp_path):
    pytest.importorskip("trl", reason="the TRL example needs trl (pip install 'distillm_ext[examples]')")
    output = run_example("trl_gkd_skew_kl.py", tiny, "--output-dir", str(tmp_path / "run"), "--lmbda", "0.5",
                         "--max-new-tokens", "4")
    trainable, total = map(int, re.search(r"LoRA student: (\d+) of (\d+) parameters", output).groups())
    assert 0 < trainable < total / 2
    losses = [float(x) for x in re.search(r"losses: (.*)", output).group(1).split()]
    assert len(losses) == 4 and all(math.isfinite(loss) and loss >= 0 for loss in losses)
