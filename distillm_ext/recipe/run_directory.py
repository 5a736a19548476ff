"""The run directory's lifecycle: a fresh run never mixes with an older one, and a run that fails
to start leaves the directory as it found it.

`check_output_dir` runs before anything is loaded and changes nothing. `start_run` runs once the
models and data have loaded (the run is known to start): only then is an older run removed
(with --overwrite) and the new config.json written.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from .config import Config, ConfigError, save_config

# What a run writes; any of them present means the directory holds a run.
RUN_ENTRIES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "plots", "tensorboard")


def existing_run_entries(run_dir: Path) -> list[str]:
    return [name for name in RUN_ENTRIES if (run_dir / name).exists()]


def check_output_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """ConfigError if output.dir cannot hold this run; looks only."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output.dir and --overwrite replaces it: choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir {str(run_dir)!r} is a file, not a directory")
    found = existing_run_entries(run_dir)
    if found and not resume and not overwrite:
        raise ConfigError(
            f"output.dir {str(run_dir)!r} already holds a run ({', '.join(found)}): continue it with --resume, "
            f"replace it with --overwrite, or choose another output.dir")


def remove_tree(path: Path) -> None:
    """Deletes a directory so that no reader ever sees it half-deleted under its own name: it is
    first renamed out of the way (one atomic step), then removed."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    path.rename(trash)
    shutil.rmtree(trash)


def remove_leftovers(folder: Path) -> None:
    """Deletes what an earlier run killed mid-delete or mid-save left behind (dot-prefixed)."""
    if folder.is_dir():
        for path in folder.glob(".trash-*"):
            shutil.rmtree(path, ignore_errors=True)


def start_run(run_dir: Path, config: Config, overwrite: bool) -> None:
    """Makes the directory this run's: removes an older run's entries (with overwrite) and
    writes config.json. Main rank only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(run_dir)
    if overwrite:
        for name in existing_run_entries(run_dir):
            entry = run_dir / name
            if entry.is_dir():
                remove_tree(entry)
            else:
                entry.unlink()
    save_config(config, run_dir / "config.json")
