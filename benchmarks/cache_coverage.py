"""What the first K entries of a teacher cache keep: for each K, the teacher's mean probability
mass in its top K, and how often the reference token is among them, over every cached response
position of the train split. It explains the K sweep (compare_losses.py skl@topK): the loss
sees the top K exactly and the rest as one tail class.

    python benchmarks/cache_coverage.py --cache DIR [--set KEY=VALUE ...]   # the cache's run config

Reads the cache and the tokenized train split only (no model is loaded).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from distillm_ext.recipe.config import load_config
from distillm_ext.recipe.data import load_split
from distillm_ext.recipe.models import model_dir
from distillm_ext.recipe.teacher_cache import TeacherCache, data_fingerprint


def coverage(cache_dir: Path, overrides: list[str], ks: list[int]) -> list[dict]:
    config = load_config(None, overrides)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(config.teacher.path))
    examples = load_split(config.data, "train", tokenizer)
    cache = TeacherCache(cache_dir)
    if cache.manifest["data"]["fingerprint"] != data_fingerprint(examples):
        sys.exit(f"{cache_dir} was made from another train split than this config's (pass the cache's "
                 f"settings with --set)")
    if max(ks) > cache.codec.top_k:
        sys.exit(f"--ks: at most the cache's k, {cache.codec.top_k}")
    signal = cache.signal(torch.arange(len(examples)), torch.device("cpu"))
    references = torch.tensor([token for example in examples for token in example.response_ids])
    rows = []
    for k in ks:
        ids, logprobs = signal.ids[:, :k], signal.logprobs[:, :k]
        rows.append({"k": k, "positions": len(references),
                     "teacher_mass_in_top_k": float(logprobs.exp().sum(-1).mean()),
                     "reference_in_top_k": float((ids == references[:, None]).any(-1).float().mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="a distillm cache-teacher directory")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32, 128], help="each at most the cache's k")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the config the cache was made with")
    args = parser.parse_args()
    rows = coverage(args.cache, args.set, args.ks)
    print("| K | teacher mass in its top K (mean) | reference token in the top K |")
    print("| --- | --- | --- |")
    for row in rows:
        print(f"| {row['k']} | {row['teacher_mass_in_top_k']:.3f} | {row['reference_in_top_k']:.3f} |")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
