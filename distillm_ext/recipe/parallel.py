"""train.parallel: how the student and the teacher are spread over the ranks torchrun starts.

- ddp (default): every rank holds both models whole; DistributedDataParallel all-reduces the
  student's gradients.
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) per decoder layer and at the root, for the
  student and for the frozen teacher, so parameters, gradients and AdamW state are split over
  the ranks. A layer's parameters are gathered for its forward (and the student's again for its
  backward) and freed after. The teacher's root (embeddings, final norm, output embedding)
  stays gathered from its forward to the end of the step's loss, which reads its output
  embedding, and is freed by `release_teacher_root`: one gather per micro-batch, not one per
  loss chunk. With train.bf16 on CUDA the student computes in bfloat16 and reduces gradients
  in float32 (MixedPrecisionPolicy); on CPU everything is float32.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .config import ConfigError

PARALLEL_MODES = ("ddp", "fsdp")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM: the longest ModuleList under its base
    model whose entries share one class (`model.layers` of Llama/Qwen, `h` of GPT-2, ...)."""
    base = getattr(model, "base_model", model)
    candidates = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                  and len({type(layer) for layer in m}) == 1]
    if not candidates:
        raise ConfigError(f"train.parallel=fsdp: found no decoder layers in {type(model).__name__} (no list of "
                          f"identical blocks under its base model) to shard; use train.parallel=ddp")
    return max(candidates, key=len)


def check_launch(parallel: str) -> None:
    """fsdp shards over the processes of a torchrun launch; without one there is nothing to
    shard over, and the user most likely forgot torchrun."""
    if parallel == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise ConfigError("train.parallel=fsdp shards over the processes of a torchrun launch; start it with "
                          "torchrun --nproc_per_node N -m distillm_ext.recipe.cli train ... (N = 1 is allowed)")


def shard(model: nn.Module, device: torch.device, frozen: bool, bf16: bool = False) -> nn.Module:
    """fully_shard per decoder layer, then at the root (in place; returns the model). `bf16`: a
    trained model computes in bfloat16 and reduces its gradients in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    options = {"mesh": mesh}
    if bf16 and not frozen:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # A bool, never an int, for the teacher: an int keeps a second copy of every layer gathered
    # between forward and (never coming) backward (pytorch#147179). It cannot be changed after
    # wrapping (pytorch#149029), so it is chosen here once.
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def release_teacher_root(teacher: nn.Module) -> None:
    """Frees the teacher root's gathered parameters once the step's loss has read them."""
    if is_sharded(teacher):
        teacher.reshard()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Micro-batches before the last of a step accumulate gradients locally: DDP's no_sync, or
    FSDP2's requires_gradient_sync(False) (no reduce-scatter)."""
    if enabled:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The sharded model and AdamW state, as torch.distributed.checkpoint (DCP) saves and loads
    it: every rank holds and writes its own shards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def full_model_state(model: nn.Module) -> dict:
    """The whole model's state dict on rank 0 (CPU tensors), gathered from every rank's shards
    (all ranks call this), for one save_pretrained directory; empty on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (an output embedding that is the input embedding) come back as two tensors;
    # keep the first name only, as save_pretrained does for an unsharded model.
    every = dict(model.named_parameters(remove_duplicate=False))
    for alias in every.keys() - dict(model.named_parameters()).keys():
        state.pop(alias, None)
    return state


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder) -> None:
    """Loads what `sharded_state` saved into `folder` (all ranks call this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
