"""Where training batches come from. The trainer asks a batch source for one optimizer step's
micro-batches; the dataset is one source, and the off-policy sources (replayed and freshly
generated student outputs) plug in beside it.

Every source implements BatchSource, and the trainer knows no other kind: it never asks which
source it has. sgo.SGOBatches is the other source.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from .config import ConfigError
from .data import EncodedExample, collate_for_training


# Indices into host-side data (a teacher cache reads its rows by them): they stay on the host, where
# reading them back from an accelerator would stall the step.
HOST_KEYS = frozenset({"example_ids"})


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (asynchronously), its HOST_KEYS left where they are."""
    return {k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in batch.items()}


class BatchSource(Protocol):
    """What the trainer asks of a batch source."""

    name: str  # where the latest batch came from, for metrics.jsonl
    epoch: int

    @property
    def steps_per_epoch(self) -> int: ...

    def next_batch(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of one optimizer step (`grad_accum` of them), each a dict of
        (b, T) int64 `input_ids`, `attention_mask` and `labels` (Hugging Face convention,
        -100 on prompt and padding)."""

    def on_validation(self, val_loss: float, before_training: bool = False) -> Optional[str]:
        """Hears a validation loss (`before_training`: the one measured before the first step);
        returns what that changed, for the log, or None."""

    def take_stats(self) -> dict:
        """Metrics since the last call, merged into the next metrics.jsonl line ("time" holds
        seconds by section)."""

    def state_dict(self) -> dict:
        """The position, so that --resume continues with exactly the batch an uninterrupted run
        would have seen."""

    def load_state_dict(self, state: dict) -> None: ...


class DatasetBatches:
    """Shuffled passes over the training examples, one global batch per optimizer step.

    The order depends only on (seed, epoch), and each rank takes a contiguous slice of every
    global batch, so N ranks see exactly the examples one process would (the last incomplete
    batch of an epoch is skipped).
    """

    name = "dataset"

    def __init__(self, examples: list[EncodedExample], global_batch: int, grad_accum: int, pad_id: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % (world_size * grad_accum):
            raise ConfigError(
                f"train.batch_size={global_batch} must be a multiple of world size x train.grad_accum "
                f"= {world_size} x {grad_accum}"
            )
        if len(examples) < global_batch:
            raise ConfigError(f"train.batch_size={global_batch} is larger than the {len(examples)} training examples")
        self.examples, self.global_batch, self.grad_accum, self.pad_id = examples, global_batch, grad_accum, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def next_examples(self) -> list[list[EncodedExample]]:
        """This rank's examples of the next global batch, one list per micro-batch."""
        if self.position + self.global_batch > len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        indices = self._order[self.position:self.position + self.global_batch]
        self.position += self.global_batch
        per_rank = self.global_batch // self.world_size
        mine = indices[self.rank * per_rank:(self.rank + 1) * per_rank]
        per_micro = per_rank // self.grad_accum
        return [[self.examples[i] for i in mine[start:start + per_micro]] for start in range(0, per_rank, per_micro)]

    def next_batch(self, step: int = 0) -> list[dict[str, torch.Tensor]]:
        return [collate_for_training(examples, self.pad_id) for examples in self.next_examples()]

    def on_validation(self, val_loss: float, before_training: bool = False) -> Optional[str]:
        return None

    def take_stats(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()
