"""Student-generated outputs (SGOs): generating them, packing them like dataset examples, and the
batch source that picks, each optimizer step, between the dataset, fresh SGOs and replayed ones.

Every step still takes the dataset's next batch, so the data order and epochs do not depend on
the mode: a "dataset" step trains on it, a "generate" step keeps only its prompts and trains on
the student's answers to them (pushed into the replay buffer too), a "replay" step trains on a
batch sampled from the buffer. Fresh and replayed SGOs both come out of the buffer's gather,
so their labels are built by the same code, exactly like dataset labels (prompt and padding
-100, the response with its EOS kept): tests compare the two.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from typing import Callable, Optional

import torch
from .batches import DatasetBatches
from .config import SGOConfig
from .data import collate_for_training, collate_prompts
from .generation import generate_with_settings, generation_config
from ..replay import ReplayBuffer
from ..schedule import AdaptiveSGOScheduler

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def pack_generated(sequences: torch.Tensor, prompt_mask: torch.Tensor, eos_token_id: int,
                   pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turns `generate` output into right-padded sequences for ReplayBuffer.push.

    sequences: (B, P + N), the left-padded prompts (P columns, `prompt_mask` 1 on real tokens)
    followed by N generated tokens. The response runs to its first EOS, included, or to the
    end when there is none. Returns (input_ids (B, P + N), prompt_lengths, lengths), without a
    host sync."""
    width = sequences.shape[1]
    prompt_width = prompt_mask.shape[1]
    prompt_lengths = prompt_mask.sum(1)
    is_eos = sequences[:, prompt_width:] == eos_token_id
    generated = width - prompt_width
    response_lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, generated)
    lengths = prompt_lengths + response_lengths
    columns = torch.arange(width, device=sequences.device)
    shift = (prompt_width - prompt_lengths).unsqueeze(1)  # left padding of each row
    packed = sequences.gather(1, (columns + shift).clamp(max=width - 1))
    packed = torch.where(columns < lengths.unsqueeze(1), packed, pad_token_id)
    return packed, prompt_lengths, lengths


class SGOBatches:
    """The batch source of sgo.mode "on_policy" and "adaptive" (see the module docstring).

    on_policy: each step generates with probability sgo.on_policy_ratio, else uses the dataset.
    adaptive: AdaptiveSGOScheduler decides; `on_validation(loss)` feeds it the validation losses.
    Decisions use a seeded stream shared by all ranks, so under DDP every rank takes the same
    kind of step; each rank keeps its own buffer of its own SGOs.
    """

    def __init__(self, dataset: DatasetBatches, student, sgo: SGOConfig, *, max_length: int,
                 max_prompt_length: int, pad_token_id: int, eos_token_id: int, vocab_size: int,
                 total_steps: int, seed: int, rank: int, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.dataset, self.student, self.sgo, self.device, self.autocast = dataset, student, sgo, device, autocast
        self.pad_token_id, self.eos_token_id, self.vocab_size = pad_token_id, eos_token_id, vocab_size
        self.buffer = ReplayBuffer(sgo.buffer_size, max_length, device=device, pad_token_id=pad_token_id,
                                   seed=seed + rank)
        self.scheduler = None
        if sgo.mode == "adaptive":
            self.scheduler = AdaptiveSGOScheduler(sgo.init_threshold, sgo.loss_eps, sgo.n_phi, sgo.replay_ratio,
                                                  total_steps, seed, reference=sgo.first_reference)
        self._random = random.Random(seed)  # on_policy's draws
        self.generation = generation_config(
            max_new_tokens=max_length - max_prompt_length, do_sample=True, temperature=sgo.temperature,
            top_p=sgo.top_p, top_k=sgo.top_k, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        self.name = "dataset"  # the source of the latest step
        self._interval = Counter()
        self._generation_s = 0.0

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset.steps_per_epoch

    @property
    def phi(self) -> float:
        return self.scheduler.phi if self.scheduler else self.sgo.on_policy_ratio

    def choose(self, step: int) -> str:
        if self.scheduler is not None:
            return self.scheduler.choose(step, self.buffer.is_full)
        return "generate" if self._random.random() < self.sgo.on_policy_ratio else "dataset"

    def next_batch(self, step: int) -> list[dict[str, torch.Tensor]]:
        micro_batches = self.dataset.next_examples()
        self.name = self.choose(step)
        self._interval[self.name] += 1
        if self.name == "dataset":
            return [collate_for_training(examples, self.pad_token_id) for examples in micro_batches]
        if self.name == "replay":
            return [self._training_batch(self.buffer.sample(len(examples), trim=True)) for examples in micro_batches]
        batches = []
        for examples in micro_batches:
            slots = self.buffer.push(*self.generate(examples), step=step)
            batches.append(self._training_batch(self.buffer.gather(slots, trim=True)))
        return batches

    @torch.no_grad()
    def generate(self, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's sampled answers to the examples' prompts, packed for the buffer."""
        started = time.perf_counter()
        prompts = {k: v.to(self.device) for k, v in collate_prompts(examples, self.pad_token_id).items()}
        was_training = self.student.training
        self.student.eval()  # no dropout while sampling; the KV cache is on by default
        try:
            with self.autocast():
                sequences = generate_with_settings(self.student, prompts, self.generation, self.vocab_size)
        finally:
            self.student.train(was_training)
        packed = pack_generated(sequences, prompts["attention_mask"], self.eos_token_id, self.pad_token_id)
        self._generation_s += time.perf_counter() - started  # generate() waits for the device itself
        return packed

    @staticmethod
    def _training_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: batch[key] for key in BATCH_KEYS}

    def on_validation(self, val_loss: float, before_training: bool = False) -> Optional[str]:
        """Feeds a validation loss to the adaptive schedule; says so when φ rose."""
        if self.scheduler and self.scheduler.update(val_loss, before_training):
            return f"validation loss rose: phi is now {self.phi:.2f}"
        return None

    def take_stats(self) -> dict:
        """Steps per source and generation seconds since the last call, plus φ and buffer size."""
        stats = {"sources": dict(self._interval), "time": {"generate": round(self._generation_s, 4)},
                 "phi": self.phi, "buffer_size": len(self.buffer)}
        self._interval, self._generation_s = Counter(), 0.0
        return stats

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict(), "buffer": self.buffer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "random": self._random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.buffer.load_state_dict(state["buffer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        self._random.setstate(state["random"])


def make_batch_source(dataset: DatasetBatches, sgo: SGOConfig, student, **options):
    """The run's batch source: the dataset itself with sgo.mode off, else SGOBatches around it
    (`options`: SGOBatches' keyword arguments)."""
    return dataset if sgo.mode == "off" else SGOBatches(dataset, student, sgo, **options)
