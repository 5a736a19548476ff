"""Tiny random models, tokenizer and data for trainer tests, built in the test (no downloads).

A word-level tokenizer over a small made-up vocabulary, a 4-layer Llama teacher (hidden 32),
and definition-style prompt/response data as JSON lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["cat", "dog", "tree", "lamp", "river", "stone", "cloud", "bread", "house", "bird", "ship", "key"]
GLOSSES = {
    "cat": "a small animal that purrs", "dog": "an animal that barks", "tree": "a tall plant with wood",
    "lamp": "a thing that gives light", "river": "a stream of water", "stone": "a hard piece of rock",
    "cloud": "a white mass in the sky", "bread": "a food made of flour", "house": "a building to live in",
    "bird": "an animal that flies", "ship": "a large boat", "key": "a thing that opens a lock",
}
TEMPLATE = "Q: {prompt} A:"


def examples(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        word = WORDS[(i + offset) % len(WORDS)]
        kind = ["noun", "thing", "word"][(i + offset) // len(WORDS) % 3]
        rows.append({"prompt": f"define the {kind} {word} .", "response": GLOSSES[word]})
    return rows


def make_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    words = sorted({w for row in examples(36) for text in row.values() for w in text.split()}
                   | {"Q:", "A:", "Q", "A", ":"} | set(extra_words))
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_model(vocab_size: int, layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config)


def fit_to_examples(model: LlamaForCausalLM, tokenizer, rows: list[dict], steps: int = 150) -> None:
    """Teaches a random model the data (CE on whole sequences) so that, as a teacher, it has
    something to pass on: KD from a random teacher would be KD from the uniform distribution."""
    texts = [f"{TEMPLATE.format(prompt=r['prompt'])} {r['response']} <eos>" for r in rows]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build(root: Path) -> dict:
    """Writes teacher/, student/, train.jsonl, validation.jsonl under root; returns their paths."""
    tokenizer = make_tokenizer()
    paths = {"root": root}
    for name, layers, seed in (("teacher", 4, 0), ("student", 2, 1)):
        paths[name] = root / name
        model = make_model(len(tokenizer), layers, seed)
        if name == "teacher":
            fit_to_examples(model, tokenizer, examples(36))
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["train"] = write_jsonl(root / "train.jsonl", examples(32))
    paths["validation"] = write_jsonl(root / "validation.jsonl", examples(8, offset=3))
    return paths


def overrides(paths: dict, output_dir: Path, **extra) -> list[str]:
    """Config overrides for a fast tiny run (teacher-derived student: layers 0 and 3)."""
    values = {
        "teacher.path": paths["teacher"], "student.keep_layers": "0,3",
        "data.train": paths["train"], "data.validation": paths["validation"], "data.test": paths["validation"],
        "data.template": TEMPLATE, "data.max_length": 24, "data.max_prompt_length": 12,
        "train.batch_size": 8, "train.max_steps": 6, "train.lr": 3e-3, "train.warmup_steps": 1,
        "eval.num_examples": 4, "eval.batch_size": 4, "eval.max_new_tokens": 4, "eval.teacher": False,
        "output.dir": output_dir, "output.checkpoint_interval": 0, "output.plots": False,
    }
    values.update({key.replace("__", "."): value for key, value in extra.items()})
    return [f"{key}={value}" for key, value in values.items()]
