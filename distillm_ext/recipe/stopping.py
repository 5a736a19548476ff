"""Stopping a run early on request: Ctrl-C or SIGTERM finish the current step, save a checkpoint
and end the run with RunStopped; a second Ctrl-C stops at once."""

from __future__ import annotations

import logging
import signal

import torch

from .distributed import all_reduce_sum, is_distributed

log = logging.getLogger(__name__)


class RunStopped(Exception):
    """The run stopped early on request, after saving a checkpoint; --resume continues it."""


class StopSignals:
    """While entered, SIGINT and SIGTERM set a flag instead of raising; `requested()` says
    whether any rank got one, so that every rank stops after the same step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device: torch.device, announce: bool):
        self.device, self.announce = device, announce
        self._requested = False
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        self._requested = True
        signal.signal(signum, signal.default_int_handler)  # a second Ctrl-C stops at once
        if self.announce:
            log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to abort)")

    def requested(self) -> bool:
        if not is_distributed():
            return self._requested
        flag = torch.tensor([float(self._requested)], device=self.device)
        return bool(all_reduce_sum(flag).item() > 0)
