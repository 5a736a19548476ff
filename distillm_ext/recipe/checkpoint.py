"""Checkpoints, written atomically; the Checkpointer saves and restores them for any parallel plan.

Layout: `<run>/checkpoints/step-000050/{model/, checkpoint.json, trainer_state.pt, rank*.pt}`,
and `sharded/` (torch.distributed.checkpoint) in FSDP runs.

A checkpoint is assembled in a temporary directory beside its final place, flushed to disk, and
renamed into it only when complete; an old one is renamed out of the `step-*` namespace before it
is deleted. So a run killed at any moment (SIGKILL included) leaves complete checkpoints only, and
`checkpoints()` lists only complete ones. Each rank saves its own state to rank<r>.pt (RNG streams,
which differ per rank, and the state of the trainer's per-rank objects, such as its replay buffer);
rank 0 saves the rest. checkpoint.json holds what readers need without unpickling the trainer
state (`distillm eval`: the vocabulary size the run was distilled on).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, ConfigError
from .distributed import Runtime, barrier, rank
from .run_directory import remove_leftovers, remove_tree

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"
SHARDED_DIR = "sharded"  # train.parallel=fsdp: model and optimizer shards (DCP)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_complete(checkpoint: Path) -> bool:
    """Everything a checkpoint writes is there; model/ is a whole model or a LoRA adapter."""
    model = checkpoint / "model"
    return (all((checkpoint / name).is_file() for name in (STATE_FILE, INFO_FILE, "rank0.pt"))
            and any((model / name).is_file() for name in ("config.json", "adapter_config.json")))


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = run_dir / "checkpoints"
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and is_complete(p)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def read_info(checkpoint: Path) -> dict:
    return json.loads((checkpoint / INFO_FILE).read_text())


def _fsync(path: Path) -> None:
    """Flushes a file's contents, or a directory's entries (which makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flushes every file and directory under root, deepest first, then root itself."""
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)) + [root]:
        _fsync(path)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict, rank_state: dict,
                    info: dict, keep: int, model_state: Optional[dict] = None,
                    sharded_state: Optional[dict] = None) -> Path:
    """Writes checkpoint `step` atomically (all ranks call this); keeps the `keep` newest.

    `model_state`: the state dict model/ is written from (default: the model's own). A sharded
    (FSDP) run passes its gathered state there, and its sharded model and optimizer state as
    `sharded_state`, which every rank writes with torch.distributed.checkpoint to sharded/.
    """
    folder = run_dir / "checkpoints"
    final = folder / f"step-{step:06d}"
    staging = folder / f".trash-staging-{step:06d}"  # a leftover of a killed save is deleted as trash
    if rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        remove_leftovers(folder)
        staging.mkdir()
        model.save_pretrained(staging / "model", state_dict=model_state)  # safetensors
        tokenizer.save_pretrained(staging / "model")
        torch.save(trainer_state, staging / STATE_FILE)
        (staging / INFO_FILE).write_text(json.dumps({"step": step, **info}, indent=2) + "\n")
    barrier()
    torch.save({"rng": rng_state(), **rank_state}, staging / f"rank{rank()}.pt")
    if sharded_state is not None:
        import torch.distributed.checkpoint as dcp

        dcp.save(sharded_state, checkpoint_id=str(staging / SHARDED_DIR))
    barrier()
    if rank() == 0:
        _fsync_tree(staging)  # the contents are on disk before the rename makes them visible
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a checkpoint)
            replaced = final.with_name(f".trash-{final.name}")
            os.replace(final, replaced)
            os.replace(staging, final)
            remove_leftovers(folder)
        else:
            os.replace(staging, final)
        _fsync(folder)
        for old in checkpoints(run_dir)[:-keep]:
            remove_tree(old)
    barrier()
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    """Rank 0's trainer state (step, history, config, ...)."""
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)


def load_rank_state(checkpoint: Path) -> dict:
    """This rank's own state (rng, what the trainer passed as rank_state)."""
    return torch.load(checkpoint / f"rank{rank()}.pt", map_location="cpu", weights_only=False)


class Checkpointer:
    """Saves a run's checkpoints and restores one on --resume, whatever the parallel plan: the plan
    says what the model and optimizer state are, this class writes and reads them with the
    trainer's state (rank 0) and each rank's own (`rank_objects`, and the RNG streams)."""

    # Keys whose change would make a checkpoint's state mean something else (the batch source's
    # kind, the replay buffer's shape): --resume refuses them rather than misreading the state.
    RESUME_FIXED_KEYS = ("sgo.mode", "sgo.buffer_size", "data.max_length")

    def __init__(self, run_dir: Path, plan, runtime: Runtime, keep: int):
        self.run_dir, self.plan, self.runtime, self.keep = run_dir, plan, runtime, keep

    def save(self, step: int, student, tokenizer, optimizer, trainer_state: dict, rank_objects: dict,
             info: dict) -> Path:
        """Checkpoint `step` (all ranks call this). `rank_objects`: {name: object with
        state_dict()} saved per rank; `info` goes to checkpoint.json."""
        saved = self.plan.checkpoint_state(optimizer)
        return save_checkpoint(
            self.run_dir, step, student, tokenizer, {**trainer_state, "optimizer": saved.optimizer_state},
            {name: value.state_dict() for name, value in rank_objects.items()},
            {**info, "world_size": self.runtime.world_size}, self.keep, model_state=saved.model_state,
            sharded_state=saved.sharded)

    def restore(self, checkpoint: Path, config: Config, optimizer, rank_objects: dict) -> dict:
        """Loads `checkpoint` into the optimizer (and, for a sharded plan, the student) and into
        `rank_objects`, restores this rank's RNG streams last, and returns the trainer state."""
        state = load_trainer_state(checkpoint)
        self._check_resumable(checkpoint, state["config"], config)  # before reading this rank's own file
        rank_state = load_rank_state(checkpoint)
        self.plan.load_checkpoint(optimizer, checkpoint, state["optimizer"])
        for name, value in rank_objects.items():
            value.load_state_dict(rank_state[name])
        set_rng_state(rank_state["rng"])
        return state

    def _check_resumable(self, checkpoint: Path, saved: dict, config: Config) -> None:
        world_size = read_info(checkpoint)["world_size"]
        if world_size != self.runtime.world_size:
            raise ConfigError(
                f"--resume: {checkpoint} was saved by {world_size} process(es), and this run has "
                f"{self.runtime.world_size}; resume with torchrun --nproc_per_node {world_size} "
                f"(x nodes) so that every rank finds its own state")
        for key in self.RESUME_FIXED_KEYS:
            section, name = key.split(".")
            before, now = saved[section][name], getattr(getattr(config, section), name)
            if before != now:
                raise ConfigError(f"--resume: {key} was {before!r} in {checkpoint}, and is {now!r} now; "
                                  f"resume with {key}={before}, or start a new run")
