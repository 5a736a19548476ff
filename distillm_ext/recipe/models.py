"""The model builder: the teacher and the student of a run, ready for it (`build_models`), from
local Hugging Face directories or the built-in pair.

Model paths may name the built-in models: "builtin" and "builtin-untuned" teachers
(builtin_teacher.py makes and caches them), and the "builtin" student, the teacher with only
`keep_layers` of its decoder layers, read from the teacher's files under new names, sharing its
tokenizer.

The loaders build a model whole (`from_pretrained`), or, with `empty=True` (a plan that
`loads_shards`: fsdp), on the meta device with the files to read it from; `build_models` then
has each rank read its own shards once the plan has sharded it (sharded_loading.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .config import BUILTIN, BUILTIN_UNTUNED, NO_TEACHER, Config, ConfigError
from .sharded_loading import (WeightFiles, empty_model, fill_shards, is_empty, read_later, safetensors_files,
                              tied_aliases)

log = logging.getLogger(__name__)

def load_causal_lm(path: str, role: str, empty: bool = False) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) from a local directory; `role` ("teacher"/"student") names it in errors.
    `empty`: the model on the meta device, its weights read later into its shards (sharded_loading)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{role}.path {path!r} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(directory)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"{role}.path {path!r} holds a {config.model_type!r} model, which is not a causal language "
            f"model (no AutoModelForCausalLM class for it)"
        )
    try:
        if empty:
            model = read_later(empty_model(config), WeightFiles(directory))
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:  # no weights, a broken file, no tokenizer
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{role}.path {path!r}: cannot load it: {reason}") from None
    return model, tokenizer


def model_dir(path: str) -> Path:
    """A model path as a directory: "builtin" is the built-in teacher (tuned on first use),
    "builtin-untuned" the instruct model it is tuned from; anything else a directory."""
    from . import builtin_teacher

    if path == BUILTIN:
        return builtin_teacher.tuned_dir()
    if path == BUILTIN_UNTUNED:
        return builtin_teacher.untuned_dir()
    return Path(path)


def load_teacher(path: str, empty: bool = False) -> tuple[PreTrainedModel, object]:
    """The frozen teacher in eval mode, and its tokenizer (`empty`: see load_causal_lm)."""
    model, tokenizer = load_causal_lm(str(model_dir(path)), "teacher", empty)
    model.eval().requires_grad_(False)
    return model, tokenizer


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The Hugging Face causal LM inside any wrapper: DDP's `module`, peft's base model (FSDP2
    wraps in place, so a sharded model is its own)."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the decoder blocks of a causal LM, from what the model declares: the list
    whose blocks are of a class it names in `_no_split_modules` (its unit of sharding), else its
    base model's `layers`. Sharding and the built-in student's layer renaming both use it."""
    lm = causal_lm(model)
    blocks = set(getattr(lm, "_no_split_modules", None) or ())
    lists = [(name, module) for name, module in lm.named_modules() if isinstance(module, nn.ModuleList)]
    for name, module in lists:
        if len(module) and all(type(block).__name__ in blocks for block in module):
            return name, module
    layers = getattr(getattr(lm, "base_model", None), "layers", None)
    for name, module in lists:
        if module is layers and len(module):
            return name, module
    raise ConfigError(f"found no decoder layers in {type(lm).__name__}: it names no block class in "
                      f"_no_split_modules and has no base_model.layers")


def read_tensors(directory: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{name: tensor} read from a model directory's safetensors files, where `names` maps each
    wanted name to its name in the files; names the files lack are left out."""
    from safetensors import safe_open

    wanted = {source: target for target, source in names.items()}
    tensors = {}
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt") as reader:
            for source in wanted.keys() & set(reader.keys()):
                tensors[wanted[source]] = reader.get_tensor(source)
    return tensors


def student_from_layers(teacher_dir: Path, keep_layers: list[int], empty: bool = False) -> PreTrainedModel:
    """The teacher of `teacher_dir` with only the decoder layers `keep_layers` (in that order).

    The student is built from the teacher's config with fewer layers, and its weights are read
    from the teacher's files under new names: student layer j is teacher layer keep_layers[j].
    Per-layer config lists (layer_types) are indexed the same way. `empty`: on the meta device,
    its weights read later into its shards (sharded_loading), under the same names.
    """
    config = AutoConfig.from_pretrained(teacher_dir)
    n_layers = config.num_hidden_layers
    if not keep_layers or len(set(keep_layers)) != len(keep_layers) or not all(0 <= i < n_layers for i in keep_layers):
        raise ConfigError(
            f"student.keep_layers must be distinct layer indices in [0, {n_layers}), got {keep_layers}"
        )
    config.num_hidden_layers = len(keep_layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    if empty:
        student = empty_model(config)
    else:
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    prefix = decoder_layers(student)[0] + "."

    def teacher_name(name: str) -> str:  # student layer j is teacher layer keep_layers[j]
        if not name.startswith(prefix):
            return name
        index, rest = name[len(prefix):].split(".", 1)
        return f"{prefix}{keep_layers[int(index)]}.{rest}"

    renamed = {name: teacher_name(name) for name in student.state_dict()}
    if empty:
        return read_later(student, WeightFiles(teacher_dir, renamed)).train()
    state = read_tensors(teacher_dir, renamed)
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Tied weights (an output embedding that is the input embedding) are saved under one name.
    tied = tied_aliases(student)
    if set(missing) - tied or unexpected:
        raise ConfigError(f"student.keep_layers: the teacher's files in {teacher_dir} lack "
                          f"{sorted(set(missing) - tied)[:3]} for the student")
    return student.train().requires_grad_(True)


def load_student(path: str, keep_layers: list[int], teacher_path: str, teacher_tokenizer=None, empty: bool = False):
    """(student in train mode, its tokenizer). "builtin" is the teacher with only `keep_layers`
    of its layers; a student of its own must have the teacher's tokenizer, when there is one.
    `empty`: see load_causal_lm."""
    if path == BUILTIN:
        if teacher_path == NO_TEACHER:
            raise ConfigError('student.path "builtin" is the teacher with fewer layers, and there is no teacher '
                              '(teacher.path=none); name the model to train, e.g. student.path=builtin-untuned')
        directory = model_dir(teacher_path)
        return (student_from_layers(directory, keep_layers, empty),
                teacher_tokenizer or AutoTokenizer.from_pretrained(directory))
    student, tokenizer = load_causal_lm(str(model_dir(path)), "student", empty)
    if teacher_tokenizer is not None:
        check_same_tokenizer(teacher_tokenizer, tokenizer)
    return student.train(), tokenizer


def build_student(config: Config, teacher_tokenizer=None, resume_from: Optional[Path] = None, empty: bool = False):
    """(student in train mode, its tokenizer): config.student, or `resume_from`'s model/ when
    resuming. With LoRA (student.lora_r > 0) it is the configured base with an adapter, fresh or
    `resume_from`'s (lora.py); only the adapter trains. `empty` (see load_causal_lm) applies to
    full training: a LoRA student is loaded whole, its adapter initialized as in one process."""
    from .lora import add_lora, is_adapter, load_lora

    lora = config.student.lora_r > 0
    if resume_from is not None and is_adapter(resume_from / "model") != lora:
        saved = "a LoRA adapter" if is_adapter(resume_from / "model") else "a whole student (full training)"
        raise ConfigError(f"--resume: {resume_from} holds {saved}, and student.lora_r is {config.student.lora_r} "
                          f"now; resume with the run's own student settings")
    if resume_from is not None and not lora:
        student, tokenizer = load_causal_lm(str(resume_from / "model"), "student", empty)
        return student.train(), tokenizer
    student, tokenizer = load_student(config.student.path, config.student.keep_layers, config.teacher.path,
                                      teacher_tokenizer, empty and not lora)
    if not lora:
        return student, tokenizer
    if resume_from is not None:
        return load_lora(student, resume_from / "model", trainable=True).train(), tokenizer
    return add_lora(student, config.student, config.loss.fused_linear).train(), tokenizer


def load_trained(model_dir: Path, config: Config):
    """(model, tokenizer) of a checkpoint's model/ (or any model directory) for inference: the
    whole model, or for a LoRA adapter the base that `config` builds with the adapter on it."""
    from .lora import is_adapter, load_lora

    if not is_adapter(model_dir):
        return load_causal_lm(str(model_dir), "--model")
    base, tokenizer = load_student(config.student.path, config.student.keep_layers, config.teacher.path)
    return load_lora(base, model_dir, trainable=False).eval(), tokenizer


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """KD compares distributions token by token, so both models must share one vocabulary."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(
            f"teacher and student tokenizers differ ({len(teacher_vocab)} vs {len(student_vocab)} tokens; "
            f"e.g. {differing}); distillation needs the same tokenizer on both sides"
        )


@dataclass
class Models:
    """The models of a run, ready for it: on their device, in their dtypes, wrapped or sharded."""

    teacher: Optional[nn.Module]  # frozen, eval mode; None with teacher.path=none (distillm sft), or when
                                  # teacher.cache serves every batch (sgo.mode=off)
    student: nn.Module          # the module whose parameters train (sharded under fsdp)
    student_forward: nn.Module  # what the student's training forwards go through (DDP's wrapper)
    tokenizer: object
    vocab_size: int             # the output rows both models share (see README, "Padded vocabularies")


def needs_live_teacher(config: Config) -> bool:
    """A teacher model is loaded unless there is none, the loss never reads it (loss.kd_ratio=0:
    plain fine-tuning, the same as `distillm sft`), or its cache (teacher.cache) answers every
    batch: with sgo.mode=off, every batch is a dataset batch."""
    return (config.teacher.path != NO_TEACHER and config.loss.kd_ratio > 0
            and not (config.teacher.cache and config.sgo.mode == "off"))


def teacher_dtype(config: Config, bf16: bool) -> torch.dtype:
    """teacher.dtype, or bfloat16 when the run computes in it (`bf16`: train.bf16 on CUDA)."""
    if config.teacher.dtype is not None:
        return getattr(torch, config.teacher.dtype)
    return torch.bfloat16 if bf16 else torch.float32


def checkpoint_layers(student: nn.Module) -> None:
    """train.activation_checkpointing: each decoder layer of the student recomputed in the
    backward (transformers' own, non-reentrant; before any sharding, as FSDP2 wants it)."""
    lm = causal_lm(student)
    if not getattr(lm, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: the student ({type(lm).__name__}) does not support "
                          f"it in transformers; set it to false")
    if hasattr(lm, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_models(config: Config, plan, resume_from: Optional[Path] = None, bf16: bool = False) -> Models:
    """The teacher (None when `needs_live_teacher` says so) and the student of `config`, placed
    by the parallel plan `plan`: the student from `resume_from`'s model/ when resuming. `bf16`:
    the run computes in bfloat16 (train.bf16 on CUDA), the teacher's default dtype then.

    When the plan shards (`plan.loads_shards`), both are built empty, sharded, and then filled:
    each rank reads only its own shards from the files (sharded_loading.py)."""
    empty = plan.loads_shards
    teacher, tokenizer = None, None
    output_rows = []  # of each model, or of the teacher as its cache recorded it
    if needs_live_teacher(config):
        teacher, tokenizer = load_teacher(config.teacher.path, empty)
        output_rows.append(teacher.get_output_embeddings().weight.shape[0])
    elif config.teacher.cache:
        from .teacher_cache import read_manifest

        output_rows.append(read_manifest(config.teacher.cache)["teacher"]["output_rows"])
    student, student_tokenizer = build_student(config, tokenizer, resume_from, empty)
    tokenizer = tokenizer or student_tokenizer
    if teacher is not None:
        teacher.to(teacher_dtype(config, bf16))
    if config.train.activation_checkpointing:
        checkpoint_layers(student)
    # Vocabularies padded to different multiples (152064 vs 151936) share their first rows.
    vocab_size = min(output_rows + [student.get_output_embeddings().weight.shape[0]])
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but a model outputs only {vocab_size}")
    student_forward = plan.wrap(student, teacher)
    for model in (teacher, student):
        if model is not None and is_empty(model):
            fill_shards(model, plan.runtime.device)
    return Models(teacher, student, student_forward, tokenizer, vocab_size)
