"""A step's bookkeeping: its statistics by name, the time of each section, the throughput clock."""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import torch

from .distributed import all_reduce_sum


class StepStats(NamedTuple):
    """One optimizer step's sums on this rank, as 0-d device tensors (no host sync to build them)."""

    kd: torch.Tensor               # KD loss summed over response tokens
    ce: torch.Tensor               # cross-entropy summed over response tokens (0 when loss.kd_ratio = 1)
    response_tokens: torch.Tensor  # tokens the loss is taken over
    tokens: torch.Tensor           # every non-padding token, for throughput
    skipped: torch.Tensor          # 1 when the update was skipped (non-finite gradient norm)

    @classmethod
    def reduce(cls, steps: list["StepStats"]) -> "StepStats":
        """The steps' statistics summed over ranks in one all-reduce; each field a (steps,) CPU
        tensor (`skipped` counts the ranks that skipped, which is all of them or none)."""
        table = torch.stack([torch.stack([value.float() for value in step]) for step in steps])
        return cls(*all_reduce_sum(table).cpu().unbind(1))


class StepResult(NamedTuple):
    """What a training step returns: its statistics, and what is logged of an interval's last step."""

    stats: StepStats          # summed over ranks when logged
    grad_norm: torch.Tensor   # the global norm, the same on every rank
    lr: float                 # the learning rate the step used


class StepTimer:
    """Seconds per named section of a step; CUDA events on GPU so timing adds no host sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[str, object, object]] = []
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            start = time.perf_counter()
            yield
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def collect(self) -> dict[str, float]:
        """Totals since the last collect (synchronizes on GPU: call it when logging)."""
        for name, start, end in self._events:
            end.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        totals, self._events, self.totals = self.totals, [], {}
        return totals


class ThroughputClock:
    """Training seconds since the last lap, not counting the time spent `paused()` (evaluation,
    checkpoints), so tokens/s describes training alone."""

    def __init__(self):
        self._started = time.perf_counter()
        self._paused_s = 0.0

    @contextlib.contextmanager
    def paused(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self._paused_s += time.perf_counter() - started

    def lap(self) -> float:
        """Training seconds since the last lap (or the start); starts the next lap."""
        now = time.perf_counter()
        elapsed = now - self._started - self._paused_s
        self._started, self._paused_s = now, 0.0
        return elapsed
