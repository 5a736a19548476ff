"""train.parallel=fsdp (FSDP2 over gloo on CPU): two ranks match one process, multi-node launches
too, a SIGKILL then --resume is bitwise exact, checkpoints export to one save_pretrained
directory, and bad set-ups are clear errors."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from tiny_models import overrides

from distillm_ext.recipe.config import ConfigError, load_config
from distillm_ext.recipe.trainer import Trainer
from test_trainer import KILL_AT_STEP_5, REPO, _run, final_weights, train_records

CLI = ["-m", "distillm_ext.recipe.cli", "train"]


def torchrun(*args, processes=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]


def assert_same_run(expected_run, actual_run, step):
    losses = [r["loss"] for r in train_records(expected_run)]
    assert [r["loss"] for r in train_records(actual_run)] == pytest.approx(losses, rel=1e-5)
    expected, actual = final_weights(expected_run, step), final_weights(actual_run, step)
    assert expected.keys() == actual.keys()  # tied weights once, as save_pretrained writes them
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", [dict(loss__type="skl"), dict(loss__type="srkl"),
                                      dict(sgo__mode="adaptive", eval__interval=2, sgo__buffer_size=8)],
                         ids=["skl", "srkl", "adaptive"])
def test_two_fsdp_ranks_match_one_process(tiny, tmp_path, settings):
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(train__max_steps=4, train__grad_accum=2, **settings)
    _run([sys.executable, *CLI, *overrides(tiny, one, **common)])
    _run(torchrun(*CLI, *overrides(tiny, two, train__parallel="fsdp", **common)))
    assert_same_run(one, two, 4)
    assert (two / "checkpoints" / "step-000004" / "sharded" / ".metadata").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_match_one_process(tiny, tmp_path):
    """Two torchrun launches of one process each, as on two machines, sharing a c10d rendezvous."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(train__max_steps=3)
    _run([sys.executable, *CLI, *overrides(tiny, one, **common)])
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "two-nodes"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous, *CLI,
                               *overrides(tiny, two, train__parallel="fsdp", **common)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs
    assert_same_run(one, two, 3)


def test_fsdp_sigkill_then_resume_is_bitwise_identical(tiny, tmp_path):
    common = dict(train__max_steps=8, output__checkpoint_interval=2, output__keep_checkpoints=3,
                  train__parallel="fsdp")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(torchrun(*CLI, *overrides(tiny, straight, **common)))
    died = _run(torchrun("--no-python", sys.executable, "-c", KILL_AT_STEP_5, *overrides(tiny, killed, **common)),
                check=False)
    assert died.returncode != 0
    assert (killed / "checkpoints" / "step-000004").is_dir() and not (killed / "checkpoints" / "step-000006").exists()
    _run(torchrun(*CLI, "--resume", *overrides(tiny, killed, **common)))
    assert [r["step"] for r in train_records(killed)] == list(range(1, 9))
    assert [r["loss"] for r in train_records(killed)] == [r["loss"] for r in train_records(straight)]
    expected, actual = final_weights(straight, 8), final_weights(killed, 8)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    # A different number of ranks: a clear error (each rank's RNG streams and replay buffer)
    resumed = _run(torchrun(*CLI, "--resume", *overrides(tiny, killed, **common), processes=1), check=False)
    assert resumed.returncode != 0 and "was saved by 2 process(es), and this run has 1" in resumed.stderr


def test_fsdp_export_is_read_by_eval_and_from_pretrained(tiny, tmp_path):
    """Also: 5 evaluation examples in batches of 2 give the ranks 2 and 1 batches. Every sharded
    forward needs all ranks, so evaluation pads the short rank (else this run would hang)."""
    run = tmp_path / "run"
    _run(torchrun(*CLI, *overrides(tiny, run, train__parallel="fsdp", train__max_steps=2, eval__num_examples=5,
                                   eval__batch_size=2)))
    scores = tmp_path / "scores.json"
    _run([sys.executable, "-m", "distillm_ext.recipe.cli", "eval", "--model", str(run), "--output", str(scores)])
    after = json.loads((run / "summary.json").read_text())["student_after"]
    assert json.loads(scores.read_text())["val_loss"] == pytest.approx(after["val_loss"], rel=1e-5)


def test_fsdp_without_torchrun_is_a_clear_error(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="train.parallel=fsdp shards over the processes of a torchrun launch"):
        Trainer(load_config(None, overrides(tiny, tmp_path / "run", train__parallel="fsdp")))
