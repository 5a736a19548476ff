"""Builds the built-in distillation data set from WordNet 3.0 (Debian package wordnet-base).

Each example asks for a word's definition and answers with its WordNet gloss:
    {"prompt": "Define the noun \"lantern\".", "response": "light in a transparent protective case"}

Only a word's most frequent sense is used, only words seen in WordNet's sense-tagged corpora
(common words), and only single alphabetic lemmas with a short gloss. The split is fixed by a
hash of (lemma, part of speech), so rebuilding gives the same files.

    apt-get install wordnet-base
    python scripts/build_wordnet_data.py [--wordnet /usr/share/wordnet] [--out distillm_ext/recipe/data]
"""

import argparse
import gzip
import hashlib
import json
import re
import shutil
from pathlib import Path

PARTS_OF_SPEECH = {"noun": "noun", "verb": "verb", "adj": "adjective"}
SPLIT_SIZES = {"test": 300, "validation": 300, "train": 4000}
LICENSE_SOURCE = Path("/usr/share/doc/wordnet-base/copyright")


def most_frequent_senses(index_path: Path):
    """(lemma, offset of its first-listed, most frequent synset) for tagged lemmas."""
    for line in index_path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):  # license header
            continue
        fields = line.split()
        lemma, synset_count, pointer_count = fields[0], int(fields[2]), int(fields[3])
        rest = fields[4 + pointer_count:]
        tagged_senses = int(rest[1])
        offsets = rest[2:2 + synset_count]
        if tagged_senses > 0 and offsets:
            yield lemma, offsets[0]


def glosses(data_path: Path) -> dict:
    """Synset offset -> definition (the gloss up to its quoted examples)."""
    result = {}
    for line in data_path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue
        offset, gloss = line.split(" ", 1)[0], line.split("|", 1)[1]
        definition = re.split(r';\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
        result[offset] = definition
    return result


def examples(wordnet: Path):
    for suffix, pos_name in PARTS_OF_SPEECH.items():
        definitions = glosses(wordnet / f"data.{suffix}")
        for lemma, offset in most_frequent_senses(wordnet / f"index.{suffix}"):
            definition = definitions.get(offset, "")
            if not (lemma.isalpha() and len(lemma) >= 3 and 10 <= len(definition) <= 100):
                continue
            yield {"prompt": f'Define the {pos_name} "{lemma}".', "response": definition,
                   "key": f"{lemma}|{pos_name}"}


def split(all_examples: list) -> dict:
    ordered = sorted(all_examples, key=lambda e: hashlib.sha1(e["key"].encode()).hexdigest())
    splits, start = {}, 0
    for name, size in SPLIT_SIZES.items():
        splits[name] = [{"prompt": e["prompt"], "response": e["response"]} for e in ordered[start:start + size]]
        start += size
    return splits


def write(splits: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        # mtime=0: the same input gives byte-identical files.
        with gzip.GzipFile(out / f"wordnet_definitions.{name}.jsonl.gz", "wb", mtime=0) as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    if LICENSE_SOURCE.exists():
        shutil.copy(LICENSE_SOURCE, out / "WORDNET_LICENSE")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "distillm_ext" / "recipe" / "data")
    args = parser.parse_args()
    if not (args.wordnet / "data.noun").exists():
        raise SystemExit(f"no WordNet database in {args.wordnet}: apt-get install wordnet-base")
    all_examples = list(examples(args.wordnet))
    needed = sum(SPLIT_SIZES.values())
    if len(all_examples) < needed:
        raise SystemExit(f"only {len(all_examples)} usable entries, need {needed}")
    splits = split(all_examples)
    write(splits, args.out)
    print(f"{len(all_examples)} usable entries; wrote " + ", ".join(f"{k}: {len(v)}" for k, v in splits.items()))


if __name__ == "__main__":
    main()
