"""ReplayBuffer and the replay ops: FIFO, sampling without replacement, uniformity, priorities,
state round trip, labels, bad input, opcheck; CUDA without host synchronization."""

import collections
import math

import pytest
import torch

from conftest import DEVICES
from distillm_ext import ReplayBuffer

# Upper 0.1% points of the chi-square distribution (a correct sampler fails 1 run in 1000;
# the seeds are fixed, so a run either always passes or always fails).
CHI2_999 = {3: 16.27, 19: 43.82}


def chi_square(counts, expected):
    return sum((c - e) ** 2 / e for c, e in zip(counts, expected))


def sequences(first_token, count, device, width=6):
    """count right-padded rows: row i is [first+i] * (2 + i % 4), prompt 1 token, then pad 0."""
    ids = torch.zeros(count, width, dtype=torch.long)
    lengths = torch.tensor([2 + i % 4 for i in range(count)])
    for i in range(count):
        ids[i, : lengths[i]] = first_token + i
    return ids.to(device), torch.ones(count, dtype=torch.long, device=device), lengths.to(device)


def held_tokens(buffer):
    """The first token of every entry, found by sampling all of them."""
    batch = buffer.sample(len(buffer))
    return sorted(batch["input_ids"][:, 0].tolist())


def test_fifo_evicts_the_oldest(device):
    buffer = ReplayBuffer(capacity=5, max_length=6, device=device)
    for first in (10, 20, 30):
        buffer.push(*sequences(first, 3, device))
    assert len(buffer) == 5 and buffer.is_full
    assert held_tokens(buffer) == [21, 22, 30, 31, 32]


def test_a_batch_larger_than_capacity_equals_pushing_one_by_one(device):
    whole = ReplayBuffer(capacity=4, max_length=6, device=device)
    single = ReplayBuffer(capacity=4, max_length=6, device=device)
    whole.push(*sequences(50, 2, device))
    single.push(*sequences(50, 2, device))
    ids, prompts, lengths = sequences(10, 7, device)
    whole.push(ids, prompts, lengths, step=3)
    for i in range(7):
        single.push(ids[i:i + 1], prompts[i:i + 1], lengths[i:i + 1], step=3)
    for name in ("tokens", "meta", "priorities", "cursor"):
        assert torch.equal(getattr(whole, name), getattr(single, name)), name
    assert held_tokens(whole) == [13, 14, 15, 16]


def test_gather_builds_hugging_face_labels(device):
    buffer = ReplayBuffer(capacity=3, max_length=7, device=device, pad_token_id=9)
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 0, 0]], device=device)
    buffer.push(ids, torch.tensor([2, 1], device=device), torch.tensor([4, 3], device=device))
    batch = buffer.sample(2)
    order = batch["indices"].tolist()
    expected = {
        0: ([1, 2, 3, 4, 9, 9, 9], [1, 1, 1, 1, 0, 0, 0], [-100, -100, 3, 4, -100, -100, -100]),
        1: ([5, 6, 7, 9, 9, 9, 9], [1, 1, 1, 0, 0, 0, 0], [-100, 6, 7, -100, -100, -100, -100]),
    }
    for row, slot in enumerate(order):
        ids_, mask, labels = expected[slot]
        assert batch["input_ids"][row].tolist() == ids_
        assert batch["attention_mask"][row].tolist() == mask
        assert batch["labels"][row].tolist() == labels
    trimmed = buffer.sample(2, trim=True)
    assert trimmed["input_ids"].shape == (2, 4)


def test_samples_are_distinct_and_only_from_filled_slots(device):
    buffer = ReplayBuffer(capacity=16, max_length=6, device=device, seed=1)
    buffer.push(*sequences(100, 7, device))
    for _ in range(200):
        tokens = buffer.sample(7)["input_ids"][:, 0].tolist()
        assert sorted(tokens) == list(range(100, 107))  # all 7, each once, never an empty slot
        picked = buffer.sample(3)["indices"].tolist()
        assert len(set(picked)) == 3 and max(picked) < 7


def test_uniform_sampling_passes_a_chi_square_test(device):
    buffer = ReplayBuffer(capacity=20, max_length=6, device=device, seed=2)
    buffer.push(*sequences(0, 20, device))
    draws, k = 4000, 5
    counts = collections.Counter()
    for _ in range(draws):
        counts.update(buffer.sample(k)["indices"].tolist())
    expected = [draws * k / 20] * 20
    assert chi_square([counts[slot] for slot in range(20)], expected) < CHI2_999[19]


def test_the_chi_square_test_rejects_a_biased_sampler(device):
    # The same test on a sampler that favours slot 0 (priority 2): it must fail, or the
    # uniformity test above could not fail either.
    buffer = ReplayBuffer(capacity=20, max_length=6, device=device, seed=2)
    buffer.push(*sequences(0, 20, device))
    buffer.update_priorities(torch.tensor([0], device=device), torch.tensor([2.0], device=device))
    counts = collections.Counter()
    for _ in range(4000):
        counts.update(buffer.sample(5)["indices"].tolist())
    assert chi_square([counts[slot] for slot in range(20)], [1000] * 20) > CHI2_999[19]


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_single_draws_are_proportional_to_priority_power_beta(device, beta):
    buffer = ReplayBuffer(capacity=6, max_length=6, device=device, seed=3, beta=beta)
    buffer.push(*sequences(0, 4, device))  # slots 4, 5 stay empty
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    buffer.update_priorities(torch.arange(4, device=device), weights)
    draws = 6000
    counts = collections.Counter(buffer.sample(1)["indices"].item() for _ in range(draws))
    assert set(counts) <= {0, 1, 2, 3}
    powered = weights.cpu() ** beta
    expected = (draws * powered / powered.sum()).tolist()
    assert chi_square([counts[slot] for slot in range(4)], expected) < CHI2_999[3]


def test_weighted_sample_matches_a_float64_reference_of_the_keys(device):
    buffer = ReplayBuffer(capacity=50, max_length=6, device=device, seed=4, beta=0.7)
    buffer.push(*sequences(0, 30, device))
    priorities = torch.rand(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    buffer.update_priorities(torch.arange(30, device=device), priorities.to(device))
    replica = torch.Generator(buffer.device)
    replica.set_state(buffer.generator.get_state())
    noise_size = 30 if device == "cpu" else 50  # CPU draws noise for the filled slots only
    for _ in range(20):
        noise = torch.rand(noise_size, generator=replica, device=buffer.device).double().cpu()
        keys = torch.log1p(-noise[:30]) / priorities.float().double() ** 0.7
        assert buffer.sample(8)["indices"].tolist() == keys.topk(8).indices.tolist()


def test_push_returns_the_slots_it_wrote(device):
    buffer = ReplayBuffer(capacity=5, max_length=6, device=device)
    buffer.push(*sequences(0, 3, device))
    slots = buffer.push(*sequences(10, 4, device))
    assert slots.tolist() == [3, 4, 0, 1]
    assert buffer.gather(slots)["input_ids"][:, 0].tolist() == [10, 11, 12, 13]
    assert buffer.push(*sequences(20, 7, device)).tolist() == [4, 0, 1, 2, 3]  # the newest 5 of 7


def test_state_dict_round_trip_samples_the_same(device, tmp_path):
    original = ReplayBuffer(capacity=8, max_length=6, device=device, seed=5)
    original.push(*sequences(0, 6, device), step=1)
    original.sample(3)
    original.update_priorities(torch.tensor([1, 2], device=device), torch.tensor([3.0, 0.5], device=device))
    torch.save(original.state_dict(), tmp_path / "buffer.pt")
    restored = ReplayBuffer(capacity=8, max_length=6, device=device, seed=99)
    restored.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=False))
    assert len(restored) == len(original)
    for step in range(10):
        a, b = original.sample(4), restored.sample(4)
        assert all(torch.equal(a[k], b[k]) for k in a)
        original.push(*sequences(10 * step, 2, device), step=step)
        restored.push(*sequences(10 * step, 2, device), step=step)


def test_storage_keeps_insertion_step_and_lengths(device):
    buffer = ReplayBuffer(capacity=4, max_length=6, device=device)
    buffer.push(*sequences(0, 2, device), step=7)
    assert buffer.meta[:2].tolist() == [[1, 2, 7], [1, 3, 7]]


ONES = torch.ones(2, dtype=torch.long)


@pytest.mark.parametrize("make, message", [
    (lambda: ReplayBuffer(0, 4), "capacity must be > 0"),
    (lambda: ReplayBuffer(4, 0), "max_length must be > 0"),
    (lambda: ReplayBuffer(4, 4, beta=-1.0), "beta must be"),
    (lambda: ReplayBuffer(4, 4).sample(1), "the buffer is empty"),
    (lambda: filled(2).sample(3), r"batch_size must be in \[1, 2\]"),
    (lambda: filled(2).sample(0), r"batch_size must be in \[1, 2\]"),
    (lambda: ReplayBuffer(4, 4).push(torch.zeros(2, 5, dtype=torch.long), ONES, ONES), "buffer holds at most 4 tokens"),
    (lambda: ReplayBuffer(4, 8).push(torch.zeros(2, 5), torch.ones(2), torch.ones(2)), "integer tensor"),
    (lambda: ReplayBuffer(4, 8).push(torch.zeros(2, 5, dtype=torch.long), torch.ones(3, dtype=torch.long),
                                     torch.ones(2, dtype=torch.long)), "one entry per row"),
    (lambda: ReplayBuffer(4, 8).push(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, dtype=torch.long),
                                     torch.tensor([3, 6])), "length <= 5"),
    (lambda: ReplayBuffer(4, 8).push(torch.zeros(2, 5, dtype=torch.long), torch.tensor([1, 3]),
                                     torch.tensor([3, 2])), "prompt_length <= length"),
    (lambda: filled(2).update_priorities(torch.tensor([0]), torch.tensor([0.0])), "finite and > 0"),
    (lambda: filled(2).update_priorities(torch.tensor([4]), torch.tensor([1.0])), r"indices in \[0, 4\)"),
    (lambda: filled(2).update_priorities(torch.tensor([0]), torch.tensor([1.0, 2.0])), "values must be"),
    (lambda: ReplayBuffer(4, 8).load_state_dict(ReplayBuffer(5, 8).state_dict()), "capacity 5"),
])
def test_bad_input_is_a_clear_error(make, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        make()


def filled(count, capacity=4):
    buffer = ReplayBuffer(capacity, 6)
    buffer.push(*sequences(0, count, "cpu"))
    return buffer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_another_device_are_a_clear_error():
    buffer = ReplayBuffer(4, 6, device="cuda")
    with pytest.raises(RuntimeError, match=r"input_ids must be on the buffer's device \(cuda:0\), got cpu"):
        buffer.push(*sequences(0, 2, "cpu"))  # checked by the op
    with pytest.raises(ValueError, match="indices is on cpu but the buffer is on cuda:0"):
        buffer.gather(torch.tensor([0]))  # checked in Python


def test_ops_reject_bad_storage():
    buffer = filled(2)
    with pytest.raises(RuntimeError, match="meta must have shape"):
        torch.ops.distillm.replay_gather(buffer.tokens, buffer.meta[:3], torch.tensor([0]))
    with pytest.raises(RuntimeError, match=r"indices must be slots in \[0, 4\)"):
        torch.ops.distillm.replay_gather(buffer.tokens, buffer.meta, torch.tensor([4]))
    storage = (buffer.tokens, buffer.meta, buffer.priorities, buffer.cursor)
    with pytest.raises(RuntimeError, match="cannot sample 3 entries"):
        torch.ops.distillm.replay_sample(*storage, 3)
    with pytest.raises(RuntimeError, match="priorities must be Float"):
        torch.ops.distillm.replay_sample(buffer.tokens, buffer.meta, buffer.priorities.double(), buffer.cursor, 1)


def op_inputs(device):
    buffer = ReplayBuffer(capacity=6, max_length=5, device=device)
    ids, prompts, lengths = sequences(0, 3, device, width=5)
    buffer.push(ids, prompts, lengths)
    return buffer, (ids, prompts, lengths)


@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_replay_ops(device, weighted):
    buffer, (ids, prompts, lengths) = op_inputs(device)
    if weighted:
        buffer.update_priorities(torch.tensor([0], device=device), torch.tensor([3.0], device=device))
    storage = (buffer.tokens, buffer.meta, buffer.priorities, buffer.cursor)
    torch.library.opcheck(torch.ops.distillm.replay_push.default, (*storage, ids, prompts, lengths),
                          {"step": 2, "pad_token_id": 0})
    # No generator here: opcheck reruns the op and compares, so each run must draw the same.
    torch.manual_seed(0)
    torch.library.opcheck(torch.ops.distillm.replay_sample.default, (*storage, 2),
                          {"beta": 1.0, "pad_token_id": 0, "ignore_index": -100},
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.distillm.replay_gather.default,
                          (buffer.tokens, buffer.meta, torch.tensor([2, 0], device=device)),
                          {"pad_token_id": 0, "ignore_index": -100})


def test_sample_compiles_fullgraph(device):
    buffer, _ = op_inputs(device)

    def draw(tokens, meta, priorities, cursor):
        indices, input_ids, attention_mask, labels = torch.ops.distillm.replay_sample(
            tokens, meta, priorities, cursor, 2)
        return torch.ops.distillm.replay_gather(tokens, meta, indices)[0], input_ids

    storage = (buffer.tokens, buffer.meta, buffer.priorities, buffer.cursor)
    gathered, sampled = torch.compile(draw, fullgraph=True, backend="aot_eager")(*storage)
    assert torch.equal(gathered, sampled) and sampled.shape == (2, 5)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_cuda_push_sample_gather_never_synchronize():
    buffer = ReplayBuffer(capacity=1000, max_length=256, device="cuda", seed=0)
    ids = torch.randint(1, 100, (8, 256), device="cuda")
    prompts = torch.full((8,), 10, device="cuda")
    lengths = torch.full((8,), 200, device="cuda")
    buffer.push(ids, prompts, lengths)  # warm up
    buffer.sample(8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(5):
            buffer.push(ids, prompts, lengths, step=step)
            batch = buffer.sample(8)
            buffer.update_priorities(batch["indices"], torch.full((8,), 2.0, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isclose(float(buffer.priorities[batch["indices"]].min()), 2.0)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_cuda_and_cpu_buffers_hold_and_gather_the_same():
    buffers = {d: ReplayBuffer(capacity=7, max_length=6, device=d) for d in ("cpu", "cuda")}
    for first in (0, 10, 20):
        for d, buffer in buffers.items():
            buffer.push(*sequences(first, 3, d), step=first)
    for name in ("tokens", "meta", "priorities", "cursor"):
        assert torch.equal(getattr(buffers["cpu"], name), getattr(buffers["cuda"], name).cpu()), name
    indices = torch.tensor([6, 0, 3])
    on_cpu, on_cuda = buffers["cpu"].gather(indices), buffers["cuda"].gather(indices.cuda())
    assert all(torch.equal(on_cpu[k], on_cuda[k].cpu()) for k in on_cpu)
