"""Data for distillation: loading prompt/response examples, tokenizing them, batching.

Sources: the built-in WordNet definitions set ("Define the noun "lantern"." -> its gloss, built by
scripts/build_wordnet_data.py from Debian's wordnet-base, license in data/WORDNET_LICENSE),
JSON/JSONL files (optionally gzipped), an arrow file, or a folder written by
`datasets.Dataset.save_to_disk`.

Label convention (Hugging Face): `labels` has the shape of `input_ids`, is not shifted, and is
-100 on prompt and padding; the response tokens, EOS included, are kept. The loss shifts.
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..ops import IGNORE_INDEX
from .config import BUILTIN, ConfigError, DataConfig

log = logging.getLogger(__name__)

BUILTIN_DATA_DIR = Path(__file__).parent / "data"
BUILTIN_SPLITS = ("train", "validation", "test")


def builtin_data_files() -> dict:
    """{split: path} of the built-in WordNet definitions set (train 4000, validation 300, test 300)."""
    return {split: str(BUILTIN_DATA_DIR / f"wordnet_definitions.{split}.jsonl.gz") for split in BUILTIN_SPLITS}


@dataclass
class Example:
    prompt: str
    response: str


@dataclass
class EncodedExample:
    prompt_ids: list[int]  # the templated prompt
    response_ids: list[int]  # the response, EOS appended (truncated to fit max_length)
    reference: str  # the response text, for ROUGE-L
    index: int = -1  # its place in the encoded split: a teacher cache finds its rows by it


def _read_json_rows(path: Path, split: str) -> list[dict]:
    compressed = path.suffix == ".gz"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rt", encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:  # gzip.BadGzipFile is an OSError
        kind = "gzip-compressed UTF-8 text" if compressed else "UTF-8 text"
        raise ConfigError(f"data.{split}: {path} is not {kind} (JSON or JSON lines): {error}") from None
    if text.lstrip().startswith("["):  # one JSON array
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: malformed JSON at line {error.lineno}: {error.msg}") from None
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}: malformed JSON on line {line_number}: {error.msg}") from None
    return rows


def _read_rows(source: str, split: str) -> list[dict]:
    path = Path(builtin_data_files()[split] if source == BUILTIN else source)
    if not path.exists():
        raise ConfigError(f"data.{split}: data file {source} does not exist")
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"data.{split}: {source} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded.to_list()
    if path.suffix == ".arrow":
        import datasets

        return datasets.Dataset.from_file(str(path)).to_list()
    return _read_json_rows(path, split)


def load_examples(source: str, split: str, prompt_field: str = "prompt", response_field: str = "response") -> list[Example]:
    """The examples of one split; every row must have both fields (as strings)."""
    examples = []
    for row_number, row in enumerate(_read_rows(source, split), start=1):
        for field in (prompt_field, response_field):
            if not isinstance(row, dict) or field not in row:
                present = list(row) if isinstance(row, dict) else type(row).__name__
                raise ConfigError(
                    f"data.{split}: example {row_number} of {source} has no field {field!r} (it has {present}); "
                    f"set data.prompt_field / data.response_field"
                )
        examples.append(Example(str(row[prompt_field]), str(row[response_field])))
    if not examples:
        raise ConfigError(f"data.{split}: {source} holds no examples")
    return examples


def render_prompt(tokenizer, template: str, prompt: str, system_prompt: Optional[str] = None) -> list[int]:
    """Token ids of the prompt as the model sees it before its answer; with the chat template, a
    system message first unless `system_prompt` is None (then the template's own default, if any)."""
    if template == "chat":
        system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        text = tokenizer.apply_chat_template(
            system + [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(template.format(prompt=prompt))["input_ids"]


def encode_examples(examples: list[Example], tokenizer, template: str, max_length: int,
                    max_prompt_length: int, split: str = "train",
                    system_prompt: Optional[str] = None) -> list[EncodedExample]:
    """Tokenizes examples; drops (and logs a count of) those whose prompt exceeds max_prompt_length."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; responses must end with one")
    encoded, dropped = [], 0
    for example in examples:
        prompt_ids = render_prompt(tokenizer, template, example.prompt, system_prompt)
        if len(prompt_ids) > max_prompt_length:
            dropped += 1
            continue
        response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append(EncodedExample(prompt_ids, response_ids[: max_length - len(prompt_ids)], example.response,
                                      index=len(encoded)))
    if dropped:
        log.warning("%s: dropped %d of %d examples whose prompt is longer than data.max_prompt_length=%d tokens",
                    split, dropped, len(examples), max_prompt_length)
    if not encoded:
        raise ConfigError(f"data.{split}: every prompt is longer than data.max_prompt_length={max_prompt_length}")
    return encoded


def load_split(data: DataConfig, split: str, tokenizer, limit: int = 0) -> list[EncodedExample]:
    """Split `split` of the configured data, tokenized; only its first `limit` examples if limit > 0."""
    examples = load_examples(getattr(data, split), split, data.prompt_field, data.response_field)
    encoded = encode_examples(examples, tokenizer, data.template, data.max_length, data.max_prompt_length, split,
                              data.system_prompt)
    return encoded[:limit] if limit else encoded


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate_for_training(examples: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) int64 input_ids, attention_mask and labels (-100 on prompt and padding),
    and the examples' (B,) int64 `example_ids` (their indices in the split: a teacher cache
    reads its rows by them)."""
    length = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n_prompt, n_total = len(example.prompt_ids), len(example.prompt_ids) + len(example.response_ids)
        input_ids[row, :n_total] = torch.tensor(example.prompt_ids + example.response_ids)
        labels[row, n_prompt:n_total] = torch.tensor(example.response_ids)
        attention_mask[row, :n_total] = 1
    example_ids = torch.tensor([example.index for example in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "example_ids": example_ids}


def collate_prompts(examples: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded (B, T) prompts for generation: every row's answer starts at column T."""
    length = max(len(e.prompt_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, length - len(example.prompt_ids):] = torch.tensor(example.prompt_ids)
        attention_mask[row, length - len(example.prompt_ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
