"""Scale: distilling a ~1B teacher into a ~0.24B student on 2 CPU ranks. Peak RSS per rank while
loading and while training, and tokens/s, for one process against 2 ranks under ddp and fsdp
(fsdp also with a bfloat16 teacher, with activation checkpointing, and with a LoRA student).

    python benchmarks/bench_scale.py                     # every row of RESULTS.md (~25 min on 2 cores)
    python benchmarks/bench_scale.py --configs one fsdp  # some rows only
    python benchmarks/bench_scale.py --configs one one+lora fsdp fsdp+lora --out ...  # LoRA against full

The models are random-weight Llamas written once to --models (safetensors, the teacher in
several files): the teacher of hidden 2048, 16 layers, vocabulary 49152 (the built-in
tokenizer's), untied (0.92B parameters, 3.7 GB in float32); the student of hidden 1024, 16 layers,
tied (0.24B). Every run is `distillm train` on the built-in data, through the code the CLI runs
(under torchrun for 2 ranks), with a hook that reads each rank's peak RSS (VmHWM) once the models
and data are loaded, then resets it, and reads it again after the steps. tokens/s is the median of
the logged steps after the first. "generate s" times one SGO-style `generate` of the student
(2 prompts of 32 tokens per rank, 32 new tokens), before the steps. The LoRA rows (r = 16,
all-linear) load the student whole before sharding it.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, print_table, training_tokens_per_s, write_json  # noqa: E402

# name: (ranks, overrides)
CONFIGS = {
    "one": (1, []),
    "ddp": (2, ["train.parallel=ddp"]),
    "fsdp": (2, ["train.parallel=fsdp"]),
    "fsdp+bf16-teacher": (2, ["train.parallel=fsdp", "teacher.dtype=bfloat16"]),
    "fsdp+checkpointing": (2, ["train.parallel=fsdp", "train.activation_checkpointing=true"]),
    "one+lora": (1, ["student.lora_r=16"]),
    "fsdp+lora": (2, ["train.parallel=fsdp", "student.lora_r=16"]),
}

# One rank of `distillm train`: the models and data load in Trainer(), the steps run in fit().
RANK = """
import json, os, sys
from pathlib import Path
from distillm_ext.recipe.config import load_config
from distillm_ext.recipe.trainer import Trainer

def status_mb(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

trainer = Trainer(load_config(None, sys.argv[1:]), overwrite=True)
loading = status_mb("VmHWM")
# SGO's generation: 2 prompts of 32 tokens per rank, 32 new tokens each, greedy.
import time, torch
from transformers import GenerationConfig
from distillm_ext.recipe.generation import generate_with_settings
prompts = {"input_ids": torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(0)),
           "attention_mask": torch.ones(2, 32, dtype=torch.long)}
settings = GenerationConfig(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
started = time.perf_counter()
generate_with_settings(trainer.student, prompts, settings, trainer.vocab_size)
generation_s = time.perf_counter() - started
Path("/proc/self/clear_refs").write_text("5")  # the high-water mark from here on
trainer.fit()
trainable = sum(p.numel() for p in trainer.student.parameters() if p.requires_grad)  # DTensors: global sizes
adamw = sum(getattr(v, "_local_tensor", v).nbytes for state in trainer.optimizer.state.values()
            for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
print("RANK " + json.dumps({"rank": int(os.environ.get("RANK", 0)), "loading_mb": loading,
                            "trainable_m": trainable / 1e6, "adamw_mb": adamw / 2**20,
                            "steps_mb": status_mb("VmHWM"), "generation_s": generation_s}), flush=True)
"""


def write_models(directory: Path) -> tuple[Path, Path]:
    """The random teacher and student directories (written once, reused after)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distillm_ext.recipe.builtin_teacher import untuned_dir

    teacher_dir, student_dir = directory / "teacher-1b", directory / "student-250m"
    shapes = {teacher_dir: dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                                num_key_value_heads=8, tie_word_embeddings=False),
              student_dir: dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=16,
                                num_key_value_heads=4, tie_word_embeddings=True)}
    tokenizer = AutoTokenizer.from_pretrained(untuned_dir())
    for path, shape in shapes.items():
        if (path / "config.json").is_file():
            continue
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **shape)
        model = LlamaForCausalLM(config)
        print(f"writing {path} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters)", flush=True)
        model.save_pretrained(path, max_shard_size="1GB")
        tokenizer.save_pretrained(path)
        del model
    return teacher_dir, student_dir


def run(name: str, teacher: Path, student: Path, args) -> dict:
    ranks, overrides = CONFIGS[name]
    run_dir = args.work / name
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(ranks), "--no-python", sys.executable]
    command = [*launcher, "-c", RANK, f"teacher.path={teacher}", f"student.path={student}",
               f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", f"data.max_length={args.length}",
               "train.warmup_steps=1", "eval.num_examples=2", "eval.batch_size=2", "eval.max_new_tokens=4",
               "eval.teacher=false", "output.checkpoint_interval=0", "output.plots=false", f"output.dir={run_dir}",
               *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    print(f"{name}: {ranks} rank(s) ...", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    (args.work / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"config": name, "ranks": ranks, "error": f"exit {done.returncode}; see {args.work / name}.log"}
    per_rank = [json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("RANK ")]
    return {"config": name, "ranks": ranks, "tokens_per_s": training_tokens_per_s(run_dir, skip=1),
            "generation_s": max(r["generation_s"] for r in per_rank),
            "trainable_m": per_rank[0]["trainable_m"], "adamw_mb": max(r["adamw_mb"] for r in per_rank),
            "loading_mb": max(r["loading_mb"] for r in per_rank), "steps_mb": max(r["steps_mb"] for r in per_rank),
            "per_rank": per_rank}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="sequences per optimizer step, over all ranks")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--models", type=Path, default=Path("/tmp/distillm_bench_scale/models"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/distillm_bench_scale/runs"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_scale.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher, student = write_models(args.models)
    rows = [run(name, teacher, student, args) for name in args.configs]
    one = next((r for r in rows if r["config"] == "one" and "error" not in r), None)
    for row in rows:
        if one is not None and "error" not in row:
            row["peak_vs_one"] = max(row["loading_mb"], row["steps_mb"]) / max(one["loading_mb"], one["steps_mb"])
            row["total_mb"] = row["ranks"] * max(row["loading_mb"], row["steps_mb"])
    print_table(rows, [("config", "config", "{}"), ("ranks", "ranks", "{}"),
                       ("loading_mb", "peak RSS/rank MB (loading)", "{:.0f}"),
                       ("steps_mb", "peak RSS/rank MB (steps)", "{:.0f}"),
                       ("trainable_m", "trainable M", "{:.1f}"), ("adamw_mb", "AdamW MB/rank", "{:.0f}"),
                       ("peak_vs_one", "peak/rank vs 1 process", "{:.2f}"), ("total_mb", "all ranks MB", "{:.0f}"),
                       ("tokens_per_s", "tokens/s", "{:.0f}"), ("generation_s", "generate s", "{:.1f}"),
                       ("error", "error", "{}")])
    write_json(args.out, rows, environment() | {"steps": args.steps, "batch": args.batch, "length": args.length})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
