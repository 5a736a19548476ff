"""Data sets for distillation. For now: the built-in WordNet definitions set.

The built-in set ("Define the noun "lantern"." -> its WordNet gloss) ships with the package as
gzipped JSON lines, built by scripts/build_wordnet_data.py from Debian's wordnet-base; see
distillm_ext/data/WORDNET_LICENSE. Each line is {"prompt": str, "response": str}.
"""

from pathlib import Path

BUILTIN_DATA_DIR = Path(__file__).parent / "data"
BUILTIN_SPLITS = ("train", "validation", "test")


def builtin_data_files() -> dict:
    """{split: path} of the built-in WordNet definitions set (train 4000, validation 300, test 300)."""
    return {split: str(BUILTIN_DATA_DIR / f"wordnet_definitions.{split}.jsonl.gz") for split in BUILTIN_SPLITS}
