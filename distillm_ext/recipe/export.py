"""`distillm export RUN_DIR OUT_DIR`: the run's newest checkpoint as one plain `save_pretrained`
directory with its tokenizer, which `AutoModelForCausalLM.from_pretrained` loads with neither
peft nor this package. A LoRA run's adapter is merged into its base; a full run's model is
copied as it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .checkpoint import latest_checkpoint
from .config import ConfigError, load_config
from .lora import is_adapter
from .models import load_trained

log = logging.getLogger(__name__)


def export(run_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Writes the newest checkpoint of `run_dir` to `out_dir` (written beside it and renamed, so
    an interrupted export leaves nothing that looks finished); returns the checkpoint."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"export: {run_dir} has no complete checkpoint (is it a run directory?)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError(f"export: {out_dir} exists and is not empty; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model_dir = checkpoint / "model"
        if is_adapter(model_dir):
            model, tokenizer = load_trained(model_dir, load_config(run_dir / "config.json"))
            model.merge_and_unload().save_pretrained(staging / "model")
            tokenizer.save_pretrained(staging / "model")
        else:
            shutil.copytree(model_dir, staging / "model")
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(staging / "model", out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s to %s", checkpoint, out_dir)
    return checkpoint
