"""The offline teacher: `distillm cache-teacher` writes the teacher's top-k, the code keeps ids
exactly and log-probabilities within its bound, `distillm train teacher.cache=DIR` trains from it
with no teacher loaded, and a cache of another run, an incomplete cache or a killed writer are
handled, never silently wrong."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from tiny_models import make_model, make_tokenizer, overrides

from distillm_ext.recipe import cache_teacher as writer
from distillm_ext.recipe.batches import to_device
from distillm_ext.recipe.cli import main
from distillm_ext.recipe.config import ConfigError, load_config
from distillm_ext.recipe.data import EncodedExample, collate_for_training, load_split
from distillm_ext.recipe.kd_loss import TeacherHiddenStates, TeacherTopK
from distillm_ext.recipe.models import load_teacher
from distillm_ext.recipe.teacher_cache import TeacherCache
from distillm_ext.recipe.topk_codec import TopKCodec
from distillm_ext.recipe.trainer import Trainer
from test_trainer import _run, final_weights, train_records


# -- the code ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size, top_k", [(3, 1), (3, 3), (49152, 32), (128256, 32), (151936, 7)])
def test_the_code_keeps_ids_exactly_and_logprobs_within_its_bound(vocab_size, top_k):
    codec = TopKCodec(vocab_size, top_k)
    generator = torch.Generator().manual_seed(vocab_size + top_k)
    logits = torch.randn(50, vocab_size, generator=generator) * 4
    logprobs, ids = torch.log_softmax(logits, -1).topk(top_k, -1)
    logprobs[0, -1] = -40.0  # below the floor: stored as the floor
    packed = codec.encode(ids, logprobs)
    assert packed.dtype == np.uint8 and packed.shape == (50, codec.bytes_per_token)
    decoded_ids, decoded = codec.decode(packed)
    assert torch.equal(decoded_ids, ids)
    assert (decoded - logprobs.clamp(min=codec.logprob_floor)).abs().max() <= codec.max_error + 1e-6
    assert decoded[0, -1] == codec.logprob_floor


def test_the_code_fits_128_bytes_per_token_at_k_32_for_128k_vocabularies():
    assert TopKCodec(128256, 32).bytes_per_token == 116  # 17-bit ids, 12-bit log-probabilities
    assert TopKCodec(49152, 32).bytes_per_token == 112


def test_the_code_refuses_ids_out_of_range():
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\)"):
        TopKCodec(10, 2).encode(torch.tensor([[3, 10]]), torch.zeros(1, 2))


# -- cache-teacher ----------------------------------------------------------------------------

def cache_args(tiny, tmp_path, top_k=8, **extra):
    return overrides(tiny, tmp_path / "run", **{"cache__dir": tmp_path / "cache", "cache__top_k": top_k,
                                                "cache__batch_size": 5, **extra})


@pytest.fixture(scope="module")
def tiny_cache(tiny, tmp_path_factory):
    """A top-8 cache of the tiny teacher in 3 shards, and the config it was made with."""
    root = tmp_path_factory.mktemp("cache")
    args = cache_args(tiny, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer, "SHARD_EXAMPLES", 12)
        assert main(["cache-teacher", *args]) == 0
    return root / "cache", args


def test_the_cache_holds_the_teachers_top_k_at_every_response_position(tiny_cache):
    directory, args = tiny_cache
    config = load_config(None, args)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    teacher, tokenizer = load_teacher(config.teacher.path)
    examples = load_split(config.data, "train", tokenizer)
    assert manifest["tokens"] == sum(len(e.response_ids) for e in examples)
    cache = TeacherCache(directory)
    picked = [examples[i] for i in (30, 0, 17)]  # across shards, in any order
    batch = collate_for_training(picked, 0)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    expected_logprobs, expected_ids = torch.log_softmax(logits[batch["labels"][:, 1:] != -100], -1).topk(8, -1)
    signal = cache.signal(batch["example_ids"], torch.device("cpu"))
    assert torch.equal(signal.ids.long(), expected_ids)
    assert (signal.logprobs - expected_logprobs).abs().max() <= cache.codec.max_error + 1e-5


def test_a_run_reads_the_first_k_of_a_larger_cache_which_are_its_top_k(tiny, tiny_cache, tmp_path):
    """teacher.cache_top_k: one cache at a large k serves a sweep over every smaller k."""
    directory, _ = tiny_cache
    trainer = Trainer(load_config(None, overrides(tiny, tmp_path / "run", teacher__cache=directory,
                                                  teacher__cache_top_k=3)))
    batch = trainer.source.next_batch(0)[0]
    first_three = trainer.forwards.teacher_signal(batch)
    every = TeacherCache(directory).signal(batch["example_ids"], torch.device("cpu"))
    assert first_three.ids.shape[-1] == 3 and every.ids.shape[-1] == 8
    assert torch.equal(first_three.ids, every.ids[:, :3]) and torch.equal(first_three.logprobs, every.logprobs[:, :3])
    assert (every.logprobs.diff(dim=-1) <= 0).all()  # most likely first
    with pytest.raises(ConfigError, match=r"'teacher.cache_top_k' must be <= the k of teacher.cache .* \(8\), got 9"):
        Trainer(load_config(None, overrides(tiny, tmp_path / "nine", teacher__cache=directory, teacher__cache_top_k=9)))


def test_example_ids_stay_on_the_host_where_the_cache_reads_them():
    """On an accelerator, reading device-resident ids back would stall every cache-fed step."""
    batch = collate_for_training([EncodedExample([1, 2], [3, 4], "", index=5)], pad_id=0)
    moved = to_device(batch, torch.device("meta"))
    assert moved["example_ids"].device.type == "cpu" and moved["example_ids"].tolist() == [5]
    assert {moved[k].device.type for k in ("input_ids", "attention_mask", "labels")} == {"meta"}


def test_training_from_the_cache_loads_no_teacher_and_learns(tiny, tiny_cache, tmp_path):
    directory, _ = tiny_cache
    trainer = Trainer(load_config(None, overrides(tiny, tmp_path / "run", teacher__cache=directory,
                                                  train__max_steps=12)))
    assert trainer.teacher is None
    batch = trainer.source.next_batch(0)[0]
    assert isinstance(trainer.forwards.teacher_signal(batch), TeacherTopK)
    summary = trainer.fit()
    losses = [r["kd_loss"] for r in train_records(tmp_path / "run")]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert summary["student_after"]["val_loss"] < summary["student_before"]["val_loss"]
    assert summary["teacher"] is None  # not loaded, so not scored


@pytest.mark.parametrize("fused_linear", [True, False])
def test_with_every_id_the_cached_loss_is_the_live_loss_to_quantization(tiny, tmp_path, fused_linear):
    """K = V: the cache-fed loss differs from the live teacher's only by the code's rounding."""
    assert main(["cache-teacher", *cache_args(tiny, tmp_path, top_k=len(make_tokenizer()))]) == 0
    losses = {}
    for name, extra in (("live", {}), ("cached", {"teacher__cache": tmp_path / "cache"})):
        trainer = Trainer(load_config(None, overrides(tiny, tmp_path / name, loss__fused_linear=fused_linear,
                                                      loss__kd_ratio=0.5, **extra)))
        batch = trainer.source.next_batch(0)[0]
        student = trainer.forwards.student_outputs(batch)
        losses[name] = trainer.loss(**student, teacher=trainer.forwards.teacher_signal(batch),
                                    targets=batch["labels"][:, 1:])
    for live, cached in zip(losses["live"], losses["cached"]):
        torch.testing.assert_close(cached, live, rtol=5e-3, atol=1e-4)


def test_student_outputs_go_to_the_live_teacher_and_dataset_batches_to_the_cache(tiny, tiny_cache, tmp_path):
    directory, _ = tiny_cache
    trainer = Trainer(load_config(None, overrides(tiny, tmp_path / "run", teacher__cache=directory,
                                                  sgo__mode="on_policy", sgo__buffer_size=16)))
    assert trainer.teacher is not None
    generated = trainer.source.next_batch(0)[0]  # on_policy_ratio 1: a generated batch
    assert "example_ids" not in generated
    assert isinstance(trainer.forwards.teacher_signal(generated), TeacherHiddenStates)
    trainer.fit()


def test_sigkill_then_resume_from_the_cache_is_bitwise_identical(tiny, tiny_cache, tmp_path):
    from test_trainer import KILL_AT_STEP_5

    directory, _ = tiny_cache
    common = dict(train__max_steps=8, output__checkpoint_interval=2, teacher__cache=directory)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run([sys.executable, "-m", "distillm_ext.recipe.cli", "train", *overrides(tiny, straight, **common)])
    assert _run([sys.executable, "-c", KILL_AT_STEP_5, *overrides(tiny, killed, **common)], check=False).returncode == -9
    _run([sys.executable, "-m", "distillm_ext.recipe.cli", "train", "--resume", *overrides(tiny, killed, **common)])
    assert [r["loss"] for r in train_records(killed)] == [r["loss"] for r in train_records(straight)]
    expected, actual = final_weights(straight, 8), final_weights(killed, 8)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


# -- a cache of another run is an error -------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("loss__temperature", 2.0, "loss.temperature: 1.0 in the cache, 2.0 in this run"),
    ("data__max_length", 20, "data.max_length: 24 in the cache, 20 in this run"),
    ("data__train", "validation", r"the train split \(data.train\): fingerprint"),
])
def test_a_cache_of_another_run_is_refused(tiny, tiny_cache, tmp_path, key, value, message):
    directory, _ = tiny_cache
    setting = {key: tiny.get(value, value)}
    with pytest.raises(ConfigError, match=f"teacher.cache .* was made for another run: .*{message}"):
        Trainer(load_config(None, overrides(tiny, tmp_path / "run", teacher__cache=directory, **setting)))


def test_a_cache_of_another_teacher_or_tokenizer_is_refused(tiny, tiny_cache, tmp_path):
    directory, _ = tiny_cache
    other = tmp_path / "other_teacher"
    tokenizer = make_tokenizer()
    tokenizer.pad_token = "<unk>"  # the same vocabulary, another special token
    make_model(len(tokenizer), 4, seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"the teacher \(teacher.path\): fingerprint .*the tokenizer: fingerprint"):
        Trainer(load_config(None, overrides(tiny, tmp_path / "run", teacher__cache=directory, teacher__path=other)))


def test_an_incomplete_cache_is_refused(tiny, tiny_cache, tmp_path):
    directory = tmp_path / "partial"
    shutil.copytree(tiny_cache[0], directory)
    (directory / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="is incomplete .*run distillm cache-teacher again to finish it"):
        Trainer(load_config(None, overrides(tiny, tmp_path / "run", teacher__cache=directory)))


# -- cache-teacher: resumable, torchrun, overwrite --------------------------------------------

KILL_AFTER_TWO_SHARDS = """
import os, signal, sys
from distillm_ext.recipe import cache_teacher as writer
from distillm_ext.recipe.cli import main

writer.SHARD_EXAMPLES = 12
write_shard, written = writer.write_shard, []

def write_then_die(*args, **kwargs):
    write_shard(*args, **kwargs)
    written.append(args[0])
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

writer.write_shard = write_then_die
sys.exit(main(sys.argv[1:]))
"""

SMALL_SHARDS = """
import sys
from distillm_ext.recipe import cache_teacher as writer
from distillm_ext.recipe.cli import main

writer.SHARD_EXAMPLES = 12
sys.exit(main(sys.argv[1:]))
"""


def shard_bytes(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.glob("shard-*.safetensors"))}


def test_a_killed_cache_teacher_continues_where_it_stopped(tiny, tiny_cache, tmp_path):
    args = cache_args(tiny, tmp_path)
    died = _run([sys.executable, "-c", KILL_AFTER_TWO_SHARDS, "cache-teacher", *args], check=False)
    assert died.returncode == -9, died.stderr
    directory = tmp_path / "cache"
    assert len(shard_bytes(directory)) == 2 and not (directory / "manifest.json").exists()
    resumed = _run([sys.executable, "-c", SMALL_SHARDS, "cache-teacher", *args])
    assert "resuming: 2 of this rank's 3 shards are written already" in resumed.stderr
    assert shard_bytes(directory) == shard_bytes(tiny_cache[0])  # as if never killed


def test_two_ranks_write_the_cache_one_process_writes(tiny, tiny_cache, tmp_path):
    script = tmp_path / "small_shards.py"
    script.write_text(SMALL_SHARDS)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(script), "cache-teacher", *cache_args(tiny, tmp_path)])
    assert shard_bytes(tmp_path / "cache") == shard_bytes(tiny_cache[0])
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["tokens"] == json.loads((tiny_cache[0] / "manifest.json").read_text())["tokens"]


def test_cache_teacher_refuses_a_directory_of_another_config_without_overwrite(tiny, tiny_cache, tmp_path, capsys):
    directory = tmp_path / "cache"
    shutil.copytree(tiny_cache[0], directory)
    args = cache_args(tiny, tmp_path, top_k=4)
    assert main(["cache-teacher", *args]) == 2
    assert "holds a cache for another config: cache.top_k: 8 in the cache, 4 in this run" in capsys.readouterr().err
    assert main(["cache-teacher", "--overwrite", *args]) == 0
    assert json.loads((directory / "manifest.json").read_text())["codec"]["top_k"] == 4
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    assert main(["cache-teacher", *cache_args(tiny, tmp_path, cache__dir=tmp_path / "junk")]) == 2
    assert "is not empty and holds no teacher cache" in capsys.readouterr().err


def test_a_complete_cache_is_not_made_twice(tiny, tiny_cache, tmp_path):
    directory = tmp_path / "cache"
    shutil.copytree(tiny_cache[0], directory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer, "SHARD_EXAMPLES", 12)
        patch.setattr(writer, "write_shard", lambda *a, **k: pytest.fail("wrote a shard of a complete cache"))
        assert main(["cache-teacher", *cache_args(tiny, tmp_path)]) == 0
