"""A replay buffer of student-generated sequences that lives on the training device.

The storage is a FIFO ring of `capacity` right-padded sequences of at most `max_length` tokens,
each with its prompt length, total length, insertion step and a sampling priority. The work is
done by the compiled ops torch.ops.distillm.replay_push / replay_sample / replay_gather, which
on CUDA never wait for the host: the write position and fill count stay on the device, and the
random numbers come from this buffer's own torch.Generator (Philox on CUDA). The host keeps
its own count of the entries (it knows every pushed batch's size), so `len()` and the
"empty buffer" / "batch too large" errors cost no synchronization either.
"""

from __future__ import annotations

import math
from typing import Union

import torch

from . import _load  # noqa: F401  (registers torch.ops.distillm.*)
from .ops import IGNORE_INDEX

Device = Union[str, torch.device]
_push = torch.ops.distillm.replay_push.default
_sample = torch.ops.distillm.replay_sample.default
_gather = torch.ops.distillm.replay_gather.default


class ReplayBuffer:
    """FIFO replay buffer; `sample(k)` draws k distinct entries, uniformly until priorities change.

    Args:
        capacity: number of sequences kept; pushing more evicts the oldest.
        max_length: most tokens per sequence. Longer inputs are an error, not truncated: a
            silently cut response would lose its EOS and teach the student never to stop.
        device: where the storage lives (the training device).
        pad_token_id: fills input_ids past each sequence's end.
        seed: seeds the buffer's torch.Generator; equal seeds and pushes give equal samples.
        beta: sampling probability is proportional to priority ** beta (0: always uniform).
    """

    def __init__(self, capacity: int, max_length: int, device: Device = "cpu", pad_token_id: int = 0,
                 seed: int = 0, beta: float = 1.0):
        if capacity <= 0:
            raise ValueError(f"ReplayBuffer: capacity must be > 0, got {capacity}")
        if max_length <= 0:
            raise ValueError(f"ReplayBuffer: max_length must be > 0, got {max_length}")
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"ReplayBuffer: beta must be a finite number >= 0, got {beta}")
        self.capacity, self.max_length, self.pad_token_id, self.beta = capacity, max_length, pad_token_id, beta
        self.tokens = torch.full((capacity, max_length), pad_token_id, dtype=torch.long, device=device)
        self.device = self.tokens.device  # "cuda" resolved to "cuda:<current>"
        long = {"dtype": torch.long, "device": self.device}
        self.meta = torch.zeros((capacity, 3), **long)  # prompt length, length, insertion step
        self.priorities = torch.ones(capacity, dtype=torch.float32, device=self.device)
        self.cursor = torch.zeros(2, **long)  # next slot, number filled (read by the kernels)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._size, self._next = 0, 0  # host mirrors of the device cursor
        self._slot_ring = torch.arange(capacity, device=self.device).repeat(2)  # slot i at i and i + capacity

    def __len__(self) -> int:
        return self._size

    @property
    def is_full(self) -> bool:
        return self._size == self.capacity

    def push(self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor, lengths: torch.Tensor,
             step: int = 0) -> torch.Tensor:
        """Adds right-padded sequences: row i is a prompt of prompt_lengths[i] tokens followed by
        its response (EOS included), lengths[i] tokens in all. Oldest entries are evicted.
        Returns the slots written (for gather), one per row still held."""
        # The op checks dtypes, shapes, devices and (on CPU) the lengths, naming the argument.
        _push(self.tokens, self.meta, self.priorities, self.cursor, input_ids, prompt_lengths, lengths,
              step, self.pad_token_id)
        pushed = input_ids.shape[0]
        kept = min(pushed, self.capacity)
        first = (self._next + pushed - kept) % self.capacity
        slots = self._slot_ring[first:first + kept].clone()
        self._size, self._next = min(self._size + pushed, self.capacity), (self._next + pushed) % self.capacity
        return slots

    def sample(self, batch_size: int, trim: bool = False) -> dict[str, torch.Tensor]:
        """A training batch of `batch_size` distinct entries: input_ids, attention_mask and labels
        (batch_size, max_length) in the Hugging Face convention of dataset batches, and the
        `indices` (slots) drawn, for update_priorities.

        trim=True drops the columns past the longest sampled sequence, which saves model compute
        but reads one number back from the device (a host sync on CUDA)."""
        if self._size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty; push sequences first")
        if not 0 < batch_size <= self._size:
            raise ValueError(f"ReplayBuffer.sample: batch_size must be in [1, {self._size}] (the entries "
                             f"held), got {batch_size}")
        indices, input_ids, attention_mask, labels = _sample(
            self.tokens, self.meta, self.priorities, self.cursor, batch_size, self.beta, self.generator,
            self.pad_token_id, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "indices": indices}
        return self._trimmed(batch) if trim else batch

    def gather(self, indices: torch.Tensor, trim: bool = False) -> dict[str, torch.Tensor]:
        """The entries in slots `indices` as a training batch, like sample()'s."""
        self._check_input("indices", indices, 1)
        input_ids, attention_mask, labels = _gather(self.tokens, self.meta, indices, self.pad_token_id, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "indices": indices}
        return self._trimmed(batch) if trim else batch

    def _trimmed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        width = max(int(batch["attention_mask"].sum(1).max()), 1)
        return {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}

    def update_priorities(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Sets the priorities of slots `indices` (as returned by sample) to `values` (> 0)."""
        self._check_input("indices", indices, 1)
        if values.shape != indices.shape or not values.is_floating_point() or values.device != self.device:
            raise ValueError(f"ReplayBuffer.update_priorities: values must be a floating tensor of shape "
                             f"{tuple(indices.shape)} on {self.device}, got {values.dtype} {tuple(values.shape)} "
                             f"on {values.device}")
        valid = (values > 0) & torch.isfinite(values) & (indices >= 0) & (indices < self.capacity)
        if self.device.type == "cuda":
            torch._assert_async(valid.all(), "ReplayBuffer.update_priorities: bad slot or priority")
        elif not bool(valid.all()):
            raise ValueError(f"ReplayBuffer.update_priorities: priorities must be finite and > 0 and indices in "
                             f"[0, {self.capacity}), got values {values.tolist()} at {indices.tolist()}")
        self.priorities[indices] = values.float()

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: storage, cursor, generator state (on CPU)."""
        return {
            "capacity": self.capacity, "max_length": self.max_length, "size": self._size, "next": self._next,
            "tokens": self.tokens.cpu(), "meta": self.meta.cpu(), "priorities": self.priorities.cpu(),
            "cursor": self.cursor.cpu(), "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        shape = (state["capacity"], state["max_length"])
        if shape != (self.capacity, self.max_length):
            raise ValueError(f"ReplayBuffer.load_state_dict: the state is of a buffer with capacity {shape[0]} and "
                             f"max_length {shape[1]}; this one has {self.capacity} and {self.max_length}")
        for name in ("tokens", "meta", "priorities", "cursor"):
            getattr(self, name).copy_(state[name])
        self.generator.set_state(state["generator"])
        self._size, self._next = state["size"], state["next"]

    def _check_input(self, name: str, tensor: torch.Tensor, dim: int) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != dim or tensor.is_floating_point():
            got = f"{tensor.dtype} of shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"ReplayBuffer: {name} must be a {dim}-D integer tensor, got {got}")
        if tensor.device != self.device:
            raise ValueError(f"ReplayBuffer: {name} is on {tensor.device} but the buffer is on {self.device}")
