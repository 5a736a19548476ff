"""The offline teacher: a directory of the teacher's top-k log-probabilities at every response
position of the train split, made once by `distillm cache-teacher` (cache_teacher.py) and read by
`distillm train teacher.cache=DIR` (TeacherCache).

Layout of a cache directory:
- plan.json: what binds the cache to a run (`cache_binding`): the teacher's fingerprint, the
  tokenizer's, the encoded train split's, the temperature, max_length and the code
  (topk_codec.py). Written before any shard, so that a resumed run can tell it is the same job.
- shard-NNNNN.safetensors: the examples [N * shard_examples, ...): `codes`, (tokens, bytes per
  token) uint8, the positions of each example in order, and `lengths`, (examples,) int32.
- manifest.json: the plan plus the shards and totals, written last. Without it the cache is
  incomplete, and the reader refuses it.

A cache that does not match the run is an error that says which setting differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, ConfigError
from .data import EncodedExample
from .kd_loss import TeacherTopK
from .topk_codec import TopKCodec

FORMAT = "distillm_ext teacher top-k cache"
VERSION = 1
PLAN, MANIFEST = "plan.json", "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _sha256(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return _sha256([json.dumps([vocab, special]).encode()])


def data_fingerprint(examples: list[EncodedExample]) -> str:
    """A hash of the encoded examples, in order: it changes with the data, the tokenizer, the
    template and the length limits."""
    return _sha256(np.asarray([len(e.prompt_ids), len(e.response_ids), *e.prompt_ids, *e.response_ids],
                              dtype=np.int64).tobytes() for e in examples)


def teacher_fingerprint(directory: Path, samples: int = 16, block: int = 1 << 16) -> str:
    """A quick hash of a model directory: config.json, and of each weights file its size, its
    first MiB (a safetensors header: names, dtypes, shapes) and `samples` blocks spread through
    it. Two different checkpoints differ in it; hashing all of a 70B teacher would take minutes."""
    def chunks():
        yield (directory / "config.json").read_bytes()
        for file in sorted(directory.iterdir()):
            if file.suffix not in (".safetensors", ".bin", ".pt", ".gguf"):
                continue
            size = file.stat().st_size
            yield f"{file.name}:{size}".encode()
            with open(file, "rb") as reader:
                yield reader.read(1 << 20)
                for index in range(samples):
                    reader.seek(size * index // samples)
                    yield reader.read(block)
    return _sha256(chunks())


def cache_binding(config: Config, teacher_dir: Path, tokenizer, examples: list[EncodedExample],
                  codec: TopKCodec, teacher_rows: int, shard_examples: int) -> dict:
    """What a cache must share with a run that reads it."""
    data = config.data
    return {
        "format": FORMAT, "version": VERSION,
        "teacher": {"path": str(config.teacher.path), "fingerprint": teacher_fingerprint(teacher_dir),
                    "output_rows": teacher_rows},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": {"train": str(data.train), "template": data.template,
                 "system_prompt": data.system_prompt, "max_length": data.max_length,
                 "max_prompt_length": data.max_prompt_length, "examples": len(examples),
                 "fingerprint": data_fingerprint(examples)},
        "temperature": config.loss.temperature,
        "codec": codec.to_dict(),
        "shard_examples": shard_examples,
    }


def read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, value: dict) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(staging, path)


def read_manifest(directory) -> dict:
    """The manifest of a complete cache; ConfigError naming teacher.cache otherwise."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST)
    if manifest is None:
        state = "is incomplete (no manifest.json: run distillm cache-teacher again to finish it)" \
            if (directory / PLAN).is_file() else "is not a teacher cache (no manifest.json)"
        raise ConfigError(f"teacher.cache {str(directory)!r} {state}")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"teacher.cache {str(directory)!r}: not a version-{VERSION} teacher cache")
    return manifest


def differences(cached: dict, run: dict) -> list[str]:
    """What differs between the binding of a cache and the binding a run would give it, in the
    order a person should fix it (another tokenizer changes the data's fingerprint too)."""
    checks = [
        ("loss.temperature", cached["temperature"], run["temperature"]),
        ("data.max_length", cached["data"]["max_length"], run["data"]["max_length"]),
        ("data.max_prompt_length", cached["data"]["max_prompt_length"], run["data"]["max_prompt_length"]),
        ("data.template", cached["data"]["template"], run["data"]["template"]),
        # caches from before the key have the template's own system message: none
        ("data.system_prompt", cached["data"].get("system_prompt"), run["data"]["system_prompt"]),
        ("the teacher (teacher.path)", cached["teacher"]["fingerprint"], run["teacher"]["fingerprint"]),
        ("the tokenizer", cached["tokenizer"], run["tokenizer"]),
        ("the train split (data.train)", cached["data"]["fingerprint"], run["data"]["fingerprint"]),
        ("the shared vocabulary", cached["codec"]["vocab_size"], run["codec"]["vocab_size"]),
        ("cache.top_k", cached["codec"]["top_k"], run["codec"]["top_k"]),
    ]
    return [f"{name}: {_show(old)} in the cache, {_show(new)} in this run" for name, old, new in checks if old != new]


def _show(value) -> str:
    return f"fingerprint {value[:12]}" if isinstance(value, str) and len(value) == 64 else repr(value)


class TeacherCache:
    """A complete cache, opened for reading: `signal(example_ids)` gives the teacher's top-k at
    the response positions of those examples, decoded, as TeacherTopK; with `read_top_k` > 0,
    only the first (most likely) read_top_k of the K stored."""

    def __init__(self, directory, read_top_k: int = 0):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.codec = TopKCodec.from_dict(self.manifest["codec"])
        if read_top_k > self.codec.top_k:
            raise ConfigError(f"config key 'teacher.cache_top_k' must be <= the k of teacher.cache "
                              f"{str(self.directory)!r} ({self.codec.top_k}), got {read_top_k}")
        self.read_top_k = read_top_k or self.codec.top_k
        examples = self.manifest["data"]["examples"]
        self._codes, shard_of, row_of, lengths = [], [], [], []
        for index, shard in enumerate(self.manifest["shards"]):
            reader = safe_open(str(self.directory / shard["file"]), framework="numpy")
            shard_lengths = reader.get_tensor("lengths").astype(np.int64)
            self._codes.append(reader.get_slice("codes"))
            shard_of.append(np.full(len(shard_lengths), index))
            row_of.append(np.cumsum(shard_lengths) - shard_lengths)
            lengths.append(shard_lengths)
        self._shard_of, self._row_of, self._lengths = (np.concatenate(a) for a in (shard_of, row_of, lengths))
        if len(self._lengths) != examples:
            raise ConfigError(f"teacher.cache {str(self.directory)!r}: its shards hold {len(self._lengths)} "
                              f"examples, its manifest says {examples}; make it again")

    def check_binding(self, run: dict) -> None:
        """ConfigError when the run (its `cache_binding`) is not the one the cache was made for."""
        mismatches = differences(self.manifest, run)
        if mismatches:
            raise ConfigError(f"teacher.cache {str(self.directory)!r} was made for another run: "
                              f"{'; '.join(mismatches)}; make a cache for this config with distillm cache-teacher")

    def signal(self, example_ids: torch.Tensor, device: torch.device) -> TeacherTopK:
        """The top-k of every response position of the examples `example_ids` (b,), on the host
        (batches.HOST_KEYS), in batch order: (N, K) rows on `device`, N their response tokens."""
        parts = []
        for example in example_ids.tolist():
            start = int(self._row_of[example])
            parts.append(self._codes[int(self._shard_of[example])][start:start + int(self._lengths[example])])
        ids, logprobs = self.codec.decode(np.concatenate(parts), self.read_top_k)
        return TeacherTopK(ids.to(device=device, dtype=torch.int32, non_blocking=True),
                           logprobs.to(device, non_blocking=True))


def open_teacher_cache(config: Config, tokenizer, examples: list[EncodedExample], vocab_size: int) -> Optional[TeacherCache]:
    """The run's teacher.cache, checked against the run (tokenizer, encoded train `examples`, the
    shared `vocab_size`, ...); None when the run has none, or its loss has no KD term to read it."""
    if not config.teacher.cache or config.loss.kd_ratio == 0:
        return None
    from .models import model_dir

    cache = TeacherCache(config.teacher.cache, config.teacher.cache_top_k)
    codec = TopKCodec(vocab_size, min(cache.codec.top_k, vocab_size))  # any K serves a run
    cache.check_binding(cache_binding(config, model_dir(config.teacher.path), tokenizer, examples, codec,
                                      cache.manifest["teacher"]["output_rows"], cache.manifest["shard_examples"]))
    return cache
