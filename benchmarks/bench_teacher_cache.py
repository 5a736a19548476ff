"""The offline teacher against the live one, on the built-in default (shortened runs).

    python benchmarks/bench_teacher_cache.py --cache runs/teacher_cache   # the cache is made there if absent

Measures, in one process per training:
- the cache: bytes per cached token (manifest.json: files over tokens), and how long making it took;
- the code's error: the stored log-probabilities against the teacher's exact top-k (float32) on
  the first --error-examples training examples, and what that does to the SKL loss of the
  untrained built-in student (exact top-k vs stored top-k), beside the gap between the top-k
  loss and the dense loss (the tail's information, which no code can keep);
- `distillm train` with the live teacher and with teacher.cache (sgo.mode=off, so no teacher
  loaded): tokens/s (median of the logged steps after the first two, from metrics.jsonl: the
  training time alone) and the process's peak RSS. The two alternate, --repeats times each.
"""

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import compare_trainings, environment, print_table, run_distillm, write_json  # noqa: E402

from distillm_ext import skew_kl, skew_kl_topk  # noqa: E402
from distillm_ext.recipe.cache_teacher import TopKTeacher  # noqa: E402
from distillm_ext.recipe.config import load_config  # noqa: E402
from distillm_ext.recipe.data import collate_for_training, load_split, pad_token_id  # noqa: E402
from distillm_ext.recipe.models import load_student, load_teacher  # noqa: E402
from distillm_ext.recipe.topk_codec import TopKCodec  # noqa: E402

def quantization_error(cache_dir: Path, examples_count: int) -> dict:
    """The code's error, and its effect on the loss, on the first training examples."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    config = load_config(None, [])
    teacher, tokenizer = load_teacher(config.teacher.path)
    student, _ = load_student(config.student.path, config.student.keep_layers, config.teacher.path, tokenizer)
    codec = TopKCodec.from_dict(manifest["codec"])
    examples = load_split(config.data, "train", tokenizer)[:examples_count]
    batch = collate_for_training(examples, pad_token_id(tokenizer))
    kept = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        ids, exact = TopKTeacher(teacher, codec, manifest["temperature"], contextlib.nullcontext)(batch)
        stored_ids, stored = codec.decode(codec.encode(ids, exact))
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        teacher_logits = teacher(**inputs).logits[:, :-1][kept][:, :codec.vocab_size]
        student_logits = student(**inputs).logits[:, :-1][kept][:, :codec.vocab_size]
    above_floor = exact > codec.logprob_floor
    error = (stored - exact).abs()[above_floor]
    dense = float(skew_kl(student_logits, teacher_logits))
    loss_exact = float(skew_kl_topk(student_logits, ids, exact))
    loss_stored = float(skew_kl_topk(student_logits, stored_ids, stored))
    return {"positions": int(kept.sum()), "k": codec.top_k, "logprob_bits": codec.logprob_bits,
            "max_abs_logprob_error": float(error.max()), "mean_abs_logprob_error": float(error.mean()),
            "bound": codec.max_error, "entries_below_floor": int((~above_floor).sum()),
            "skl_dense": dense, "skl_topk_exact": loss_exact, "skl_topk_stored": loss_stored,
            "skl_relative_error_from_code": abs(loss_stored - loss_exact) / loss_exact,
            "skl_topk_over_dense": loss_exact / dense,
            "teacher_mass_in_topk_mean": float(exact.exp().sum(-1).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("runs/teacher_cache"))
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--error-examples", type=int, default=64)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/teacher_cache.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_teacher_cache-"))
    run_distillm(["cache-teacher", f"cache.dir={args.cache}", f"cache.top_k={args.top_k}"], work / "cache.log")
    manifest = json.loads((args.cache / "manifest.json").read_text())
    error = quantization_error(args.cache, args.error_examples)

    rows = compare_trainings([("live teacher", []), ("teacher.cache", [f"teacher.cache={args.cache}"])],
                             args.steps, args.repeats, work)
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"cache: {manifest['tokens']} tokens, top-{manifest['codec']['top_k']}, {manifest['bytes_per_token']} "
          f"B/token ({manifest['codec']['bytes_per_token']} B of codes)")
    print(json.dumps(error, indent=2))
    print_table(rows, [("mode", "teacher", "{}"), ("tokens_per_s", "tokens/s (median)", "{:.0f}"),
                       ("tokens_per_s_runs", "tokens/s per run", "{}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")])
    print(f"cache-fed / live tokens/s: {speedup:.2f}x")
    write_json(args.output, rows, {**environment(), "steps": args.steps, "cache": {
        key: manifest[key] for key in ("tokens", "bytes", "bytes_per_token", "codec")}, "code_error": error,
        "speedup": speedup})


if __name__ == "__main__":
    main()
