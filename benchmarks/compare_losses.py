"""Which KD loss, and which schedule? DistiLLM's claims in miniature, on the built-in default
with identical steps, data and evaluation, over several seeds.

    python benchmarks/compare_losses.py            # 10 configurations x 5 seeds, 80 steps: ~4 h on 2 cores
    python benchmarks/compare_losses.py --quick    # a smoke test of the whole pipeline

Protocol (the paper's, scaled down):
1. Warm start: the built-in student (the teacher with 18 of its 30 layers removed) is first
   fine-tuned on the references alone (`loss.kd_ratio=0`) for --warm-start-steps steps, once.
   The paper starts KD from an SFT student too; without it, a pruned student's first steps are
   repair, and every loss would mostly measure how fast it repairs.
2. From that student, each configuration trains --steps steps per seed (the seed sets the data
   order and sampling). The loss study: fkl, rkl, skl, srkl, jsd, tvd (`loss.kd_ratio=1`), and
   gold (`loss.kd_ratio=0`: more SFT, the baseline KD must beat). The schedule study:
   skl with sgo.mode off (the skl runs), on_policy and adaptive (the paper's defaults: φ from 0,
   rising by 0.1 when the validation loss rises by 0.1), and srkl off and adaptive. The validation loss every --eval-interval
   steps gives the convergence curves (and feeds the adaptive schedule).
3. Each final student is scored by `distillm eval` on the test split: cross-entropy on the
   references and ROUGE-L of greedy answers, on --test-examples examples (all 300 by default).
   The teacher and the warm-started student are scored once the same way: the share of that gap
   a configuration recovers is (student - before) / (teacher - before).

The offline-teacher study (--teacher-cache DIR, a `distillm cache-teacher` directory of the
built-in teacher): skl against "skl@cache", the same runs with teacher.cache=DIR and no teacher
loaded. `--configs skl skl@cache --teacher-cache DIR` runs it alone. The K sweep: with a cache
made at cache.top_k=128, `--configs skl skl@top1 skl@top8 skl@top32 skl@top128 --teacher-cache
DIR` trains from the first K of its entries (teacher.cache_top_k=K), which are the top-K.

Every finished run keeps its result.json and metrics (its weights are deleted once scored), so
an interrupted study continues where it stopped (delete the folder to start over). A study
longer than one sitting goes in benchmarks/studies/NAME: git keeps its scored runs (a few kB
each, with the machine, date and commit they ran on) and ignores the warm start's weights,
which a later sitting retrains from the same seed (on the same CPU copy and commit, to the
same scores); a finished study reports without them. Outputs in --out: results.json (every run and the
summaries), study.md (tables and a verdict per claim), losses.png / schedules.png (means with
standard deviations) and *_curves.png.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment  # noqa: E402

from distillm_ext.recipe.cli import gap_recovered, main as distillm  # noqa: E402
from distillm_ext.recipe.config import LossType  # noqa: E402
from distillm_ext.recipe.metrics import read_metrics  # noqa: E402

LOSSES = tuple(name for name in typing.get_args(LossType) if name != "sfkl")  # sfkl is skl
CONFIGURATIONS = {
    **{loss: [f"loss.type={loss}", "loss.kd_ratio=1"] for loss in LOSSES},
    "gold": ["loss.kd_ratio=0"],
    # The schedules, all with skl: "skl" above is sgo.mode=off. The buffer holds 8 steps' outputs,
    # so that it fills, and replay happens, within the run.
    "skl+on_policy": ["loss.type=skl", "loss.kd_ratio=1", "sgo.mode=on_policy"],
    "skl+adaptive": ["loss.type=skl", "loss.kd_ratio=1", "sgo.mode=adaptive", "sgo.buffer_size=64"],
    "srkl+adaptive": ["loss.type=srkl", "loss.kd_ratio=1", "sgo.mode=adaptive", "sgo.buffer_size=64"],
}
CACHED = "skl@cache"  # skl from the --teacher-cache top-k cache instead of the live teacher
CONFIGURATIONS[CACHED] = CONFIGURATIONS["skl"]
# The K sweep: skl@topK reads only the first (most likely) K entries of the cache, so that one
# cache at k = 128 serves every K.
CACHE_K = (1, 8, 32, 128)
K_SWEEP = tuple(f"skl@top{k}" for k in CACHE_K)
CONFIGURATIONS.update({name: [*CONFIGURATIONS["skl"], f"teacher.cache_top_k={k}"] for name, k in zip(K_SWEEP, CACHE_K)})
CACHED_CONFIGS = (CACHED, *K_SWEEP)
LOSS_STUDY = (*LOSSES, "gold")
CACHE_STUDY = ("skl", *CACHED_CONFIGS)
SCHEDULE_STUDY = ("skl", "skl+on_policy", "skl+adaptive", "srkl", "srkl+adaptive")
SKEWED = ("skl", "srkl")
# Two-sided 95% quantiles of Student's t, by degrees of freedom (for paired differences over seeds).
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return f"{os.cpu_count()} cores, {model or platform.machine()}"


def commit() -> str:
    """The commit this script runs from, "+" marking local changes ("" outside a git checkout)."""
    described = subprocess.run(["git", "describe", "--always", "--dirty=+"], cwd=Path(__file__).parent,
                               capture_output=True, text=True)
    return described.stdout.strip()


def run_distillm(args: list[str]) -> None:
    code = distillm(args)
    if code != 0:
        sys.exit(f"distillm {' '.join(args)} failed with exit code {code}")


def warm_start(args) -> Path:
    """The SFT student every configuration starts from (trained once, reused; main asks for it
    only when something is left to train or score, so a finished study reports without it)."""
    run = args.out / "warm_start"
    model = run / "checkpoints" / f"step-{args.warm_start_steps:06d}" / "model"
    if not model.is_dir():
        run_distillm(["train", "--overwrite", *args.set, "loss.kd_ratio=0", f"train.max_steps={args.warm_start_steps}",
                      "eval.teacher=false", "output.checkpoint_interval=0", "output.plots=false", f"output.dir={run}"])
    return model


def reference_scores(args, student: Callable[[], Path]) -> dict:
    """Test scores of the teacher and of the warm-started student, the two ends of the gap each
    configuration closes a share of (scored once, cached beside the runs)."""
    scores = {}
    for name in ("teacher", "before"):
        output = args.out / f"{name}_test_scores.json"
        if not output.is_file():
            model = "teacher" if name == "teacher" else str(student())
            run_distillm(["eval", "--model", model, "--split", "test", "--output", str(output), *args.set,
                          f"eval.num_examples={args.test_examples}"])
        scores[name] = json.loads(output.read_text())
    return scores


def train_and_score(name: str, seed: int, student: Callable[[], Path], args) -> dict:
    """One configuration and seed: train, then score on the test split; cached in result.json."""
    run = args.out / f"{name}-{seed}"
    result_file = run / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    started = time.perf_counter()
    cache = [f"teacher.cache={args.teacher_cache}"] if name in CACHED_CONFIGS else []
    run_distillm(["train", "--overwrite", *args.set, *CONFIGURATIONS[name], *cache, f"student.path={student()}",
                  f"train.seed={seed}", f"train.max_steps={args.steps}", f"eval.interval={args.eval_interval}",
                  f"eval.num_examples={args.curve_examples}", "eval.teacher=false",
                  "output.checkpoint_interval=0", "output.plots=false", f"output.dir={run}"])
    wall_s = time.perf_counter() - started
    scores = run / "test_scores.json"
    run_distillm(["eval", "--model", str(run), "--split", "test", "--output", str(scores),
                  f"eval.num_examples={args.test_examples}"])
    test = json.loads(scores.read_text())
    shutil.rmtree(run / "checkpoints")  # scored: 27 students would otherwise keep ~7 GB on disk
    records = read_metrics(run)
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    result = {"config": name, "seed": seed, "test_loss": test["val_loss"], "rouge_l": test["rougeL"],
              "test_examples": test["examples"], "curve": [[r["step"], r["val_loss"]] for r in evals],
              # distilling only (generation included; evaluations and checkpoints not), as bench_sgo
              "train_s": sum(r["elapsed_s"] for r in steps), "wall_s": wall_s,
              "phi": [r.get("phi", 0.0) for r in steps],
              # A study may span sessions (see --out): each run says where and when it ran.
              "machine": machine(), "commit": commit(), **environment(),
              "sources": {kind: sum(r.get("sources", {r["source"]: 1}).get(kind, 0) for r in steps)
                          for kind in ("dataset", "generate", "replay")}}
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def mean_val_loss(result: dict) -> float:
    """The mean of the validation-loss curve after step 0: lower means it got there faster."""
    return statistics.mean(loss for step, loss in result["curve"] if step > 0)


def summarize(results: list[dict], names, references: dict) -> list[dict]:
    """Per configuration: mean, standard deviation and per-seed values of each score, and the
    share of the teacher's gap its mean recovers."""
    rows = []
    for name in names:
        mine = sorted((r for r in results if r["config"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        row = {"config": name, "seeds": [r["seed"] for r in mine],
               "phi_final": statistics.mean(r["phi"][-1] for r in mine),
               "sources": {k: sum(r["sources"][k] for r in mine) for k in mine[0]["sources"]}}
        for key, measure in MEASURES.items():
            values = [measure(r) for r in mine]
            row[key] = statistics.mean(values)
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{key}_seeds"] = values
        for key, score in (("test_loss", "val_loss"), ("rouge_l", "rougeL")):  # the share of the mean
            row[f"gap_{key}"] = gap_recovered(references["teacher"][score], references["before"][score], row[key])
        rows.append(row)
    return rows


MEASURES = {"rouge_l": lambda r: r["rouge_l"], "test_loss": lambda r: r["test_loss"],
            "curve_loss": mean_val_loss, "train_s": lambda r: r["train_s"]}
HIGHER_IS_BETTER = {"rouge_l": True, "test_loss": False, "curve_loss": False, "train_s": False}
LABELS = {"rouge_l": "test ROUGE-L", "test_loss": "test CE", "curve_loss": "mean val loss along training",
          "train_s": "training seconds"}


def paired(results: list[dict], better: str, worse: str, key, higher_is_better: bool) -> dict:
    """`better` minus `worse` per seed (sign so that > 0 favours `better`), its 95% confidence
    interval, and whether the mean difference is non-zero at 95% (paired t over the seeds both ran)."""
    by_seed = {(r["config"], r["seed"]): key(r) for r in results}
    seeds = sorted(s for (c, s) in by_seed if c == better and (worse, s) in by_seed)
    diffs = [(by_seed[(better, s)] - by_seed[(worse, s)]) * (1 if higher_is_better else -1) for s in seeds]
    if len(diffs) < 2:
        return {"mean": diffs[0] if diffs else math.nan, "n": len(diffs), "verdict": "too few seeds"}
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    t = mean / (sd / math.sqrt(len(diffs))) if sd > 0 else math.copysign(math.inf, mean) if mean else 0.0
    critical = T_975.get(len(diffs) - 1, 2.0)
    significant = abs(t) > critical
    verdict = ("holds" if mean > 0 else "contradicted") if significant else "not resolved (within seed noise)"
    half_width = critical * sd / math.sqrt(len(diffs))
    return {"mean": mean, "sd": sd, "n": len(diffs), "t": t, "ci": [mean - half_width, mean + half_width],
            "verdict": verdict}


def interval(p: dict) -> str:
    return f"{p['mean']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]" if "ci" in p else f"{p['mean']:+.3f} (n = {p['n']})"


def claims(results: list[dict], comparisons) -> list[str]:
    """A plain sentence per (better, worse, measure) claim, with its paired verdict."""
    lines = []
    for better, worse, keys in comparisons:
        for key in keys:
            p = paired(results, better, worse, MEASURES[key], HIGHER_IS_BETTER[key])
            if p["n"]:
                lines.append(f"{better} better than {worse} on {LABELS[key]}: {p['verdict']} "
                             f"(advantage {interval(p)}, 95% CI, over {p['n']} seeds)")
    return lines


def loss_claims(results: list[dict]) -> list[str]:
    """The paper: SKL and SRKL beat the other losses (and SFT) and converge faster."""
    return claims(results, [(skewed, other, ("rouge_l", "test_loss", "curve_loss"))
                            for skewed in SKEWED for other in LOSS_STUDY if other not in SKEWED])


def schedule_claims(results: list[dict]) -> list[str]:
    """The paper: adaptive SGOs beat plain KD and match on-policy at a fraction of its time."""
    return claims(results, [("skl+adaptive", "skl", ("rouge_l", "test_loss")),
                            ("srkl+adaptive", "srkl", ("rouge_l", "test_loss")),
                            ("skl+adaptive", "skl+on_policy", ("rouge_l", "test_loss", "train_s")),
                            ("skl+on_policy", "skl", ("rouge_l", "test_loss"))])


BASELINES = ("gold", "fkl", "skl")


def differences(results: list[dict], names) -> str:
    """Each configuration minus each baseline, paired over seeds, with 95% CIs (> 0 favours the row)."""
    present = {r["config"] for r in results}
    baselines = [b for b in BASELINES if b in present]
    header = [f"{LABELS[key]} vs {b}" for key in ("test_loss", "rouge_l") for b in baselines]
    lines = ["| configuration | " + " | ".join(header) + " |", "| --- " * (1 + len(header)) + "|"]
    for name in names:
        cells = [interval(paired(results, name, b, MEASURES[key], HIGHER_IS_BETTER[key])) if name != b else "—"
                 for key in ("test_loss", "rouge_l") for b in baselines]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cache_claims(results: list[dict]) -> list[str]:
    """The offline teacher should cost nothing: a difference within seed noise is what we want."""
    return claims(results, [(cached, "skl", ("rouge_l", "test_loss")) for cached in CACHED_CONFIGS])


def markdown(title: str, rows: list[dict], statements: list[str], schedules: bool) -> str:
    extra = " | training s | φ at the end | steps data/generate/replay" if schedules else ""
    lines = [f"### {title}", "",
             f"| configuration | test ROUGE-L | test CE (nats/token) | gap recovered, CE / ROUGE-L | "
             f"mean val loss (convergence){extra} | ROUGE-L per seed |", "| --- " * (6 + 3 * schedules) + "|"]
    for row in rows:
        per_seed = ", ".join(f"{v:.2f}" for v in row["rouge_l_seeds"])
        cells = [row["config"], f"{row['rouge_l']:.2f} ± {row['rouge_l_sd']:.2f}",
                 f"{row['test_loss']:.4f} ± {row['test_loss_sd']:.4f}",
                 f"{row['gap_test_loss']:.0%} / {row['gap_rouge_l']:.0%}",
                 f"{row['curve_loss']:.4f} ± {row['curve_loss_sd']:.4f}"]
        if schedules:
            sources = row["sources"]
            cells += [f"{row['train_s']:.0f} ± {row['train_s_sd']:.0f}", f"{row['phi_final']:.2f}",
                      f"{sources['dataset']}/{sources['generate']}/{sources['replay']}"]
        lines.append("| " + " | ".join(cells + [per_seed]) + " |")
    return "\n".join(lines + ["", "Claims (paired over seeds, 95%):", ""] + [f"- {s}" for s in statements]) + "\n"


def plot(rows: list[dict], results: list[dict], out: Path, name: str) -> None:
    """{name}.png: means with standard deviations; {name}_curves.png: validation loss by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["config"] for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, key, title in ((axes[0], "rouge_l", "test ROUGE-L (higher is better)"),
                             (axes[1], "test_loss", "test CE, nats/token (lower is better)")):
        axis.bar(names, [r[key] for r in rows], yerr=[r[f"{key}_sd"] for r in rows], capsize=4,
                 color=["C1" if n in SKEWED else "C7" if n == "gold" else "C0" for n in names])
        axis.set_title(title)
        axis.tick_params(axis="x", labelrotation=20)
        low = min(r[key] - r[f"{key}_sd"] for r in rows)
        axis.set_ylim(bottom=max(0.0, low - 0.1 * abs(low)))
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=120)
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for index, config in enumerate(names):
        curves = [r["curve"] for r in results if r["config"] == config]
        steps = [step for step, _ in curves[0]]
        axis.plot(steps, [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))], "o-",
                  label=config, color=f"C{index}")
    axis.set_xlabel("step")
    axis.set_ylabel("validation CE (mean over seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / f"{name}_curves.png", dpi=120)
    plt.close("all")


def origins(results: list[dict]) -> str:
    """How many runs ran where, on which day and from which commit."""
    where = collections.Counter(f"{r['date'][:10]} on {r['machine']} ({r['cpu_capability']}), commit {r['commit']}"
                                if "commit" in r else "unrecorded" for r in results)
    return "; ".join(f"{count} {origin}" for origin, count in where.items())


def report(results: list[dict], references: dict, meta: dict, out: Path) -> str:
    """results.json, study.md and the charts of both studies (each only if any of its runs ran)."""
    teacher, before = references["teacher"], references["before"]
    sections = [f"Reported on {meta['machine']}, {meta['date']}, commit {meta['commit']}; command "
                f"`{meta['command']}`.", "", f"The runs: {origins(results)}.", "",
                f"Test scores, the ends of the gap: teacher CE {teacher['val_loss']:.4f}, ROUGE-L "
                f"{teacher['rougeL']:.2f}; warm-started student CE {before['val_loss']:.4f}, ROUGE-L "
                f"{before['rougeL']:.2f}.", ""]
    summary = {}
    for name, title, names, statements in (("losses", "Which loss?", LOSS_STUDY, loss_claims),
                                           ("schedules", "Which schedule? (skl and srkl)", SCHEDULE_STUDY, schedule_claims),
                                           ("cache", "Live teacher or its top-k cache? (skl)", CACHE_STUDY,
                                            cache_claims)):
        rows = summarize(results, names, references)
        if len(rows) > 1:  # a study of one configuration (skl alone, shared) compares nothing
            summary[name] = rows
            sections.append(markdown(title, rows, statements(results), schedules=name == "schedules"))
            plot(rows, results, out, name)
    configs = [name for name in CONFIGURATIONS if any(r["config"] == name for r in results)]
    sections += ["### Paired differences against the baselines (95% CI over seeds; > 0 favours the row)", "",
                 differences(results, configs)]
    (out / "results.json").write_text(json.dumps({"meta": meta, "references": references, "studies": summary,
                                                  "runs": results}, indent=1) + "\n")
    text = "\n".join(sections)
    (out / "study.md").write_text(text)
    return text


def default_configs(teacher_cache: Path | None) -> list[str]:
    """Both studies, and skl@cache given a cache. Not the K sweep: it needs a cache at k = 128."""
    return [name for name in CONFIGURATIONS if name not in K_SWEEP and (name != CACHED or teacher_cache)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGURATIONS),
                        help="default: the loss and schedule studies, and skl@cache with --teacher-cache "
                             "(not the K sweep)")
    parser.add_argument("--teacher-cache", type=Path, metavar="DIR",
                        help="a distillm cache-teacher directory of the teacher: adds skl@cache, and serves the "
                             "skl@topK runs of the K sweep (K up to its cache.top_k)")
    parser.add_argument("--warm-start-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-interval", type=int, default=20)
    parser.add_argument("--curve-examples", type=int, default=50, help="validation examples per curve point")
    parser.add_argument("--test-examples", type=int, default=0, help="test examples scored at the end (0 = all 300)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run (e.g. another teacher or data set)")
    parser.add_argument("--quick", action="store_true",
                        help="2 seeds, 2 warm-start + 3 steps, 8 examples: checks the pipeline, not the claims")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/losses"))
    args = parser.parse_args(argv)
    args.configs = args.configs or default_configs(args.teacher_cache)
    needing = [name for name in args.configs if name in CACHED_CONFIGS]
    if needing and not args.teacher_cache:
        parser.error(f"{', '.join(needing)} need --teacher-cache DIR")
    if args.quick:
        args.seeds, args.warm_start_steps, args.steps, args.eval_interval = args.seeds[:2], 2, 3, 2
        args.curve_examples = args.test_examples = 8
        args.set = [*args.set, "eval.max_new_tokens=8", "eval.batch_size=8"]
    args.out.mkdir(parents=True, exist_ok=True)
    student = functools.cache(lambda: warm_start(args))
    references = reference_scores(args, student)
    results = []
    for seed in args.seeds:
        for name in args.configs:
            results.append(train_and_score(name, seed, student, args))
            r = results[-1]
            print(f"{name:>5} seed {seed}: ROUGE-L {r['rouge_l']:.2f}, test CE {r['test_loss']:.4f}, "
                  f"mean val loss {mean_val_loss(r):.4f}", flush=True)
    command = " ".join(["python benchmarks/compare_losses.py", *(argv if argv is not None else sys.argv[1:])])
    meta = {**environment(), "machine": machine(), "commit": commit(), "command": command, **{k: str(v) for k, v in vars(args).items()}}
    print(report(results, references, meta, args.out))


if __name__ == "__main__":
    main()
