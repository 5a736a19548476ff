"""Memory per rank of train.parallel=ddp and fsdp: parameter, gradient and AdamW bytes held by
each rank, and its peak RSS during training steps, for 1, 2 and 4 CPU ranks (gloo).

    python benchmarks/bench_parallel.py                      # the rows of RESULTS.md
    python benchmarks/bench_parallel.py --ranks 1 2 --layers 4
    python benchmarks/bench_parallel.py --ranks 1 --length 1024 --checkpointing off on   # activation checkpointing

The model is a Llama of `--layers` decoder layers, hidden 1024 (intermediate 2816, vocabulary
32000, tied embeddings), wrapped exactly as the trainer wraps the student (recipe/parallel.py).
Each rank runs `--steps` AdamW steps on random tokens; bytes are those of the tensors the rank
holds (its shards under fsdp). Peak RSS is the high-water mark from the first step on, above the
resident set just before it: building the model (whole, on every rank, then sharded) is not in it.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, print_table, write_json  # noqa: E402

from distillm_ext.recipe.config import ParallelPlanName  # noqa: E402

PLANS = typing.get_args(ParallelPlanName)


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(args) -> None:
    """One rank, inside torchrun: prints one JSON line of its measurements."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distillm_ext.recipe.distributed import init_runtime
    from distillm_ext.recipe.models import checkpoint_layers
    from distillm_ext.recipe.parallel import shard

    runtime = init_runtime()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                                         max_position_embeddings=max(256, args.length), tie_word_embeddings=True))
    (checkpointing,) = args.checkpointing  # one value in a worker
    if checkpointing == "on":
        checkpoint_layers(model)
    forward = model
    if args.parallel == "fsdp":
        shard(model, runtime.device, frozen=False)
    elif runtime.world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 32000, (args.batch, args.length), generator=torch.Generator().manual_seed(runtime.rank))
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark from here on
    before_kb = status_kb("VmRSS")
    for _ in range(args.steps):
        forward(input_ids=ids, labels=ids).loss.backward()
        gradients = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    print(json.dumps({"parallel": args.parallel, "ranks": runtime.world_size, "rank": runtime.rank,
                      "checkpointing": checkpointing,
                      "parameter_mb": local_bytes(model.parameters()) / 2**20, "gradient_mb": gradients / 2**20,
                      "optimizer_mb": local_bytes(state) / 2**20,
                      "peak_rss_mb": (status_kb("VmHWM") - before_kb) / 1024}), flush=True)


def launch(parallel: str, ranks: int, checkpointing: str, args) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, "--worker", "--parallel", parallel, "--checkpointing", checkpointing,
               "--layers", str(args.layers),
               "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if output.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{output.stderr[-3000:]}")
    return [json.loads(line) for line in output.stdout.splitlines() if line.startswith("{")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off"],
                        help="activation checkpointing of each decoder layer (train.activation_checkpointing)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", choices=PLANS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_parallel.json")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for ranks in args.ranks:
        for parallel, checkpointing in itertools.product(PLANS, args.checkpointing):
            per_rank = launch(parallel, ranks, checkpointing, args)
            # the largest rank: what each machine must hold
            row = {k: max(r[k] for r in per_rank) for k in ("parameter_mb", "gradient_mb", "optimizer_mb",
                                                             "peak_rss_mb")}
            row.update(parallel=parallel, ranks=ranks, checkpointing=checkpointing,
                       state_mb=row["parameter_mb"] + row["optimizer_mb"])
            rows.append(row)
    for row in rows:
        ddp = next(r for r in rows if r["parallel"] == "ddp" and r["ranks"] == row["ranks"]
                   and r["checkpointing"] == row["checkpointing"])
        row["state_vs_ddp"] = row["state_mb"] / ddp["state_mb"]
    print_table(rows, [("parallel", "parallel", "{}"), ("ranks", "ranks", "{}"), ("checkpointing", "checkpointing", "{}"),
                       ("parameter_mb", "params MB", "{:.0f}"), ("gradient_mb", "grads MB", "{:.0f}"),
                       ("optimizer_mb", "AdamW MB", "{:.0f}"), ("state_vs_ddp", "params+AdamW / DDP", "{:.3f}"),
                       ("peak_rss_mb", "peak RSS MB (steps)", "{:.0f}")])
    write_json(args.out, rows, environment() | {"layers": args.layers, "steps": args.steps, "batch": args.batch,
                                                "length": args.length})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
