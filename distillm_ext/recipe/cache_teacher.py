"""`distillm cache-teacher`: runs the teacher once over the train split and stores its top-k
log-probabilities (at loss.temperature) at every response position, in the layout
teacher_cache.py describes, so that `distillm train teacher.cache=DIR` trains without it.

The split is cut into shards of SHARD_EXAMPLES examples. Rank r of N (torchrun) writes shards
r, r + N, ..., each written beside its name and renamed, so a shard file that exists is whole.
Run again with the same config, a killed run skips the shards it finished; with another config
it is an error (or, with --overwrite, a fresh start). Rank 0 writes manifest.json last, once
every shard exists: only then does the cache look complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from ..ops import IGNORE_INDEX
from .config import BUILTIN, Config, ConfigError
from .data import EncodedExample, collate_for_training, load_split, pad_token_id
from .distributed import barrier, init_runtime
from .forwards import FinalHiddenStates, check_head_input, fused_linear_unsupported
from .models import load_teacher, model_dir, teacher_dtype
from .teacher_cache import MANIFEST, PLAN, cache_binding, differences, read_json, shard_name, write_json
from .topk_codec import TopKCodec

log = logging.getLogger(__name__)

POSITIONS_PER_CHUNK = 1024  # rows of [positions, vocab] log-probabilities alive at a time
SHARD_EXAMPLES = 256  # examples per shard file: the most a killed run loses


def student_output_rows(config: Config, teacher_rows: int) -> int:
    """The output rows of the configured student, from its config alone (the built-in student
    is the teacher's, with fewer layers)."""
    if config.student.path == BUILTIN:
        return teacher_rows
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir(config.student.path)).vocab_size


class TopKTeacher:
    """The teacher's top-k at the response positions of a batch: from its final hidden states and
    output embedding, POSITIONS_PER_CHUNK positions at a time, where the model allows it (the
    fused-linear path's conditions), else from its logits."""

    def __init__(self, teacher, codec: TopKCodec, temperature: float, autocast):
        self.teacher, self.codec, self.temperature, self.autocast = teacher, codec, temperature, autocast
        self.states = FinalHiddenStates(teacher) if fused_linear_unsupported(teacher) is None else None
        self._checked = False

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, logprobs), both (N, K), N = the response tokens of the batch, row-major."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        kept = batch["labels"][:, 1:] != IGNORE_INDEX
        with self.autocast():
            if self.states is not None:
                hidden, last_logits = self.states(self.teacher, inputs)
                if not self._checked:
                    check_head_input(self.states, hidden, last_logits, "teacher")
                    self._checked = True
                rows, head = hidden[:, :-1][kept], self.states.head
            else:
                rows, head = self.teacher(**inputs).logits[:, :-1][kept], None
        ids, logprobs = [], []
        for chunk in rows.split(POSITIONS_PER_CHUNK):
            logits = chunk if head is None else head(chunk.to(head.weight.dtype))
            scaled = logits[:, :self.codec.vocab_size].float() / self.temperature
            # most likely first: the first k entries of the cache are the top-k (teacher.cache_top_k)
            top = torch.log_softmax(scaled, dim=-1).topk(self.codec.top_k, dim=-1, sorted=True)
            ids.append(top.indices)
            logprobs.append(top.values)
        return torch.cat(ids), torch.cat(logprobs)


def write_shard(path: Path, examples: list[EncodedExample], topk: TopKTeacher, batch_size: int, pad_id: int,
                device: torch.device, progress) -> None:
    """One shard file: the examples' codes, in order, and their lengths; renamed into place."""
    codes = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_for_training(chunk, pad_id).items()}
        ids, logprobs = topk(batch)
        codes.append(topk.codec.encode(ids, logprobs))
        progress.update(len(chunk))
    lengths = [len(example.response_ids) for example in examples]
    codes = np.concatenate(codes)
    if len(codes) != sum(lengths):  # the loss reads the cache by these counts
        raise RuntimeError(f"{path.name}: {len(codes)} positions for {sum(lengths)} response tokens")
    staging = path.with_name(f".{path.name}.tmp")
    save_file({"codes": codes, "lengths": np.asarray(lengths, dtype=np.int32)}, str(staging),
              metadata={"first_example": str(examples[0].index)})  # one key: safetensors orders keys at random
    os.chmod(staging, 0o666 & ~_umask())  # safetensors creates it 0600; a shared cache is read by others
    os.replace(staging, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prepare_directory(directory: Path, plan: dict, overwrite: bool) -> bool:
    """Checks cache.dir against the plan on every rank (the same files, so the same answer);
    True when the cache there is complete already. A different plan is an error without
    --overwrite."""
    if overwrite:
        return False
    existing = read_json(directory / PLAN)
    if existing is None:
        if directory.exists() and any(directory.iterdir()):
            raise ConfigError(f"cache.dir {str(directory)!r} is not empty and holds no teacher cache; choose "
                              f"another directory, or pass --overwrite to replace what is there")
        return False
    mismatches = differences(existing, plan)
    if mismatches:
        raise ConfigError(f"cache.dir {str(directory)!r} holds a cache for another config: {'; '.join(mismatches)}; "
                          f"pass --overwrite to replace it, or choose another cache.dir")
    return (directory / MANIFEST).is_file()


def cache_teacher(config: Config, overwrite: bool = False) -> dict:
    """Writes the cache of `config` into cache.dir (see the module docstring); returns its
    manifest."""
    runtime = init_runtime()
    directory = Path(config.cache.dir)
    teacher, tokenizer = load_teacher(config.teacher.path)
    bf16 = config.train.bf16 and runtime.device.type == "cuda"
    teacher.to(runtime.device, teacher_dtype(config, bf16))
    teacher_rows = teacher.get_output_embeddings().weight.shape[0]
    examples = load_split(config.data, "train", tokenizer)
    vocab_size = min(teacher_rows, student_output_rows(config, teacher_rows))
    if config.cache.top_k > vocab_size:
        raise ConfigError(f"config key 'cache.top_k' must be <= the vocabulary ({vocab_size}), got {config.cache.top_k}")
    codec = TopKCodec(vocab_size, config.cache.top_k)
    plan = cache_binding(config, model_dir(config.teacher.path), tokenizer, examples, codec, teacher_rows,
                         SHARD_EXAMPLES)
    complete = prepare_directory(directory, plan, overwrite)
    barrier()  # every rank has read the old plan before rank 0 replaces it
    if complete:
        log.info("%s: complete already (%s)", directory, MANIFEST)
        return read_json(directory / MANIFEST)
    if runtime.is_main:
        if overwrite and directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / PLAN, plan)
    barrier()

    size = plan["shard_examples"]
    shards = range(math.ceil(len(examples) / size))
    todo = [s for s in shards[runtime.rank::runtime.world_size] if not (directory / shard_name(s)).is_file()]
    done = len(shards[runtime.rank::runtime.world_size]) - len(todo)
    if done and runtime.is_main:
        log.info("resuming: %d of this rank's %d shards are written already", done, done + len(todo))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    topk = TopKTeacher(teacher, codec, config.loss.temperature, autocast)
    started = time.perf_counter()
    pending = sum(len(examples[s * size:(s + 1) * size]) for s in todo)
    with tqdm(total=pending, desc=f"cache-teacher (rank {runtime.rank} of {runtime.world_size})", unit="example",
              dynamic_ncols=True, disable=not runtime.is_main) as progress:
        for shard in todo:
            write_shard(directory / shard_name(shard), examples[shard * size:(shard + 1) * size],
                        topk, config.cache.batch_size, pad_token_id(tokenizer), runtime.device, progress)
    barrier()
    if runtime.is_main:
        write_manifest(directory, plan, shards, time.perf_counter() - started)
    barrier()
    return read_json(directory / MANIFEST)


def write_manifest(directory: Path, plan: dict, shards: range, seconds: float) -> None:
    """The plan, the shard list and the totals; written once every shard exists."""
    from safetensors import safe_open

    entries, tokens, size = [], 0, 0
    for shard in shards:
        path = directory / shard_name(shard)
        if not path.is_file():
            raise RuntimeError(f"{path} is missing after every rank finished")
        with safe_open(str(path), framework="numpy") as reader:
            count = int(reader.get_tensor("lengths").sum())
        entries.append({"file": path.name, "tokens": count})
        tokens, size = tokens + count, size + path.stat().st_size
    manifest = {**plan, "shards": entries, "tokens": tokens, "bytes": size,
                "bytes_per_token": round(size / max(tokens, 1), 2), "seconds_last_run": round(seconds, 1)}
    write_json(directory / MANIFEST, manifest)
    log.info("teacher cache complete: %d examples, %d tokens, %.1f B/token (top-%d), in %s", plan["data"]["examples"],
             tokens, manifest["bytes_per_token"], plan["codec"]["top_k"], directory)
