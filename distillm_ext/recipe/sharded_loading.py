"""Sharded loading (train.parallel=fsdp): no rank ever holds a whole model, rank 0 included.

A model is built on the meta device (no memory; `empty_model`) and remembers the files its
weights come from (`WeightFiles`). The parallel plan shards it with `fully_shard` as it is, and
then `fill_shards` gives each rank's shards memory and reads them straight from the checkpoint's
safetensors files: torch.distributed.checkpoint (DCP) with its HuggingFaceStorageReader, which
reads only the rows of each tensor that a rank holds. This is how torchtitan loads; it is what
lets a rank start with 1/N of an 8B-70B teacher instead of all of it.

What the files do not hold is made as `from_pretrained` makes it: tied weights stay one
parameter (FSDP2 shards it once), and non-persistent buffers (a rotary embedding's `inv_freq`)
are computed by the model's own `_init_weights` of their module, as transformers does after
loading on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .config import ConfigError

_PENDING = "_distillm_weight_files"  # the attribute an empty model keeps its WeightFiles under


@dataclass(frozen=True)
class WeightFiles:
    """Where a model's weights are: a Hugging Face model directory, and for each state-dict name
    that is not the name in the files, the name in the files (the built-in student reads layer
    j from the teacher's layer keep_layers[j])."""

    directory: Path
    renamed: dict[str, str] = field(default_factory=dict)

    def name_in_files(self, name: str) -> str:
        return self.renamed.get(name, name)


def safetensors_files(directory: Path) -> list[Path]:
    """A model directory's safetensors files: the sharded set its index names, or the one file."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConfigError(f"{directory} has no safetensors weights (model.safetensors or an index of shards)")


def tensor_names(directory: Path) -> set[str]:
    """The names of every tensor in a model directory's safetensors files, from their headers.
    A file that is missing, truncated or not safetensors is a one-line error that names it."""
    from safetensors import safe_open

    names = set()
    for file in safetensors_files(directory):
        if not file.is_file():
            raise ConfigError(f"{file}: missing (the checkpoint's index names it); copy the whole checkpoint again")
        try:
            with safe_open(str(file), framework="pt") as reader:
                names.update(reader.keys())
        except Exception as error:  # safetensors raises its own error types for a bad header or size
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"{file}: cannot read it ({reason}); it may be truncated: copy it again") from None
    return names


def empty_model(config, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal LM of a transformers `config` on the meta device: its structure, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def read_later(model: PreTrainedModel, files: WeightFiles) -> PreTrainedModel:
    """Marks an `empty_model` as to be filled from `files` by `fill_shards`; returns it."""
    setattr(model, _PENDING, files)
    return model


def is_empty(model: nn.Module) -> bool:
    """Waiting for `fill_shards` (see `read_later`)."""
    return getattr(model, _PENDING, None) is not None


def tied_aliases(model: nn.Module) -> set[str]:
    """The second names of tied parameters (an output embedding that is the input embedding),
    which save_pretrained does not write: the files hold each parameter once."""
    return dict(model.named_parameters(remove_duplicate=False)).keys() - dict(model.named_parameters()).keys()


def without_tied_aliases(model: nn.Module, state: dict) -> dict:
    """`state` (a state dict of `model`) without the names in `tied_aliases`."""
    aliases = tied_aliases(model)
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def loadable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as the files hold it: each tied parameter once, and no
    non-persistent buffers (state_dict leaves them out)."""
    return without_tied_aliases(model, model.state_dict())


def fill_shards(model: nn.Module, device: torch.device) -> None:
    """Gives an empty model (sharded by now, or not) its memory on `device` and reads each rank's
    shards of its weights from the files `read_later` named (every rank calls this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    files: WeightFiles = getattr(model, _PENDING)
    wanted = {files.name_in_files(name) for name in loadable_state(model)}
    missing = sorted(wanted - tensor_names(files.directory))
    if missing:
        raise ConfigError(f"{files.directory}: the weights lack {len(missing)} tensors the model needs, "
                          f"e.g. {missing[:3]}")
    model.to_empty(device=device)
    with torch.no_grad():  # transformers' own values for the buffers the files do not hold
        for module in model.modules():
            if module._non_persistent_buffers_set:
                model._init_weights(module)
    # to_empty gave the sharded parameters new memory: read the state dict's tensors again.
    state = loadable_state(model)
    dcp.load({files.name_in_files(name): tensor for name, tensor in state.items()},
             storage_reader=HuggingFaceStorageReader(str(files.directory)))
    delattr(model, _PENDING)
