"""Run under torchrun by test_sharded_loading.py: builds the models of a config with the fsdp
plan (sharded loading) and saves, from rank 0, what the test compares with from_pretrained.

    torchrun --nproc_per_node 2 sharded_load_worker.py OUT.pt key=value ...
"""

import os
import resource
import sys

import torch

from distillm_ext.recipe.config import load_config
from distillm_ext.recipe.distributed import init_runtime
from distillm_ext.recipe.models import build_models
from distillm_ext.recipe.parallel import full_model_state, make_plan


def local_numel(model) -> int:
    """Elements this rank holds of the model's parameters (its shards, for a sharded model)."""
    return sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters())


def main(out: str, overrides: list[str]) -> None:
    config = load_config(None, overrides)
    runtime = init_runtime()
    plan = make_plan("fsdp", runtime)
    models = build_models(config, plan)
    result = {}
    for role, model in (("teacher", models.teacher), ("student", models.student)):
        result[role] = {
            "state": full_model_state(model),  # gathered on rank 0
            "buffers": {name: buffer.clone() for name, buffer in model.named_buffers()},
            "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
            "local_numel": local_numel(model),
            "dtype": str(next(model.parameters()).dtype),
        }
    result["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if runtime.is_main:
        torch.save(result, out)
    # No rank leaves while another still has gloo work in flight (a rank aborts otherwise:
    # "terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # A thread still alive at interpreter exit has aborted this worker in CI ("terminate called
    # without an active exception") after its result was saved; leave without running exit
    # handlers. The trainer's own launches (test_fsdp.py) exit normally.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
