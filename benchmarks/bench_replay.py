"""Replay buffer: distillm_ext.ReplayBuffer against the reference design (a Python deque of
sequences, random.sample and a collate function), per push + sample + gather of one batch.

    python benchmarks/bench_replay.py                        # capacity 1000, batch 8 x 256 tokens
    python benchmarks/bench_replay.py --reps 2000 --json out.json

CPU always; CUDA when present, where the sample call alone is also timed and the push/sample
loop is run under torch.cuda.set_sync_debug_mode("error") to confirm zero host syncs.
"""

import argparse
import collections
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, print_table, time_ms, write_json  # noqa: E402

from distillm_ext import ReplayBuffer  # noqa: E402
from distillm_ext.ops import IGNORE_INDEX  # noqa: E402


class DequeReplay:
    """The reference design: sequences as tensors in a deque, random.sample, a Python collate."""

    def __init__(self, capacity, pad_token_id, seed):
        self.entries = collections.deque(maxlen=capacity)
        self.pad_token_id, self.random = pad_token_id, random.Random(seed)

    def push(self, input_ids, prompt_lengths, lengths):
        for row, prompt, length in zip(input_ids, prompt_lengths.tolist(), lengths.tolist()):
            self.entries.append((row[:length].clone(), prompt))

    def sample(self, batch_size):
        chosen = self.random.sample(range(len(self.entries)), batch_size)
        rows = [self.entries[i] for i in chosen]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, prompt) in enumerate(rows):
            input_ids[i, :len(ids)] = ids
            attention_mask[i, :len(ids)] = 1
            labels[i, prompt:len(ids)] = ids[prompt:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch(device, batch_size, length, generator):
    input_ids = torch.randint(1, 32000, (batch_size, length), generator=generator).to(device)
    lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=generator).to(device)
    prompt_lengths = (lengths // 4).to(device)
    return input_ids, prompt_lengths, lengths


def run(device, capacity, batch_size, length, warmup, reps, rounds):
    generator = torch.Generator().manual_seed(0)
    pushes = [batch(device, batch_size, length, generator) for _ in range(16)]
    ours = ReplayBuffer(capacity, length, device=device, seed=0)
    reference = DequeReplay(capacity, 0, seed=0)
    for buffer in (ours, reference):  # start full, as in a long run
        for i in range(capacity // batch_size + 1):
            buffer.push(*pushes[i % len(pushes)])
    step = iter(range(10**9))

    def cycle(buffer):
        buffer.push(*pushes[next(step) % len(pushes)])
        buffer.sample(batch_size)

    rows = []
    if device == "cpu":
        # Rounds alternate the two, so a noisy neighbour slows both alike; the speed-up is the
        # median of the per-round ratios.
        ref_ms, ours_ms = [], []
        for _ in range(rounds):
            ref_ms.append(statistics.median(time_ms(lambda: cycle(reference), device, warmup, reps)))
            ours_ms.append(statistics.median(time_ms(lambda: cycle(ours), device, warmup, reps)))
        rows.append({"device": device, "impl": "deque + random.sample + collate", "op": "push+sample+gather",
                     "median_us": 1e3 * statistics.median(ref_ms)})
        rows.append({"device": device, "impl": "ReplayBuffer", "op": "push+sample+gather",
                     "median_us": 1e3 * statistics.median(ours_ms),
                     "speedup": statistics.median(r / o for r, o in zip(ref_ms, ours_ms))})
        return rows
    ours_ms = time_ms(lambda: cycle(ours), device, warmup, reps)
    rows.append({"device": device, "impl": "ReplayBuffer", "op": "push+sample+gather",
                 "median_us": 1e3 * statistics.median(ours_ms)})
    sample_ms = time_ms(lambda: ours.sample(batch_size), device, warmup, reps)
    rows.append({"device": device, "impl": "ReplayBuffer", "op": "sample+gather",
                 "median_us": 1e3 * statistics.median(sample_ms)})
    torch.cuda.set_sync_debug_mode("error")  # raises on any host synchronization
    try:
        for _ in range(20):
            cycle(ours)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows[-1]["host_syncs"] = 0
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacity", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--reps", type=int, default=500, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds of the two (CPU)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/replay.json"))
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [row for device in devices
            for row in run(device, args.capacity, args.batch, args.length, args.warmup, args.reps, args.rounds)]
    print(f"capacity {args.capacity}, batch {args.batch} x {args.length} tokens; median of {args.rounds} rounds "
          f"of {args.reps} calls")
    print_table(rows, [("device", "device", "{}"), ("impl", "implementation", "{}"), ("op", "op", "{}"),
                       ("median_us", "median us", "{:.1f}"), ("speedup", "speed-up", "{:.1f}x"),
                       ("host_syncs", "host syncs", "{}")])
    write_json(args.json, rows, {**environment(), **vars(args), "json": str(args.json)})


if __name__ == "__main__":
    main()
