"""Sharded loading under train.parallel=fsdp: each rank reads only its shards, and the weights
it ends with are bitwise those of from_pretrained, for tied and untied embeddings, single-file
and multi-file checkpoints, the built-in student's renamed layers and a bfloat16 teacher; a
missing or truncated file is a one-line error that names it."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from test_fsdp import CLI, assert_same_run, torchrun
from test_trainer import _run, train_records
from tiny_models import make_model, make_tokenizer, overrides

from distillm_ext.recipe.config import ConfigError
from distillm_ext.recipe.models import load_teacher, student_from_layers
from distillm_ext.recipe.sharded_loading import fill_shards, loadable_state

WORKER = Path(__file__).with_name("sharded_load_worker.py")


def save_model(directory: Path, tied: bool, layers: int = 4, seed: int = 0, max_shard_size: str = "5GB") -> Path:
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer), layers, seed)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight + 0.02 * torch.randn_like(model.lm_head.weight))
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(directory)
    return directory


def load_sharded(tiny, tmp_path, **settings) -> dict:
    out = tmp_path / "loaded.pt"
    _run(torchrun(str(WORKER), str(out), *overrides(tiny, tmp_path / "run", **settings)))
    return torch.load(out)


def assert_bitwise(loaded: dict, expected_model) -> None:
    expected = loadable_state(expected_model)  # as save_pretrained writes it: a tied embedding once
    assert loaded["state"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded["state"][name], tensor), name
    buffers = dict(expected_model.named_buffers())
    assert loaded["buffers"].keys() == buffers.keys()
    for name, buffer in buffers.items():  # rotary inv_freq: not in the files, computed alike
        assert torch.equal(loaded["buffers"][name], buffer), name
    tied = expected_model.get_output_embeddings().weight is expected_model.get_input_embeddings().weight
    assert loaded["tied"] == tied
    # Each of the two ranks holds about half of the parameters, never the whole model.
    whole = sum(p.numel() for p in expected_model.parameters())
    assert whole // 2 - 64 <= loaded["local_numel"] <= whole // 2 + 64


@pytest.mark.parametrize("tied,max_shard_size", [(True, "20KB"), (False, "5GB")], ids=["tied-multi-file", "untied-single-file"])
def test_sharded_loading_equals_from_pretrained(tiny, tmp_path, tied, max_shard_size):
    teacher_dir = save_model(tmp_path / "teacher", tied, max_shard_size=max_shard_size)
    files = sorted(p.name for p in teacher_dir.glob("*.safetensors"))
    assert (len(files) > 1) == (max_shard_size == "20KB"), files
    student_dir = save_model(tmp_path / "student", tied, layers=2, seed=1, max_shard_size=max_shard_size)
    loaded = load_sharded(tiny, tmp_path, teacher__path=teacher_dir, student__path=student_dir, train__parallel="fsdp")
    assert_bitwise(loaded["teacher"], load_teacher(str(teacher_dir))[0])
    assert_bitwise(loaded["student"], load_teacher(str(student_dir))[0])


def test_the_builtin_students_layers_and_a_bf16_teacher_load_sharded(tiny, tmp_path):
    teacher_dir = save_model(tmp_path / "teacher", tied=True, max_shard_size="20KB")
    loaded = load_sharded(tiny, tmp_path, teacher__path=teacher_dir, student__keep_layers="3,1",
                          teacher__dtype="bfloat16", train__parallel="fsdp")
    assert loaded["teacher"]["dtype"] == "torch.bfloat16"
    assert_bitwise(loaded["teacher"], load_teacher(str(teacher_dir))[0].to(torch.bfloat16))
    assert_bitwise(loaded["student"], student_from_layers(teacher_dir, [3, 1]))


def test_a_missing_or_truncated_shard_is_a_one_line_error_naming_it(tmp_path):
    teacher_dir = save_model(tmp_path / "teacher", tied=True, max_shard_size="20KB")
    victim = sorted(teacher_dir.glob("model-*.safetensors"))[1]
    content = victim.read_bytes()
    victim.write_bytes(content[: len(content) // 2])
    with pytest.raises(ConfigError, match=f"{victim}: cannot read it .*truncated") as error:
        fill_shards(load_teacher(str(teacher_dir), empty=True)[0], torch.device("cpu"))
    assert "\n" not in str(error.value)
    victim.unlink()
    with pytest.raises(ConfigError, match=f"{victim}: missing") as error:
        fill_shards(load_teacher(str(teacher_dir), empty=True)[0], torch.device("cpu"))
    assert "\n" not in str(error.value)


def test_a_checkpoint_without_a_tensor_the_model_needs_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    teacher_dir = save_model(tmp_path / "teacher", tied=True)
    weights = load_file(teacher_dir / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, teacher_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"lack 1 tensors the model needs, e.g. \['model.norm.weight'\]"):
        fill_shards(load_teacher(str(teacher_dir), empty=True)[0], torch.device("cpu"))


def test_an_untied_teacher_trains_sharded_as_in_one_process(tiny, tmp_path):
    """An untied teacher's embeddings are FSDP groups of their own (parallel.shard): two ranks
    still give one process's losses and weights."""
    teacher_dir = save_model(tmp_path / "teacher", tied=False, max_shard_size="20KB")
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(teacher__path=teacher_dir, train__max_steps=3)
    _run([sys.executable, *CLI, *overrides(tiny, one, **common)])
    _run(torchrun(*CLI, *overrides(tiny, two, train__parallel="fsdp", **common)))
    assert_same_run(one, two, 3)


def test_sharded_models_generate(tiny, tmp_path):
    """Every step on fresh student outputs under fsdp: the student is gathered once per generate
    call, each rank stops at its own last token, and training goes on sharded after it; the
    (untied) teacher answers the evaluation layer by layer, its ranks in step."""
    teacher_dir = save_model(tmp_path / "teacher", tied=False)
    run = tmp_path / "run"
    _run(torchrun(*CLI, *overrides(tiny, run, teacher__path=teacher_dir, train__parallel="fsdp", train__max_steps=3,
                                   sgo__mode="on_policy", eval__max_new_tokens=6, eval__teacher=True)))
    records = train_records(run)
    assert [r["source"] for r in records] == ["generate"] * 3
    assert all(math.isfinite(r["loss"]) for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"]["rougeL"] >= 0 and summary["student_after"]["rougeL"] >= 0
