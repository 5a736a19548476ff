"""The built-in WordNet definitions set and the script that builds it."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from distillm_ext.recipe.data import BUILTIN_DATA_DIR, builtin_data_files

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_WORDNET = Path("/usr/share/wordnet")


def load_builder():
    spec = importlib.util.spec_from_file_location("build_wordnet_data", ROOT / "scripts" / "build_wordnet_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_split(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_builtin_splits_have_their_sizes_and_fields():
    splits = {name: read_split(path) for name, path in builtin_data_files().items()}
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 4000, "validation": 300, "test": 300}
    for rows in splits.values():
        for row in rows:
            assert set(row) == {"prompt", "response"}
            assert row["prompt"].startswith("Define the ") and row["prompt"].endswith('".')
            assert 10 <= len(row["response"]) <= 100
    prompts = [set(r["prompt"] for r in rows) for rows in splits.values()]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert "Princeton University" in (BUILTIN_DATA_DIR / "WORDNET_LICENSE").read_text()


def write_mini_wordnet(directory: Path):
    """Two nouns and a verb in WordNet's index/data formats, with a license header line."""
    directory.mkdir()
    header = "  1 This software and database is being provided to you\n"
    (directory / "index.noun").write_text(header + "\n".join([
        "lantern n 1 2 @ ~ 1 1 00000001  ",
        "lamp n 2 1 @ 2 0 00000002 00000001  ",  # no tagged sense: left out
        "ice_cream n 1 1 @ 1 1 00000003  ",      # not a single alphabetic word: left out
    ]) + "\n")
    (directory / "data.noun").write_text(header + "\n".join([
        '00000001 06 n 01 lantern 0 001 @ 00000009 n 0000 | light in a transparent protective case; "a lantern hung on the hook"  ',
        "00000002 06 n 01 lamp 0 000 | an artificial source of visible illumination  ",
        "00000003 13 n 01 ice_cream 0 000 | frozen dessert containing cream and sugar  ",
    ]) + "\n")
    (directory / "index.verb").write_text(header + "gallop v 1 1 @ 1 1 00000004  \n")
    (directory / "data.verb").write_text(header + "00000004 38 v 01 gallop 0 000 | ride at a galloping pace  \n")
    (directory / "index.adj").write_text(header)
    (directory / "data.adj").write_text(header)


def test_builder_parses_wordnet_formats(tmp_path):
    builder = load_builder()
    write_mini_wordnet(tmp_path / "wordnet")
    rows = list(builder.examples(tmp_path / "wordnet"))
    assert [(r["prompt"], r["response"]) for r in rows] == [
        ('Define the noun "lantern".', "light in a transparent protective case"),
        ('Define the verb "gallop".', "ride at a galloping pace"),
    ]


@pytest.mark.skipif(not (SYSTEM_WORDNET / "data.noun").exists(), reason="Debian's wordnet-base is not installed")
def test_rebuilding_from_wordnet_gives_the_committed_files(tmp_path):
    builder = load_builder()
    builder.write(builder.split(list(builder.examples(SYSTEM_WORDNET))), tmp_path)
    for name, path in builtin_data_files().items():
        assert (tmp_path / Path(path).name).read_bytes() == Path(path).read_bytes(), name
