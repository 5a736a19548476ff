"""benchmarks/cache_coverage.py on a tiny cache: what it reports of the first K entries is the
teacher's own top-K mass and the reference token's presence there, computed from the teacher."""

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cache_coverage  # noqa: E402

from distillm_ext.recipe.cli import main as distillm  # noqa: E402
from distillm_ext.recipe.config import load_config  # noqa: E402
from distillm_ext.recipe.data import collate_for_training, load_split, pad_token_id  # noqa: E402
from distillm_ext.recipe.models import load_teacher  # noqa: E402


def test_coverage_is_the_teachers_top_k_mass_and_the_references_presence(tiny, tmp_path):
    settings = [item for item in overrides(tiny, tmp_path / "unused") if not item.startswith("output.dir=")]
    cache = tmp_path / "cache"
    assert distillm(["cache-teacher", *settings, f"cache.dir={cache}", "cache.top_k=4"]) == 0
    rows = cache_coverage.coverage(cache, settings, [1, 4])

    config = load_config(None, settings)
    teacher, tokenizer = load_teacher(config.teacher.path)
    batch = collate_for_training(load_split(config.data, "train", tokenizer), pad_token_id(tokenizer))
    response = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    probabilities = logits[:, :-1][response].softmax(-1)
    references = batch["labels"][:, 1:][response]
    assert [row["k"] for row in rows] == [1, 4] and rows[0]["positions"] == len(references)
    for row in rows:
        top = probabilities.topk(row["k"], -1)
        # The stored log-probabilities are within 0.003 nats: the mass within 0.3% of itself.
        assert row["teacher_mass_in_top_k"] == pytest.approx(float(top.values.sum(-1).mean()), rel=4e-3)
        assert row["reference_in_top_k"] == pytest.approx(float((top.indices == references[:, None]).any(-1).float().mean()))
    assert rows[0]["teacher_mass_in_top_k"] < rows[1]["teacher_mass_in_top_k"] < 1


def test_coverage_refuses_a_k_above_the_caches(tiny, tmp_path):
    settings = [item for item in overrides(tiny, tmp_path / "unused") if not item.startswith("output.dir=")]
    assert distillm(["cache-teacher", *settings, f"cache.dir={tmp_path / 'cache'}", "cache.top_k=2"]) == 0
    with pytest.raises(SystemExit, match="at most the cache's k, 2"):
        cache_coverage.coverage(tmp_path / "cache", settings, [1, 4])
