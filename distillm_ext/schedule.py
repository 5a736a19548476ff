"""DistiLLM's adaptive off-policy schedule: when to train on student-generated outputs (SGOs).

φ, the probability of an SGO step, starts at `init_threshold` and rises by 1/n_phi (to at most
1) each time the validation loss is worse than the reference by at least `loss_eps`; that loss
then becomes the reference. The first reference is, with `reference="before_training"` (the
default, as in the paper's code), the validation loss measured before training; with
`reference="first_validation"`, the first one during training (which then only records it, so
φ can first rise at the second).
Each step draws r ~ U(0, 1) and compares it with φ and the replay ratio s(t):

    s = φ·(1 − t/T)  (decreasing, default)   φ·0.5  (constant)   φ·t/T  (increasing)

    r < s, or r < φ with the buffer not yet full  -> "generate" (fresh SGOs, pushed to the buffer)
    r < φ                                          -> "replay"   (a batch from the buffer)
    otherwise                                      -> "dataset"
"""

from __future__ import annotations

import random
from typing import Optional

REPLAY_RATIOS = ("decreasing", "constant", "increasing")
FIRST_REFERENCES = ("before_training", "first_validation")


class AdaptiveSGOScheduler:
    def __init__(self, init_threshold: float = 0.0, loss_eps: float = 0.1, n_phi: int = 10,
                 replay_ratio: str = "decreasing", total_steps: int = 1, seed: int = 0,
                 reference: str = "before_training"):
        if not 0.0 <= init_threshold <= 1.0:
            raise ValueError(f"init_threshold must be in [0, 1], got {init_threshold}")
        if n_phi <= 0:
            raise ValueError(f"n_phi must be > 0, got {n_phi}")
        if replay_ratio not in REPLAY_RATIOS:
            raise ValueError(f"replay_ratio must be one of {', '.join(REPLAY_RATIOS)}, got {replay_ratio!r}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if reference not in FIRST_REFERENCES:
            raise ValueError(f"reference must be one of {', '.join(FIRST_REFERENCES)}, got {reference!r}")
        self.phi = init_threshold
        self.loss_eps, self.n_phi, self.replay_ratio, self.total_steps = loss_eps, n_phi, replay_ratio, total_steps
        self.first_reference = reference
        self.reference_loss: Optional[float] = None
        self._random = random.Random(seed)

    def update(self, val_loss: float, before_training: bool = False) -> bool:
        """Records a validation loss (`before_training`: the one measured before the first step);
        returns True when φ rose."""
        if before_training:
            if self.first_reference == "before_training":
                self.reference_loss = val_loss
            return False
        if self.reference_loss is None:
            self.reference_loss = val_loss
            return False
        if val_loss >= self.reference_loss + self.loss_eps:
            self.phi = min(self.phi + 1.0 / self.n_phi, 1.0)
            self.reference_loss = val_loss
            return True
        return False

    def replay_share(self, step: int) -> float:
        """s(t): the part of φ spent on fresh generation once the buffer is full."""
        progress = min(step / self.total_steps, 1.0)
        if self.replay_ratio == "decreasing":
            return self.phi * (1.0 - progress)
        if self.replay_ratio == "constant":
            return self.phi * 0.5
        return self.phi * progress

    def choose(self, step: int, buffer_full: bool) -> str:
        """"generate", "replay" or "dataset" for optimizer step `step` (one draw per call)."""
        r = self._random.random()
        if r < self.replay_share(step) or (r < self.phi and not buffer_full):
            return "generate"
        if r < self.phi:
            return "replay"
        return "dataset"

    def state_dict(self) -> dict:
        return {"phi": self.phi, "reference_loss": self.reference_loss, "random": self._random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.phi, self.reference_loss = state["phi"], state["reference_loss"]
        self._random.setstate(state["random"])
