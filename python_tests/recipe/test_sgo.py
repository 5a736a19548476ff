"""Student-generated outputs: packing and label alignment with dataset batches, the SGO batch
source, and the trainer's on_policy and adaptive modes (training, schedule, resume)."""

import json
import sys

import pytest
import torch
from test_trainer import KILL_AT_STEP_5, _run, final_weights, train, train_records
from tiny_models import overrides

from distillm_ext import ReplayBuffer
from distillm_ext.recipe.config import ConfigError, check_adaptive_can_engage, load_config
from distillm_ext.recipe.data import EncodedExample, collate_for_training, collate_prompts
from distillm_ext.recipe.evaluate import EvalResult
from distillm_ext.recipe.sgo import pack_generated
from distillm_ext.recipe.trainer import Trainer

EOS, PAD = 2, 0


def examples():
    """Prompts and EOS-terminated responses of different lengths, as encode_examples makes them."""
    return [
        EncodedExample(prompt_ids=[5, 6, 7], response_ids=[8, 9, EOS], reference="a"),
        EncodedExample(prompt_ids=[10], response_ids=[11, 12, 13, 14, EOS], reference="b"),
        EncodedExample(prompt_ids=[15, 16, 17, 18, 19], response_ids=[EOS], reference="c"),
    ]


def as_generated(batch, responses, pad_id, garbage_after_eos=False):
    """What `generate` returns for these left-padded prompts and responses: each response padded
    to the longest (or followed by junk tokens, which must be cut at the EOS)."""
    width = max(map(len, responses))
    tail = torch.full((len(responses), width), 77 if garbage_after_eos else pad_id, dtype=torch.long)
    for row, response in enumerate(responses):
        tail[row, :len(response)] = torch.tensor(response)
    return torch.cat([batch["input_ids"], tail], dim=1)


@pytest.mark.parametrize("pad_id", [PAD, EOS])  # many tokenizers pad with EOS
@pytest.mark.parametrize("garbage_after_eos", [False, True])
def test_sgo_batches_carry_exactly_the_labels_of_dataset_batches(device, pad_id, garbage_after_eos):
    rows = examples()
    prompts = collate_prompts(rows, pad_id)
    generated = as_generated(prompts, [e.response_ids for e in rows], pad_id, garbage_after_eos)
    packed = pack_generated(generated.to(device), prompts["attention_mask"].to(device), EOS, pad_id)
    buffer = ReplayBuffer(capacity=8, max_length=generated.shape[1], device=device, pad_token_id=pad_id)
    slots = buffer.push(*packed)
    from_buffer = buffer.gather(slots, trim=True)
    from_dataset = collate_for_training(rows, pad_id)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(from_buffer[key].cpu(), from_dataset[key]), key
    # ... and the same after a round trip through sampling.
    sampled = buffer.sample(3, trim=True)
    order = [slots.tolist().index(s) for s in sampled["indices"].tolist()]
    assert torch.equal(sampled["labels"].cpu(), from_dataset["labels"][order])


def test_a_response_without_eos_keeps_all_its_tokens():
    prompts = collate_prompts(examples()[:2], PAD)
    generated = as_generated(prompts, [[8, 9, 3], [11, EOS]], PAD)
    input_ids, prompt_lengths, lengths = pack_generated(generated, prompts["attention_mask"], EOS, PAD)
    assert prompt_lengths.tolist() == [3, 1] and lengths.tolist() == [6, 3]
    assert input_ids[0, :6].tolist() == [5, 6, 7, 8, 9, 3] and input_ids[1, :3].tolist() == [10, 11, EOS]


def test_generated_batches_from_a_real_student(tiny, tmp_path):
    trainer = Trainer(load_config(None, overrides(tiny, tmp_path, sgo__mode="on_policy", sgo__buffer_size=16)))
    source = trainer.source
    batch = source.next_batch(step=0)[0]
    assert source.name == "generate" and len(source.buffer) == 8
    eos = trainer.tokenizer.eos_token_id
    labels, input_ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    assert labels.shape == input_ids.shape == mask.shape
    for row in range(len(labels)):
        length = int(mask[row].sum())
        response = labels[row][labels[row] != -100]
        assert len(response) >= 1 and torch.equal(response, input_ids[row, length - len(response):length])
        # the response ends at its first EOS (kept), or runs to max_new_tokens
        assert (response == eos).sum() <= 1 and (response[-1] == eos or len(response) == 24 - 12)
    assert trainer.student.training  # back in train mode after generating


def sources_per_step(run):
    return [r["source"] for r in train_records(run)]


def test_on_policy_trains_on_fresh_outputs_every_step(tiny, tmp_path):
    run = tmp_path / "on_policy"
    summary = train(overrides(tiny, run, sgo__mode="on_policy", train__max_steps=6))
    records = train_records(run)
    assert sources_per_step(run) == ["generate"] * 6
    assert all(r["time"]["generate"] > 0 and r["buffer_size"] == min(8 * r["step"], 1000) for r in records)
    assert all(r["kd_loss"] == r["kd_loss"] for r in records)
    assert summary["steps"] == 6
    none = tmp_path / "lambda0"
    train(overrides(tiny, none, sgo__mode="on_policy", sgo__on_policy_ratio=0.0, train__max_steps=3))
    assert sources_per_step(none) == ["dataset"] * 3


def test_adaptive_fills_the_buffer_then_replays(tiny, tmp_path):
    run = tmp_path / "adaptive"
    train(overrides(tiny, run, sgo__mode="adaptive", sgo__init_threshold=1.0, sgo__buffer_size=16,
                    sgo__replay_ratio="constant", train__max_steps=12))
    sources = sources_per_step(run)
    assert sources[:2] == ["generate", "generate"]  # the buffer (16) fills in two steps of 8
    assert "replay" in sources[2:] and "generate" in sources[2:] and "dataset" not in sources
    assert all(r["phi"] == 1.0 for r in train_records(run))


@pytest.mark.parametrize("first_reference, scripted, expected_phi", [
    # The paper's code: the loss before training is the first reference. 2.0 >= 1.0 + eps rises
    # at step 2 (new reference 2.0), 2.05 is within eps, 2.3 rises, 2.1 does not.
    ("before_training", [1.0, 2.0, 2.05, 2.3, 2.1, 1.0], [0.0] * 2 + [0.1] * 4 + [0.2] * 4),
    # The other reading: the loss before training is ignored (here the undistilled student is far
    # worse); step 2 sets the reference 1.0; 1.05 is within eps; 1.3 rises; 1.8 rises.
    ("first_validation", [3.0, 1.0, 1.05, 1.3, 1.8, 1.0], [0.0] * 6 + [0.1] * 2 + [0.2] * 2),
])
def test_phi_rises_when_the_validation_loss_does(tiny, tmp_path, monkeypatch, first_reference, scripted,
                                                 expected_phi):
    losses = iter(scripted)  # before training, steps 2, 4, 6, 8, after
    monkeypatch.setattr(Trainer, "evaluate", lambda self, model: EvalResult(next(losses), 50.0, 4))
    run = tmp_path / "rising"
    train(overrides(tiny, run, sgo__mode="adaptive", sgo__loss_eps=0.2, eval__interval=2, train__max_steps=10,
                    sgo__buffer_size=8, sgo__first_reference=first_reference))
    phi = [r["phi"] for r in train_records(run)]
    assert phi == pytest.approx(expected_phi)
    assert set(sources_per_step(run)[:expected_phi.count(0.0)]) == {"dataset"}


def test_sigkill_then_resume_restores_buffer_and_scheduler(tiny, tmp_path):
    common = dict(train__max_steps=8, output__checkpoint_interval=2, output__keep_checkpoints=3,
                  sgo__mode="adaptive", sgo__init_threshold=0.7, sgo__buffer_size=8, eval__interval=3)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run([sys.executable, "-m", "distillm_ext.recipe.cli", "train", *overrides(tiny, straight, **common)])
    died = _run([sys.executable, "-c", KILL_AT_STEP_5, *overrides(tiny, killed, **common)], check=False)
    assert died.returncode == -9, died.stderr
    _run([sys.executable, "-m", "distillm_ext.recipe.cli", "train", "--resume", *overrides(tiny, killed, **common)])
    sources = sources_per_step(straight)
    assert {"generate", "replay"} <= set(sources[4:])  # the resumed part used the restored buffer
    assert sources_per_step(killed) == sources
    assert [r["loss"] for r in train_records(killed)] == [r["loss"] for r in train_records(straight)]
    expected, actual = final_weights(straight, 8), final_weights(killed, 8)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_two_processes_take_the_same_kind_of_step(tiny, tmp_path):
    run = tmp_path / "ddp"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "distillm_ext.recipe.cli", "train",
          *overrides(tiny, run, sgo__mode="adaptive", sgo__init_threshold=0.6, sgo__buffer_size=8,
                     train__max_steps=6, output__checkpoint_interval=3)])
    records = train_records(run)
    assert len(records) == 6 and {"generate", "dataset"} <= set(sources_per_step(run))
    assert all(r["buffer_size"] <= 8 for r in records)  # each rank's own buffer (4 rows per step)
    ranks = sorted(p.name for p in (run / "checkpoints" / "step-000006").glob("rank*.pt"))
    assert ranks == ["rank0.pt", "rank1.pt"]
    buffers = [torch.load(run / "checkpoints" / "step-000006" / r, weights_only=False)["source"]["buffer"]
               for r in ranks]
    assert not torch.equal(buffers[0]["tokens"], buffers[1]["tokens"])  # each rank its own SGOs


@pytest.mark.parametrize("override, message", [
    ("sgo.mode=sometimes", "sgo.mode"),
    ("sgo.on_policy_ratio=1.5", "sgo.on_policy_ratio"),
    ("sgo.buffer_size=4", "sgo.buffer_size"),
    ("sgo.replay_ratio=random", "sgo.replay_ratio"),
    ("sgo.top_p=0", "sgo.top_p"),
])
def test_bad_sgo_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("first_reference, interval, engages", [
    ("before_training", 0, False), ("before_training", 9, True), ("before_training", 10, False),
    ("first_validation", 9, False), ("first_validation", 4, True),
])
def test_adaptive_that_can_never_engage_is_an_error(first_reference, interval, engages):
    settings = ["sgo.mode=adaptive", f"eval.interval={interval}", f"sgo.first_reference={first_reference}"]
    config = load_config(None, [*settings, "train.max_steps=0"])  # epochs: the trainer checks, knowing their length
    if engages:
        check_adaptive_can_engage(config, total_steps=10)
        load_config(None, [*settings, "train.max_steps=10"])
    else:
        with pytest.raises(ConfigError, match="sgo.init_threshold' must be > 0 .* phi cannot rise"):
            check_adaptive_can_engage(config, total_steps=10)
        with pytest.raises(ConfigError, match="phi cannot rise"):  # with max_steps, before any model loads
            load_config(None, [*settings, "train.max_steps=10"])
    config.sgo.init_threshold = 0.2  # phi > 0 from the start: always engages
    check_adaptive_can_engage(config, total_steps=10)


def test_metrics_lines_are_json_with_sgo_fields(tiny, tmp_path):
    run = tmp_path / "fields"
    train(overrides(tiny, run, sgo__mode="adaptive", sgo__init_threshold=0.5, sgo__buffer_size=8,
                    train__max_steps=4, output__log_interval=2, output__plots=True))
    records = train_records(run)
    assert [sum(r["sources"].values()) for r in records] == [2, 2]  # steps per source over each line
    assert all({"phi", "buffer_size", "sources"} <= set(r) for r in records)
    assert (run / "plots" / "sgo.png").stat().st_size > 10_000
    json.loads((run / "summary.json").read_text())
