"""A run's metrics.jsonl: one JSON object per line, {"kind": "train" | "eval", "step": ..., ...}.

This module alone writes, truncates and reads it. With output.tensorboard, every numeric field
of a line also goes to TensorBoard (`tensorboard --logdir RUN_DIR/tensorboard`) as
`<kind>/<field>` at its step; the JSONL stays the record.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE_NAME = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    """Every line of the run's metrics.jsonl, oldest first; [] when there is none yet."""
    path = Path(run_dir) / FILE_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric fields of a line, nested dicts flattened with '/': {"time": {"loss": 0.1}} ->
    {"time/loss": 0.1}. Booleans, strings and None are left out."""
    found = {}
    for key, value in record.items():
        if isinstance(value, dict):
            found.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            found[prefix + key] = float(value)
    return found


class MetricsLog:
    """Appends lines to RUN_DIR/metrics.jsonl (and mirrors them to TensorBoard, if asked)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = Path(run_dir) / FILE_NAME
        self._board = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._board = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self._board is not None:
            for name, value in scalars(record).items():
                self._board.add_scalar(f"{record['kind']}/{name}", value, record["step"])
            self._board.flush()

    def truncate_after(self, step: int) -> None:
        """Drops the lines of steps after `step`: what an interrupted run logged after the
        checkpoint it resumes from."""
        kept = [record for record in read_metrics(self.path.parent) if record["step"] <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
