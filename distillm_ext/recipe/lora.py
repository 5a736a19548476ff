"""LoRA students through peft (student.lora_r > 0): the adapter put on the student, checked
against the config, and loaded back from a checkpoint's peft-format model/ directory.

Only the adapter trains (peft freezes the rest), so AdamW, which the trainer builds over the
trainable parameters, holds state for it alone. A checkpoint's model/ is peft's own format
(adapter_config.json, adapter_model.safetensors); the base is rebuilt from the run's config
(student.path, student.keep_layers, teacher.path), as the run built it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import ConfigError, StudentConfig

ALL_LINEAR = "all-linear"  # peft's name for every Linear of the decoder blocks, not the output embedding
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(directory: Path) -> bool:
    """A peft adapter directory (a LoRA run's model/), as opposed to a whole model."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def check_targets(model: nn.Module, targets: list[str], fused_linear: bool) -> None:
    """ConfigError for a target no Linear layer of the model has, and for the output embedding
    under the fused-linear loss, which reads the output embedding's weight directly and would
    miss its adapter."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    head = model.get_output_embeddings()
    head_name = next((name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head), None)
    if targets == [ALL_LINEAR]:
        if not linear - {head_name}:
            raise ConfigError(f"student.lora_targets={ALL_LINEAR}: the student ({type(model).__name__}) has no Linear "
                              f"layer besides its output embedding to adapt")
        return
    for target in targets:
        if target == ALL_LINEAR:
            raise ConfigError(f"student.lora_targets: {ALL_LINEAR} stands alone, not in a list with {targets}")
        if target not in linear:
            raise ConfigError(f"student.lora_targets: the student ({type(model).__name__}) has no Linear layer named "
                              f"{target!r}; its Linear layers are {sorted(linear)}")
        if target == head_name and fused_linear:
            raise ConfigError(f"student.lora_targets: {target!r} is the output embedding, which the fused-linear "
                              f"loss reads as a plain weight (its adapter would be left out); drop it, or set "
                              f"loss.fused_linear=false")


def lora_config(student: StudentConfig):
    from peft import LoraConfig

    targets = student.lora_targets
    return LoraConfig(r=student.lora_r, lora_alpha=student.lora_alpha or 2.0 * student.lora_r,
                      lora_dropout=student.lora_dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets))


def add_lora(model: nn.Module, student: StudentConfig, fused_linear: bool) -> nn.Module:
    """The peft model of `model` with a fresh adapter (student.lora_*); only the adapter trains."""
    from peft import get_peft_model

    check_targets(model, list(student.lora_targets), fused_linear)
    return get_peft_model(model, lora_config(student))


def load_lora(model: nn.Module, directory: Path, trainable: bool) -> nn.Module:
    """The peft model of `model` with the adapter saved in `directory`."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
