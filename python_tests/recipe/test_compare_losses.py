"""benchmarks/compare_losses.py --quick on tiny models: every configuration trains and is scored,
the report is written, finished runs are reused, and a re-run reproduces its numbers."""

import json
import sys
from pathlib import Path

import pytest
from tiny_models import overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import compare_losses  # noqa: E402

from distillm_ext.recipe.cli import main as distillm  # noqa: E402


def test_quick_study_runs_and_reruns_reproduce(tiny, tmp_path):
    out, cache = tmp_path / "losses", tmp_path / "cache"
    tiny_settings = [item for item in overrides(tiny, tmp_path / "unused") if not item.startswith("output.dir=")]
    assert distillm(["cache-teacher", *tiny_settings, f"cache.dir={cache}", "cache.top_k=8"]) == 0
    compare_losses.main(["--quick", "--out", str(out), "--teacher-cache", str(cache), "--set", *tiny_settings])
    report = json.loads((out / "results.json").read_text())
    # Every configuration but the K sweep, which needs a cache at k = 128 (this one has k = 8).
    assert len(report["runs"]) == 2 * (len(compare_losses.CONFIGURATIONS) - len(compare_losses.K_SWEEP))
    assert [row["config"] for row in report["studies"]["losses"]] == list(compare_losses.LOSS_STUDY)
    assert [row["config"] for row in report["studies"]["schedules"]] == list(compare_losses.SCHEDULE_STUDY)
    assert [row["config"] for row in report["studies"]["cache"]] == ["skl", compare_losses.CACHED]
    assert all(run["test_examples"] == 8 and [s for s, _ in run["curve"]] == [0, 2, 3] for run in report["runs"])
    by_config = {(run["config"], run["seed"]): run for run in report["runs"]}
    assert by_config["skl+on_policy", 1]["sources"] == {"dataset": 0, "generate": 3, "replay": 0}
    assert by_config["skl", 1]["sources"]["dataset"] == 3 and by_config["skl", 1]["phi"] == [0.0] * 3
    table = (out / "study.md").read_text()
    assert "| srkl |" in table and "skl better than fkl on test ROUGE-L:" in table
    assert "skl+adaptive better than skl+on_policy on training seconds:" in table
    assert "skl@cache better than skl on test CE:" in table
    assert "srkl+adaptive better than srkl on test ROUGE-L:" in table
    assert "| skl+adaptive | " in table.split("Paired differences against the baselines")[1]
    # The gap shares follow from the row's mean and the two test scores at the ends of the gap.
    skl = next(row for row in report["studies"]["losses"] if row["config"] == "skl")
    before, teacher = (report["references"][end]["rougeL"] for end in ("before", "teacher"))
    assert skl["gap_rouge_l"] == pytest.approx((skl["rouge_l"] - before) / (teacher - before))
    for chart in ("losses.png", "losses_curves.png", "schedules.png", "schedules_curves.png"):
        assert (out / chart).stat().st_size > 10_000, chart
    # A finished run is reused; one run again from scratch gives the same numbers.
    again = out / "srkl-2"
    before = json.loads((again / "result.json").read_text())
    (again / "result.json").unlink()
    compare_losses.main(["--quick", "--out", str(out), "--configs", "srkl", "--seeds", "1", "2", "--set",
                         *tiny_settings])
    after = json.loads((again / "result.json").read_text())
    assert {k: after[k] for k in ("test_loss", "rouge_l", "curve")} == {k: before[k] for k in ("test_loss", "rouge_l", "curve")}
    # The K sweep reads the first K entries of the cache: K = 8, all of them, is skl@cache again.
    compare_losses.main(["--quick", "--out", str(out), "--configs", "skl@top1", "skl@top8", "--seeds", "1",
                         "--teacher-cache", str(cache), "--set", *tiny_settings])
    sweep = {run["config"]: run for run in json.loads((out / "results.json").read_text())["runs"]}
    assert sweep["skl@top8"]["curve"] == by_config["skl@cache", 1]["curve"]
    assert sweep["skl@top1"]["curve"] != sweep["skl@top8"]["curve"]


@pytest.mark.parametrize("diffs, verdict", [([1.0, 1.2, 0.9], "holds"), ([-1.0, -1.1, -0.9], "contradicted"),
                                            ([1.0, -1.0, 0.2], "not resolved")])
def test_paired_verdicts(diffs, verdict):
    results = [{"config": "skl", "seed": s, "rouge_l": 10 + d} for s, d in enumerate(diffs)]
    results += [{"config": "fkl", "seed": s, "rouge_l": 10.0} for s in range(3)]
    p = compare_losses.paired(results, "skl", "fkl", lambda r: r["rouge_l"], True)
    assert p["verdict"].startswith(verdict)
    # The interval excludes 0 exactly when the verdict is resolved.
    low, high = p["ci"]
    assert low < p["mean"] < high and (low > 0 or high < 0) == (verdict != "not resolved")
