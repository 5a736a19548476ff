"""Off-policy vs on-policy distillation: the built-in default (shortened) trained three ways
with the same steps, seed and evaluation: sgo.mode off (plain KD), on_policy (fresh student
outputs every step, lambda = 1) and adaptive (DistiLLM's replay buffer + schedule).

    python benchmarks/bench_sgo.py                    # seeds 1234 and 4321, about 40 minutes on 2 cores
    python benchmarks/bench_sgo.py --seeds 1 --steps 20 --train-examples 40   # a quick look

The schedule only matters where it engages: φ rises when the validation loss gets worse, so the
run makes several epochs over a small training split (where the student starts to overfit)
and starts φ at --init-threshold, as the paper did for its largest pair. The buffer is scaled
with the run (--buffer-size) so that it fills and replay happens at all. Each run is a
`distillm train` subprocess; wall-clock is the training time from metrics.jsonl (evaluations
and checkpoints excluded), the same clock for every mode.
"""

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, print_table, write_json  # noqa: E402

from distillm_ext.recipe.config import SGOMode  # noqa: E402
from distillm_ext.recipe.data import builtin_data_files  # noqa: E402
from distillm_ext.recipe.metrics import read_metrics  # noqa: E402

MODES = typing.get_args(SGOMode)


def small_split(path: Path, examples: int) -> Path:
    """The first `examples` rows of the built-in training split, as JSONL."""
    with gzip.open(builtin_data_files()["train"], "rt") as source:
        rows = [next(source) for _ in range(examples)]
    path.write_text("".join(rows))
    return path


def train(mode: str, seed: int, args, train_file: Path, run_dir: Path) -> dict:
    overrides = [
        f"sgo.mode={mode}", f"train.seed={seed}", f"train.max_steps={args.steps}", f"data.train={train_file}",
        f"eval.interval={args.eval_interval}", f"eval.num_examples={args.eval_examples}", "eval.teacher=false",
        f"sgo.init_threshold={args.init_threshold}", f"sgo.loss_eps={args.loss_eps}", f"sgo.buffer_size={args.buffer_size}",
        f"output.dir={run_dir}", "output.checkpoint_interval=0", "output.plots=true", f"train.lr={args.lr}",
        # The built-in student is pruned, far worse before training than after any step: with the
        # loss before training as the first reference, phi could never rise.
        "sgo.first_reference=first_validation",
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:  # the trainer's own log and progress bar
        done = subprocess.run([sys.executable, "-m", "distillm_ext.recipe.cli", "train", "--overwrite", *overrides],
                              stdout=log, stderr=log)
    if done.returncode != 0:
        sys.exit(f"distillm train ({mode}, seed {seed}) failed; see {run_dir.with_suffix('.log')}")
    total_s = time.perf_counter() - started
    records = read_metrics(run_dir)
    steps = [r for r in records if r["kind"] == "train"]
    summary = json.loads((run_dir / "summary.json").read_text())
    sources = {kind: sum(r.get("sources", {"dataset": 1}).get(kind, 0) for r in steps)
               for kind in ("dataset", "generate", "replay")}
    train_s = sum(r["elapsed_s"] for r in steps)
    phi_at_evals = [next((r.get("phi", 0.0) for r in steps if r["step"] > e["step"]), steps[-1].get("phi", 0.0))
                    for e in records if e["kind"] == "eval" and 0 < e["step"] < args.steps]
    return {
        "mode": mode, "seed": seed, "train_s": train_s, "total_s": total_s,
        "generation_s": sum(r["time"].get("generate", 0.0) for r in steps),
        "steps": len(steps), **{f"{kind}_steps": count for kind, count in sources.items()},
        "phi_trajectory": [steps[0].get("phi", 0.0), *phi_at_evals],
        "val_loss": summary["student_after"]["val_loss"], "rouge_l": summary["student_after"]["rougeL"],
        "val_losses": [e["val_loss"] for e in records if e["kind"] == "eval"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 4321])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--train-examples", type=int, default=56, help="training split size (several epochs)")
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=40)
    parser.add_argument("--init-threshold", type=float, default=0.1)
    parser.add_argument("--loss-eps", type=float, default=0.1, help="rise of the validation loss that raises phi")
    parser.add_argument("--buffer-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (the default run's: 2e-4)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sgo"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_file = small_split(args.out / "train.jsonl", args.train_examples)
    rows = []
    for seed in args.seeds:
        for mode in args.modes:
            rows.append(train(mode, seed, args, train_file, args.out / f"{mode}-{seed}"))
            row = rows[-1]
            print(f"{mode:>9} seed {seed}: train {row['train_s']:.0f} s, generation {row['generation_s']:.0f} s, "
                  f"ROUGE-L {row['rouge_l']:.2f}, phi {row['phi_trajectory']}", flush=True)
    for row in rows:
        on_policy = next((r for r in rows if r["mode"] == "on_policy" and r["seed"] == row["seed"]), None)
        row["speedup_vs_on_policy"] = on_policy["train_s"] / row["train_s"] if on_policy else None
        row["generation_share"] = row["generation_s"] / row["train_s"]
        row["phi"] = " ".join(f"{p:.1f}" for p in row["phi_trajectory"])
        row["steps_d_g_r"] = f"{row['dataset_steps']}/{row['generate_steps']}/{row['replay_steps']}"
    print(f"\n{args.steps} steps x 8 examples over {args.train_examples} training examples; "
          f"lr {args.lr}, init_threshold {args.init_threshold}, loss_eps {args.loss_eps}, buffer {args.buffer_size}; evaluation every {args.eval_interval} steps "
          f"on {args.eval_examples} validation examples")
    print_table(rows, [
        ("mode", "mode", "{}"), ("seed", "seed", "{}"), ("train_s", "train s", "{:.0f}"),
        ("speedup_vs_on_policy", "vs on_policy", "{:.2f}x"), ("generation_share", "gen share", "{:.0%}"),
        ("steps_d_g_r", "steps data/gen/replay", "{}"), ("phi", "phi at start, each eval", "{}"),
        ("val_loss", "val loss", "{:.3f}"), ("rouge_l", "ROUGE-L", "{:.2f}"),
    ])
    for mode in args.modes:
        scores = [r["rouge_l"] for r in rows if r["mode"] == mode]
        if len(scores) > 1:
            print(f"{mode}: ROUGE-L mean {statistics.mean(scores):.2f}, spread (max - min) {max(scores) - min(scores):.2f}")
    write_json(args.out / "sgo.json", rows, {**environment(), **{k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
