"""A LoRA student against full training, on the built-in default (shortened runs).

    python benchmarks/bench_lora.py                 # r = 16, 20 steps, two runs each, alternating

Reports, for `distillm train` with and without student.lora_r: the trainable parameters (what
AdamW holds state for: two float32 moments each, so 8 bytes a parameter), tokens/s (median of
the logged steps after the first two, training time only) and the process's peak RSS.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import compare_trainings, environment, print_table, write_json  # noqa: E402

from distillm_ext.recipe.config import load_config  # noqa: E402
from distillm_ext.recipe.models import build_student  # noqa: E402


def trainable_parameters(overrides: list) -> tuple[int, int]:
    """(trainable, all) parameters of the student these overrides build."""
    student, _ = build_student(load_config(None, overrides))
    return sum(p.numel() for p in student.parameters() if p.requires_grad), sum(p.numel() for p in student.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/lora.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_lora-"))
    modes = [("full", []), (f"LoRA r={args.rank}", [f"student.lora_r={args.rank}"])]
    rows = compare_trainings(modes, args.steps, args.repeats, work)
    for row, (_, overrides) in zip(rows, modes):
        trainable, total = trainable_parameters(overrides)
        row.update(trainable=trainable, parameters=total, adamw_mb=8 * trainable / 2**20)
    print_table(rows, [("mode", "student", "{}"), ("trainable", "trainable params", "{:,}"),
                       ("adamw_mb", "AdamW MB", "{:.1f}"), ("tokens_per_s", "tokens/s (median)", "{:.0f}"),
                       ("tokens_per_s_runs", "tokens/s per run", "{}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")])
    write_json(args.output, rows, {**environment(), "steps": args.steps, "rank": args.rank})


if __name__ == "__main__":
    main()
