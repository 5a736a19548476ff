"""The run configuration: typed dataclass sections, a YAML/JSON file, and dotted overrides.

`load_config(path, ["train.max_steps=20", "loss.type=srkl"])` starts from the built-in default
(SmolLM2-135M-Instruct teacher, a pruned copy of it as student, WordNet definitions), applies
the file, then the overrides. Unknown keys and values of the wrong type are errors that name
the key and what was expected, so a typo never trains silently with a default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..losses import LOSSES
from ..schedule import FIRST_REFERENCES, REPLAY_RATIOS
from .config_parsing import ConfigError, apply_dict, apply_overrides, describe_options, read_config_file

BUILTIN = "builtin"
BUILTIN_UNTUNED = "builtin-untuned"  # the built-in teacher before it was tuned on the task
NO_TEACHER = "none"
# What `distillm sft` sets over the user's config: plain supervised fine-tuning of student.path,
# cross-entropy on the responses, no teacher.
SFT_SETTINGS = [f"teacher.path={NO_TEACHER}", "loss.kd_ratio=0", "eval.teacher=false"]

# The allowed values of a key are its type: --help, the checks and the code read this one list.
# (The library's own lists, for loss types and the adaptive schedule, are used as they are.)
LossType = Literal[tuple(LOSSES)]
LrSchedule = Literal["cosine", "linear", "constant"]
NonFinitePolicy = Literal["stop", "skip"]
ParallelPlanName = Literal["ddp", "fsdp"]
TeacherDType = Literal["float32", "bfloat16", "float16"]
SGOMode = Literal["off", "on_policy", "adaptive"]
ReplayRatio = Literal[REPLAY_RATIOS]
FirstReference = Literal[FIRST_REFERENCES]


def opt(default, help: str):
    """A config field with its `--help` text; lists get a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TeacherConfig:
    path: str = opt(BUILTIN, 'local Hugging Face causal-LM directory; "builtin" (SmolLM2-135M-Instruct tuned on the '
                             'built-in data, made on first use), "builtin-untuned" (before tuning), or "none" (no '
                             'teacher: distillm sft)')
    dtype: Optional[TeacherDType] = opt(None, "the teacher's weights (none: bfloat16 with train.bf16 on CUDA, else "
                                              "float32); the loss is computed in float32 either way")
    cache: str = opt("", "a top-k cache of this teacher written by `distillm cache-teacher`: dataset batches read "
                         "the teacher from it, and with sgo.mode=off no teacher model is loaded at all")
    cache_top_k: int = opt(0, "read only the cache's first (most likely) k ids per position, 0 = all it has: one "
                              "cache at a large k serves runs at every smaller k")


@dataclass
class StudentConfig:
    path: str = opt(BUILTIN, 'local causal-LM directory, "builtin" (the teacher with fewer layers) or '
                             '"builtin-untuned"')
    # First and last layers kept, middle ones removed: this model family degrades least that way.
    keep_layers: list[int] = opt(
        [0, 1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29], "teacher layers the built-in student keeps (comma-separated)"
    )
    lora_r: int = opt(0, "LoRA rank (peft); 0 = full training. With LoRA only the adapter trains, and checkpoints "
                         "hold the adapter alone (distillm export merges it)")
    lora_alpha: Optional[float] = opt(None, "LoRA scaling numerator (none = 2 x lora_r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA path, in [0, 1)")
    lora_targets: list[str] = opt(["all-linear"], "all-linear (every Linear of the decoder blocks, not the output "
                                                  "embedding), or Linear layer names (comma-separated: q_proj,v_proj)")


@dataclass
class DataConfig:
    train: str = opt(BUILTIN, 'JSON/JSONL(.gz)/arrow file, a `datasets` folder, or "builtin" (WordNet definitions)')
    validation: str = opt(BUILTIN, "validation split, same forms as data.train")
    test: str = opt(BUILTIN, "test split, same forms as data.train")
    prompt_field: str = opt("prompt", "name of the prompt field in each example")
    response_field: str = opt("response", "name of the response field in each example")
    template: str = opt(
        "chat", '"chat" (the tokenizer\'s chat template) or a format string with {prompt}, e.g. "Q: {prompt}\\nA: "'
    )
    system_prompt: Optional[str] = opt(
        "", 'the "chat" template\'s system message: "" = an empty one, none = the template\'s own default (SmolLM2\'s '
            'default persona is 20 of the 37 prompt tokens on the built-in data)')
    max_length: int = opt(96, "prompt + response tokens; longer responses are truncated")
    max_prompt_length: int = opt(64, "longer prompts are dropped, with a count in the log")


@dataclass
class LossConfig:
    type: LossType = opt("skl", "the divergence (sfkl is skl)")
    alpha: float = opt(0.1, "skew of skl/srkl, in [0, 1)")
    beta: float = opt(0.5, "weight of jsd, in (0, 1)")
    temperature: float = opt(1.0, "softmax temperature of both distributions")
    kd_ratio: float = opt(1.0, "loss = kd_ratio * KD + (1 - kd_ratio) * cross-entropy on the responses (0: no "
                               "teacher is loaded, as in `distillm sft`)")
    fused_linear: bool = opt(True, "compute the loss from the final hidden states and output embeddings, a chunk "
                                   "of response tokens at a time, never building [tokens, vocab] logits (off, with "
                                   "a warning, for models whose logits are more than hidden @ W.T + b)")


@dataclass
class TrainConfig:
    batch_size: int = opt(8, "global batch (examples per optimizer step), split across ranks and micro-batches")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_steps: int = opt(120, "optimizer steps; 0 = run train.epochs epochs")
    epochs: int = opt(1, "epochs, when train.max_steps is 0")
    lr: float = opt(2e-4, "peak AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(10, "linear warm-up steps")
    schedule: LrSchedule = opt("cosine", "learning-rate decay after warm-up")
    max_grad_norm: float = opt(1.0, "gradient-norm clipping; 0 disables it")
    seed: int = opt(1234, "seed of weights init, data order and sampling")
    nonfinite: NonFinitePolicy = opt("stop", "on a non-finite gradient norm: stop (the weights are never updated "
                                             "with it) or skip (drop that step's update and count it, as "
                                             "mixed-precision loss scaling does)")
    bf16: bool = opt(True, "bf16 autocast and a bf16 teacher (CUDA only)")
    activation_checkpointing: bool = opt(False, "recompute each student decoder layer in the backward instead of "
                                                "keeping its activations (non-reentrant; ddp and fsdp)")
    parallel: ParallelPlanName = opt("ddp", "over torchrun's ranks: ddp (whole models on every rank) or fsdp "
                                            "(FSDP2: student and teacher sharded per decoder layer; sharded "
                                            "checkpoints)")


@dataclass
class EvalConfig:
    interval: int = opt(0, "optimizer steps between evaluations; 0 = only before and after training")
    num_examples: int = opt(100, "validation examples scored (0 = all)")
    batch_size: int = opt(32, "examples per evaluation batch")
    max_new_tokens: int = opt(32, "generated tokens per answer, for ROUGE-L")
    do_sample: bool = opt(False, "sample answers instead of greedy decoding")
    temperature: float = opt(1.0, "sampling temperature (do_sample only)")
    top_p: float = opt(1.0, "nucleus sampling (do_sample only)")
    top_k: int = opt(0, "top-k sampling, 0 = off (do_sample only)")
    teacher: bool = opt(True, "also score the teacher, once before training (when one is loaded: not with "
                              "loss.kd_ratio=0, nor with teacher.cache and sgo.mode=off)")


@dataclass
class SGOConfig:
    mode: SGOMode = opt("off", "off (dataset only: plain KD), on_policy (fresh student outputs, GKD-style) or "
                               "adaptive (DistiLLM: replay buffer + adaptive schedule)")
    on_policy_ratio: float = opt(1.0, "on_policy: probability of a step on fresh student outputs (lambda)")
    buffer_size: int = opt(1000, "replay buffer capacity in sequences, per rank")
    init_threshold: float = opt(0.0, "adaptive: initial phi, the probability of a step on student outputs")
    loss_eps: float = opt(0.1, "adaptive: phi rises when the validation loss is worse by at least this")
    n_phi: int = opt(10, "adaptive: phi rises by 1/n_phi at a time")
    replay_ratio: ReplayRatio = opt("decreasing", "adaptive: how the share of phi spent on fresh generation "
                                                  "changes over time")
    first_reference: FirstReference = opt("before_training", "adaptive: the first validation loss phi compares "
                                                             "with (before_training: the paper's code)")
    temperature: float = opt(1.0, "sampling temperature of student outputs")
    top_p: float = opt(1.0, "nucleus sampling of student outputs (1 = off)")
    top_k: int = opt(0, "top-k sampling of student outputs (0 = off)")


@dataclass
class CacheConfig:
    dir: str = opt("runs/teacher_cache", "distillm cache-teacher: where the teacher's top-k cache is written")
    top_k: int = opt(32, "distillm cache-teacher: log-probabilities kept per position (the rest is one tail class)")
    batch_size: int = opt(16, "distillm cache-teacher: examples per teacher forward")


@dataclass
class OutputConfig:
    dir: str = opt("runs/default", "run directory: config, metrics.jsonl, plots, checkpoints, summary")
    log_interval: int = opt(1, "optimizer steps between metrics.jsonl lines")
    checkpoint_interval: int = opt(50, "optimizer steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = opt(2, "most recent checkpoints kept")
    plots: bool = opt(True, "write PNG plots of the curves")
    tensorboard: bool = opt(False, "also log the metrics to TensorBoard, in RUN_DIR/tensorboard")


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sgo: SGOConfig = field(default_factory=SGOConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path=None, overrides: Optional[list[str]] = None) -> Config:
    """The default, then each config file in `path` (one path or a list, later ones win), then
    the KEY=VALUE overrides."""
    config = Config()
    for file in [path] if isinstance(path, (str, os.PathLike)) else (path or []):
        apply_dict(config, read_config_file(str(file)))
    apply_overrides(config, overrides or [])
    validate(config)
    return config


def template_fields(template: str) -> set:
    """The {fields} of a format string; ConfigError naming data.template if it is malformed."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ConfigError(f"config key 'data.template' is not a valid format string ({error}): {template!r}; "
                          f"write literal braces as {{{{ and }}}}") from None


def validate(config: Config) -> None:
    """Checks that values are in range, naming the key; types and choices are already checked."""
    def require(ok: bool, key: str, expected: str) -> None:
        if not ok:
            section, _, name = key.partition(".")
            value = getattr(getattr(config, section), name)
            raise ConfigError(f"config key {key!r} must be {expected}, got {value!r}")

    require(0.0 <= config.loss.alpha < 1.0, "loss.alpha", "in [0, 1)")
    require(0.0 < config.loss.beta < 1.0, "loss.beta", "in (0, 1)")
    require(config.loss.temperature > 0, "loss.temperature", "> 0")
    require(0.0 <= config.loss.kd_ratio <= 1.0, "loss.kd_ratio", "in [0, 1]")
    if config.teacher.path == NO_TEACHER:  # distillm sft: cross-entropy alone
        require(config.loss.kd_ratio == 0.0, "loss.kd_ratio", "0 without a teacher (teacher.path=none)")
        require(not config.eval.teacher, "eval.teacher", "false without a teacher (teacher.path=none)")
        require(config.sgo.mode == "off", "sgo.mode", "off without a teacher (teacher.path=none)")
        require(not config.teacher.cache, "teacher.cache", "empty without a teacher (teacher.path=none)")
    require(config.teacher.cache_top_k >= 0, "teacher.cache_top_k", ">= 0 (0 = all the cache has)")
    student = config.student
    require(student.lora_r >= 0, "student.lora_r", ">= 0 (0 = full training)")
    require(student.lora_alpha is None or student.lora_alpha > 0, "student.lora_alpha", "> 0 (or none: 2 x lora_r)")
    require(0.0 <= student.lora_dropout < 1.0, "student.lora_dropout", "in [0, 1)")
    require(len(student.lora_targets) > 0, "student.lora_targets", "all-linear or a list of Linear layer names")
    require(config.data.max_prompt_length > 0, "data.max_prompt_length", "> 0")
    require(config.data.max_length > config.data.max_prompt_length, "data.max_length", "> data.max_prompt_length")
    require(config.data.template == "chat" or template_fields(config.data.template) == {"prompt"}, "data.template",
            '"chat", or a format string whose only field is {prompt} (once or more)')
    require(config.data.template == "chat" or not config.data.system_prompt, "data.system_prompt",
            'empty or none unless data.template is "chat" (a format string writes its own system text)')
    require(config.train.batch_size > 0, "train.batch_size", "> 0")
    require(config.train.grad_accum > 0, "train.grad_accum", "> 0")
    require(config.train.batch_size % config.train.grad_accum == 0, "train.batch_size", "a multiple of train.grad_accum")
    require(config.train.max_steps >= 0, "train.max_steps", ">= 0")
    require(config.train.max_steps > 0 or config.train.epochs > 0, "train.epochs", "> 0 when train.max_steps is 0")
    require(config.train.lr > 0, "train.lr", "> 0")
    require(config.train.warmup_steps >= 0, "train.warmup_steps", ">= 0")
    require(config.train.max_grad_norm >= 0, "train.max_grad_norm", ">= 0")
    require(config.eval.interval >= 0, "eval.interval", ">= 0")
    require(config.eval.num_examples >= 0, "eval.num_examples", ">= 0")
    require(config.eval.batch_size > 0, "eval.batch_size", "> 0")
    require(config.eval.max_new_tokens > 0, "eval.max_new_tokens", "> 0")
    sgo = config.sgo
    require(0.0 <= sgo.on_policy_ratio <= 1.0, "sgo.on_policy_ratio", "in [0, 1]")
    require(sgo.buffer_size >= config.train.batch_size, "sgo.buffer_size", ">= train.batch_size")
    require(0.0 <= sgo.init_threshold <= 1.0, "sgo.init_threshold", "in [0, 1]")
    require(sgo.loss_eps >= 0, "sgo.loss_eps", ">= 0")
    require(sgo.n_phi > 0, "sgo.n_phi", "> 0")
    require(sgo.temperature > 0, "sgo.temperature", "> 0")
    require(0.0 < sgo.top_p <= 1.0, "sgo.top_p", "in (0, 1]")
    require(sgo.top_k >= 0, "sgo.top_k", ">= 0")
    require(config.cache.top_k > 0, "cache.top_k", "> 0")
    require(config.cache.batch_size > 0, "cache.batch_size", "> 0")
    require(config.output.log_interval > 0, "output.log_interval", "> 0")
    require(config.output.checkpoint_interval >= 0, "output.checkpoint_interval", ">= 0")
    require(config.output.keep_checkpoints > 0, "output.keep_checkpoints", "> 0")
    if config.train.max_steps:  # else the trainer checks, once it knows the epoch length
        check_adaptive_can_engage(config, config.train.max_steps)


def check_adaptive_can_engage(config: Config, total_steps: int) -> None:
    """ConfigError when sgo.mode=adaptive would silently be plain KD: φ starts at 0 and never gets
    the validations it needs to rise (one during training after a before-training reference, two
    otherwise; the final evaluation comes after the last step)."""
    sgo, interval = config.sgo, config.eval.interval
    if sgo.mode != "adaptive" or sgo.init_threshold > 0:
        return
    during_training = (total_steps - 1) // interval if interval else 0
    needed = 1 if sgo.first_reference == "before_training" else 2
    if during_training < needed:
        raise ConfigError(
            f"config key 'sgo.init_threshold' must be > 0 with sgo.mode=adaptive when phi cannot rise: "
            f"eval.interval={interval} gives {during_training} validation(s) in {total_steps} steps, and "
            f"sgo.first_reference={sgo.first_reference} needs {needed}; lower eval.interval or raise "
            f"sgo.init_threshold")


def save_config(config: Config, path: Path) -> None:
    """Writes config.json atomically: a reader sees the old file or the new one."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    os.replace(staging, path)


def describe() -> str:
    """Every config key with its default, type and help, for `--help`."""
    return describe_options(Config())
