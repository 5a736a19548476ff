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

from distillm_ext.recipe.config import ConfigError, load_config
from distillm_ext.recipe.data import load_split
from distillm_ext.recipe.models import model_dir
from distillm_ext.recipe.teacher_cache import open_teacher_cache, read_manifest


def coverage(cache_dir: Path, overrides: list[str], ks: list[int]) -> list[dict]:
    codec = read_manifest(cache_dir)["codec"]
    if max(ks) > codec["top_k"]:
        sys.exit(f"--ks: at most the cache's k, {codec['top_k']}")
    config = load_config(None, [*overrides, f"teacher.cache={cache_dir}"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir(config.teacher.path))
    examples = load_split(config.data, "train", tokenizer)
    try:  # the check a training run makes: this teacher, tokenizer, split and temperature
        cache = open_teacher_cache(config, tokenizer, examples, codec["vocab_size"])
    except ConfigError as error:
        sys.exit(f"{error} (pass the cache's settings with --set)")
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
