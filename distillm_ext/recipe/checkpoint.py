"""Atomic checkpoints: `<run>/checkpoints/step-000050/{model/, trainer_state.pt, rank*.pt}`.

A checkpoint is assembled in a temporary directory beside its final place and renamed into it
only when complete, so a run killed at any moment (SIGKILL included) leaves either the previous
checkpoint or the new one, never a half-written one. Each rank saves its own state to rank<r>.pt
(RNG streams, which differ per rank, and what the trainer passes as `rank_state`, such as its
replay buffer); rank 0 saves the rest.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .distributed import barrier, rank

_NAME = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


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


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = run_dir / "checkpoints"
    found = [p for p in folder.iterdir() if _NAME.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict, rank_state: dict,
                    keep: int) -> Path:
    """Writes checkpoint `step` atomically (all ranks call this); keeps the `keep` newest."""
    folder = run_dir / "checkpoints"
    final = folder / f"step-{step:06d}"
    staging = folder / f".tmp-step-{step:06d}"
    if rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        staging.mkdir()
        model.save_pretrained(staging / "model")  # safetensors
        tokenizer.save_pretrained(staging / "model")
        torch.save(trainer_state, staging / STATE_FILE)
    barrier()
    torch.save({"rng": rng_state(), **rank_state}, staging / f"rank{rank()}.pt")
    barrier()
    if rank() == 0:
        for path in staging.iterdir():  # flush file contents before the rename makes them visible
            if path.is_file():
                with open(path, "rb+") as file:
                    os.fsync(file.fileno())
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a checkpoint)
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    """Rank 0's trainer state, with this rank's own state (rng, ...) under "rank"."""
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    rank_file = checkpoint / f"rank{rank()}.pt"
    if not rank_file.is_file():
        raise RuntimeError(f"{checkpoint} has no state for rank {rank()}: resume with the world size it was saved with")
    state["rank"] = torch.load(rank_file, map_location="cpu", weights_only=False)
    return state
