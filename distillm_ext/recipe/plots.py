"""PNG plots of a run's metrics.jsonl: training loss, learning rate and throughput, evaluations."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def plot_run(run_dir: Path) -> list[Path]:
    """Writes plots/training.png (losses, lr, tokens/s, validation curves) and, for runs on
    student-generated outputs, plots/sgo.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    paths = [_plot_training(plt, records, out / "training.png")]
    if any("phi" in r for r in records):
        paths.append(_plot_sgo(plt, records, out / "sgo.png"))
    return paths


def _plot_training(plt, records: list[dict], path: Path) -> Path:
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    steps = [r["step"] for r in train]
    axes[0, 0].plot(steps, [r["kd_loss"] for r in train], label="KD loss")
    if any(r.get("ce_loss") is not None for r in train):
        axes[0, 0].plot(steps, [r["ce_loss"] for r in train], label="CE loss")
    axes[0, 0].set(title="training loss (per response token)", xlabel="step")
    axes[0, 0].legend()
    axes[0, 1].plot(steps, [r["lr"] for r in train])
    axes[0, 1].set(title="learning rate", xlabel="step")
    axes[1, 0].plot(steps, [r["tokens_per_s"] for r in train])
    axes[1, 0].set(title="throughput (tokens/s)", xlabel="step")
    eval_steps = [r["step"] for r in evals]
    (loss_line,) = axes[1, 1].plot(eval_steps, [r["val_loss"] for r in evals], "o-", color="C0", label="val loss")
    axes[1, 1].set(title="validation", xlabel="step", ylabel="student CE on references")
    rouge_axis = axes[1, 1].twinx()
    (rouge_line,) = rouge_axis.plot(eval_steps, [r["rougeL"] for r in evals], "s--", color="C1", label="ROUGE-L")
    rouge_axis.set_ylabel("ROUGE-L")
    axes[1, 1].legend(handles=[loss_line, rouge_line], loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _plot_sgo(plt, records: list[dict], path: Path) -> Path:
    """φ (the probability of a step on student outputs), the share of training time spent
    generating so far, and the cumulative steps per batch source."""
    train = [r for r in records if r["kind"] == "train" and "phi" in r]
    steps = [r["step"] for r in train]
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].plot(steps, [r["phi"] for r in train], label="phi")
    generating = elapsed = 0.0
    share = []  # cumulative: per step it is 0 or most of the step, which says little
    for r in train:
        generating, elapsed = generating + r["time"].get("generate", 0.0), elapsed + r["elapsed_s"]
        share.append(generating / elapsed if elapsed else 0.0)
    axes[0].plot(steps, share, label="share of training time spent generating (so far)")
    axes[0].set(title="SGO schedule", xlabel="step", ylim=(-0.05, 1.05))
    axes[0].legend()
    for source in ("dataset", "generate", "replay"):
        counts, total = [], 0
        for r in train:
            total += r["sources"].get(source, 0)
            counts.append(total)
        axes[1].plot(steps, counts, label=source)
    axes[1].set(title="steps per batch source (cumulative)", xlabel="step")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
