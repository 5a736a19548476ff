"""The trainer's AdamW step (recipe/optim.py) against each of torch's implementations, on the
parameters of the built-in models: should the trainer ask for fused=True?

    python benchmarks/bench_optimizer.py                   # the rows of RESULTS.md

Models: the default student (`distillm train`) and the whole 30-layer instruct model (what
`distillm sft` updates when it tunes the built-in teacher). Optimizers, all with the trainer's
hyperparameters:
- trainer's: what build_optimizer builds, torch choosing the implementation (the for-loop on
  CPU, where torch has no foreach default; foreach on CUDA);
- foreach: one kernel launch per operation over all parameters;
- fused: one kernel over every parameter (CPU and CUDA);
- for-loop: one parameter at a time.

Every optimizer starts from the same weights and takes the same sequence of random gradients.
Reports the median milliseconds of a step after warm-up, the ratio to the trainer's, and the
largest difference from the trainer's weights after the timed steps, relative to the weight's
size (0 = bitwise the same weights).
"""

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, print_table, time_ms, write_json  # noqa: E402

from distillm_ext.recipe.config import load_config  # noqa: E402
from distillm_ext.recipe.models import build_student  # noqa: E402
from distillm_ext.recipe.optim import build_optimizer  # noqa: E402

# The default student pruned from the untuned teacher: the same parameters' shapes as from the
# tuned one, without tuning it first on a fresh cache.
MODELS = {"default student": ["teacher.path=builtin-untuned"],
          "instruct model (teacher tuning)": ["student.path=builtin-untuned"]}
# None: the trainer's own choice (build_optimizer); the others name torch's implementation.
IMPLEMENTATIONS = {"trainer's": None, "foreach": {"foreach": True}, "fused": {"fused": True},
                   "for-loop": {"foreach": False}}


def adamw(model, train, implementation):
    """The trainer's AdamW over `model`, or one with its hyperparameters (the learning rate
    that its schedule set for step 0 included) and the given implementation."""
    optimizer, _ = build_optimizer(model, train, train.max_steps)
    if implementation is None:
        return optimizer
    group = optimizer.param_groups[0]
    return torch.optim.AdamW(group["params"], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                             weight_decay=group["weight_decay"], **implementation)


def trained_weights(optimizer, warmup: int, reps: int):
    """(milliseconds per step, the weights after warmup + reps steps) of `optimizer`; the
    gradients come from a fixed seed."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(0)

    def new_gradients():
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3

    times = time_ms(optimizer.step, "cpu", warmup, reps, setup=new_gradients)
    return statistics.median(times), [p.detach() for p in params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/optimizer.json"))
    args = parser.parse_args()
    rows = []
    for model_name, overrides in MODELS.items():
        config = load_config(None, overrides)
        model, _ = build_student(config)
        baseline = None
        for name, implementation in IMPLEMENTATIONS.items():
            optimizer = adamw(copy.deepcopy(model), config.train, implementation)
            ms, weights = trained_weights(optimizer, args.warmup, args.reps)
            baseline = baseline or (ms, weights)
            deviation = max(((w - b).abs().max() / b.abs().max()).item() for w, b in zip(weights, baseline[1]))
            rows.append(dict(model=model_name, parameters=sum(w.numel() for w in weights), impl=name,
                             ms=ms, vs_trainer=baseline[0] / ms, deviation=deviation))
    print_table(rows, [("model", "model", "{}"), ("parameters", "parameters", "{:,}"), ("impl", "AdamW", "{}"),
                       ("ms", "ms per step", "{:.1f}"), ("vs_trainer", "speed vs trainer's", "{:.2f}x"),
                       ("deviation", "weights vs trainer's (relative)", "{:.1e}")])
    write_json(args.output, rows, environment())


if __name__ == "__main__":
    main()
