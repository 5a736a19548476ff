"""train.parallel: how the student and the teacher are spread over the ranks torchrun starts.

A parallel plan owns everything that differs between the modes, and the trainer only calls it:
wrapping the models, skipping the gradient sync of accumulating micro-batches, what follows a
micro-batch, the global gradient norm, and the checkpoint's model and optimizer state.

- ddp (default): every rank holds both models whole; DistributedDataParallel all-reduces the
  student's gradients (a single process needs no wrapper).
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) per decoder layer and at the root, for the
  student and for the frozen teacher, so parameters, gradients and AdamW state are split over
  the ranks. A layer's parameters are gathered for its forward (and the student's again for its
  backward) and freed after. The teacher's output embedding (its root, when tied to the input
  embedding; a group of its own otherwise) stays gathered from its forward to the end of the
  micro-batch's loss, which reads it, and is freed in `after_micro_batch`: one gather per
  micro-batch, not one per loss chunk. With train.bf16 on CUDA the student computes in
  bfloat16 and reduces gradients in float32 (MixedPrecisionPolicy); on CPU everything is
  float32. Both models are built empty and sharded before any weight is read; each rank then
  reads only its own shards (`loads_shards`, sharded_loading.py). Generation gathers the
  student once per call (`gathered_for_generation`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch
from torch import nn

from .checkpoint import SHARDED_DIR
from .config import ConfigError
from .distributed import Runtime
from .models import decoder_layers
from .sharded_loading import without_tied_aliases


@dataclass
class CheckpointState:
    """What a plan contributes to a checkpoint: `model_state` (the state dict model/ is written
    from; None: the model's own), `optimizer_state` (saved with the trainer state on rank 0), and
    `sharded` (what every rank writes with torch.distributed.checkpoint)."""

    model_state: Optional[dict] = None
    optimizer_state: Optional[dict] = None
    sharded: Optional[dict] = None


class ParallelPlan(Protocol):
    runtime: Runtime
    loads_shards: bool  # the models are built empty and each rank reads its own shards once wrapped

    def wrap(self, student: nn.Module, teacher: Optional[nn.Module]) -> nn.Module:
        """Places (and wraps or shards) both models (the teacher may be None), in place; returns
        what the student's training forwards go through."""

    def accumulating(self) -> contextlib.AbstractContextManager:
        """Around a micro-batch before a step's last: its gradients are not synchronized yet."""

    def after_micro_batch(self) -> None: ...

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clips the student's gradients; returns their global norm (a plain tensor)."""

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> CheckpointState: ...

    def load_checkpoint(self, optimizer: torch.optim.Optimizer, checkpoint: Path,
                        optimizer_state: Optional[dict]) -> None:
        """Restores what `checkpoint_state` saved: the optimizer (from `optimizer_state`, as saved
        with the trainer state, or from the checkpoint's own files)."""


class Replicated:
    """ddp: whole models on every rank (see the module docstring)."""

    loads_shards = False

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.student: Optional[nn.Module] = None
        self.ddp: Optional[nn.parallel.DistributedDataParallel] = None

    def wrap(self, student: nn.Module, teacher: Optional[nn.Module]) -> nn.Module:
        device = self.runtime.device
        if teacher is not None:
            teacher.to(device)
        self.student = student.to(device)
        if not self.runtime.distributed:
            return student
        self.ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
        return self.ddp

    def accumulating(self):
        return self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()

    def after_micro_batch(self) -> None:
        pass

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)

    def checkpoint_state(self, optimizer) -> CheckpointState:
        return CheckpointState(optimizer_state=optimizer.state_dict())

    def load_checkpoint(self, optimizer, checkpoint: Path, optimizer_state: Optional[dict]) -> None:
        optimizer.load_state_dict(optimizer_state)


class Sharded:
    """fsdp: FSDP2 over every rank of the launch (see the module docstring)."""

    loads_shards = True

    def __init__(self, runtime: Runtime, bf16: bool = False):
        if "WORLD_SIZE" not in os.environ:  # nothing to shard over: most likely torchrun was forgotten
            raise ConfigError("train.parallel=fsdp shards over the processes of a torchrun launch; start it with "
                              "torchrun --nproc_per_node N -m distillm_ext.recipe.cli train ... (N = 1 is allowed)")
        self.runtime, self.bf16 = runtime, bf16
        self.student: Optional[nn.Module] = None
        self.teacher: Optional[nn.Module] = None

    def wrap(self, student: nn.Module, teacher: Optional[nn.Module]) -> nn.Module:
        from torch.distributed.fsdp import register_fsdp_forward_method

        device = self.runtime.device
        if teacher is not None:
            self.teacher = shard(teacher, device, frozen=True)
            register_fsdp_forward_method(teacher, "generate")  # generation runs outside forward()
        self.student = shard(student, device, frozen=False, bf16=self.bf16)
        register_fsdp_forward_method(student, "generate")
        return student

    @contextlib.contextmanager
    def accumulating(self):
        self.student.set_requires_gradient_sync(False)  # no reduce-scatter until the last micro-batch
        try:
            yield
        finally:
            self.student.set_requires_gradient_sync(True)

    def after_micro_batch(self) -> None:
        if self.teacher is not None:  # the loss has read the teacher's output embedding
            reshard_all(self.teacher)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        # A DTensor: the norm over every rank's shards, which full_tensor() all-reduces.
        return torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm).full_tensor()

    def checkpoint_state(self, optimizer) -> CheckpointState:
        """The model gathered on rank 0 for model/, and every rank's model and AdamW shards."""
        return CheckpointState(model_state=full_model_state(self.student),
                               sharded=sharded_state(self.student, optimizer))

    def load_checkpoint(self, optimizer, checkpoint: Path, optimizer_state: Optional[dict]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = sharded_state(self.student, optimizer)
        dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_DIR))
        set_state_dict(self.student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module):
    """Around a `generate` call, which runs one forward per token; yields whether the ranks must
    run every forward together (`generate(synced_gpus=...)`).

    A sharded model that trains (the student: the small model) is gathered whole once, before
    the call, and freed after, instead of every layer once per token; its forwards then need no
    other rank, so each rank stops at its own last token. A frozen sharded teacher, which may not
    fit whole on a rank, keeps gathering layer by layer, so its ranks step together until the
    longest generation on any rank ends. An unsharded model is left as it is."""
    if not is_sharded(model):
        yield False
        return
    if not any(parameter.requires_grad for parameter in model.parameters()):
        try:
            yield torch.distributed.get_world_size() > 1
        finally:
            reshard_all(model)  # its output embedding stays gathered after a forward
        return
    from torch.distributed.fsdp import FSDPModule

    model.set_reshard_after_forward(False)
    for module in model.modules():  # every rank gathers every group, here, together
        if isinstance(module, FSDPModule):
            module.unshard()
    try:
        yield False
    finally:
        reshard_all(model)
        # What fully_shard chose: the layers reshard after forward, the root does not (its
        # backward follows at once).
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)


def reshard_all(model: nn.Module) -> None:
    """Frees every gathered parameter group of a sharded model (its root's and its modules')."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def make_plan(name: str, runtime: Runtime, bf16: bool = False) -> ParallelPlan:
    """The plan of train.parallel `name` (its config type lists the names)."""
    return Sharded(runtime, bf16) if name == "fsdp" else Replicated(runtime)


def shard(model: nn.Module, device: torch.device, frozen: bool, bf16: bool = False) -> nn.Module:
    """fully_shard per decoder layer, then at the root (in place; returns the model), on `device`
    (a model on the meta device stays there, for sharded_loading.fill_shards). `bf16`: a trained
    model computes in bfloat16 and reduces its gradients in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    options = {"mesh": mesh}
    if bf16 and not frozen:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if not any(parameter.is_meta for parameter in model.parameters()):
        model.to(device)
    # A bool, never an int, for the teacher: an int keeps a second copy of every layer gathered
    # between forward and (never coming) backward (pytorch#147179). It cannot be changed after
    # wrapping (pytorch#149029), so it is chosen here once.
    _, layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, **options)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if frozen and head is not None and head.weight is not embeddings.weight:
        # Untied, each embedding is a group of its own, so that the teacher never holds both
        # whole, nor gathers both at once (a gather briefly holds a group twice): the input
        # embedding is freed after its forward; the output embedding stays gathered from its
        # forward until `Sharded.after_micro_batch`, as the loss reads it.
        fully_shard(embeddings, reshard_after_forward=True, **options)
        fully_shard(head, reshard_after_forward=False, **options)
    fully_shard(model, **options)
    return model


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
    # Tied weights come back as two tensors; keep the first name only, as save_pretrained does.
    return without_tied_aliases(model, state)
