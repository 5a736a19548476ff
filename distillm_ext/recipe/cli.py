"""The `distillm` command: `distillm train` distills, `distillm sft` fine-tunes without a teacher,
`distillm cache-teacher` stores the teacher's top-k for training without it, `distillm eval`
scores a model, `distillm export` writes a run's model as one plain model directory.

Multi-process: `torchrun --nproc_per_node N -m distillm_ext.recipe.cli train ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

from .config import NO_TEACHER, SFT_SETTINGS, ConfigError, describe, load_config
from .distributed import shutdown

EXAMPLES = """\
examples:
  distillm train                                   # the built-in default (SmolLM2-135M -> 12 layers, WordNet)
  distillm train loss.type=srkl train.max_steps=20 output.dir=runs/srkl
  distillm train --config my_run.yaml --resume
  distillm train teacher.path=builtin-untuned      # distill from the instruct model before it was tuned
  distillm sft student.path=my_model output.dir=runs/sft   # fine-tune on the data set, no teacher
  distillm sft --builtin-teacher                   # make the built-in teacher now (else on first use)
  distillm cache-teacher cache.dir=runs/cache      # the teacher's top-32 at every response token, once
  distillm train teacher.cache=runs/cache          # ... then distill with no teacher in memory
  distillm eval --model runs/srkl                  # the run's newest checkpoint, with the run's own settings
  distillm train student.lora_r=16 output.dir=runs/lora   # a LoRA student (peft): the adapter alone trains
  distillm export runs/lora exported/              # the newest checkpoint, adapter merged, for from_pretrained
  torchrun --nproc_per_node 2 -m distillm_ext.recipe.cli train train.batch_size=16
"""


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="YAML or JSON file of {section: {key: value}}")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=20")


def build_parser() -> argparse.ArgumentParser:
    options = "config keys (KEY=VALUE, default shown):\n" + describe()
    parser = argparse.ArgumentParser(prog="distillm", description="DistiLLM knowledge distillation of causal LMs.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="distill the teacher into the student", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distills config.teacher into config.student and prints a before/after table. "
                    "Writes config.json, metrics.jsonl, plots/, checkpoints/ and summary.json to output.dir.",
        epilog=options + "\n\n" + EXAMPLES)
    sft = commands.add_parser(
        "sft", help="fine-tune student.path on the data set's responses, without a teacher",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Supervised fine-tuning through the same trainer: cross-entropy on the responses, no "
                    f"teacher (it sets {' '.join(SFT_SETTINGS)} over the config). The outputs are those of "
                    "`distillm train`.",
        epilog=options + "\n\n" + EXAMPLES)
    sft.add_argument("--builtin-teacher", action="store_true",
                     help="make the built-in teacher (the instruct model tuned on the built-in data) in the "
                          "cache, if it is not there yet, and print its directory; no other arguments")
    for command in (train, sft):
        _add_config_arguments(command)
        command.add_argument("--resume", action="store_true",
                             help="continue from the newest checkpoint in output.dir (exactly where it stopped)")
        command.add_argument("--overwrite", action="store_true",
                             help="replace a run already in output.dir (without it, that is an error)")
    cache = commands.add_parser(
        "cache-teacher", help="store the teacher's top-k log-probabilities on the train split, for teacher.cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs config.teacher once over the train split and writes, for every response position, "
                    "its cache.top_k most likely ids and their log-probabilities at loss.temperature to "
                    "cache.dir (safetensors shards and a manifest, about 4 bytes per kept id). "
                    "`distillm train teacher.cache=DIR` then trains from it. Started again with the same "
                    "config, a killed run continues where it stopped. Under torchrun every rank writes "
                    "its own shards.",
        epilog=options)
    _add_config_arguments(cache)
    cache.add_argument("--overwrite", action="store_true",
                       help="replace what cache.dir holds (without it, a cache for another config is an error)")
    evaluate = commands.add_parser(
        "eval", help="score a model: validation loss and ROUGE-L", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Scores a model on a data split: cross-entropy on the reference responses and ROUGE-L "
                    "of generated answers (settings from the eval.* keys). For a run directory or one of "
                    "its checkpoints, the settings start from the run's own config.json, so with no "
                    "overrides it reproduces the run's numbers.",
        epilog=options)
    export = commands.add_parser(
        "export", help="write a run's newest checkpoint as one plain model directory (LoRA merged)",
        description="Writes the newest checkpoint of RUN_DIR to OUT_DIR as a save_pretrained model with its "
                    "tokenizer, which AutoModelForCausalLM.from_pretrained loads without peft or this package. "
                    "A LoRA run's adapter is merged into its base; a full run's model is copied.")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    evaluate.add_argument("--model", required=True, metavar="PATH",
                          help='"teacher", "student" (the untrained config.student), a run directory '
                               "(its newest checkpoint), a checkpoint directory, or a model directory")
    evaluate.add_argument("--split", default="validation", choices=["validation", "test"])
    evaluate.add_argument("--output", metavar="FILE", help="also write the scores as JSON")
    _add_config_arguments(evaluate)
    return parser


def find_checkpoint(path: str) -> tuple[Optional[Path], Optional[Path]]:
    """(checkpoint, its run directory) for a run directory or a checkpoint; (None, None) for a
    plain model directory."""
    from .checkpoint import is_complete, latest_checkpoint

    directory = Path(path)
    if (directory / "checkpoints").is_dir():
        checkpoint = latest_checkpoint(directory)
        if checkpoint is None:
            raise ConfigError(f"--model {path}: the run directory has no complete checkpoint")
        return checkpoint, directory
    if is_complete(directory):
        run_dir = directory.parent.parent
        return directory, run_dir if (run_dir / "config.json").is_file() else None
    return None, None


def run_eval(args) -> dict:
    """Scores --model. For a run or one of its checkpoints the config is the run's own
    config.json, then --config, then the overrides; otherwise the default, --config, overrides."""
    import torch

    from .checkpoint import read_info
    from .data import load_split
    from .evaluate import evaluate
    from .models import load_student, load_teacher, load_trained

    checkpoint, run_dir = (None, None) if args.model in ("teacher", "student") else find_checkpoint(args.model)
    files = [str(run_dir / "config.json")] if run_dir else []
    config = load_config(files + ([args.config] if args.config else []), args.overrides)
    if args.model in ("teacher", "student"):
        model, tokenizer = load_teacher(config.teacher.path)
        vocab_size = model.get_output_embeddings().weight.shape[0]
        if args.model == "student":
            model, _ = load_student(config.student.path, config.student.keep_layers, config.teacher.path, tokenizer)
            vocab_size = min(vocab_size, model.get_output_embeddings().weight.shape[0])
    else:  # the teacher is not needed, nor loaded
        model, tokenizer = load_trained(checkpoint / "model" if checkpoint else Path(args.model), config)
        # A checkpoint knows the vocabulary it was distilled on (the teacher's may be smaller).
        vocab_size = read_info(checkpoint)["vocab_size"] if checkpoint else model.get_output_embeddings().weight.shape[0]
    examples = load_split(config.data, args.split, tokenizer, config.eval.num_examples)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate(model.to(device), tokenizer, examples, config.eval, device, vocab_size).to_dict()
    result.update(model=args.model, split=args.split)
    return result


def results_table(summary: dict) -> str:
    """The before/after table printed at the end of a run."""
    rows = [("teacher", summary.get("teacher")), ("student before", summary["student_before"]),
            ("student after", summary["student_after"])]
    lines = [f"{'model':<16} {'val loss':>9} {'ROUGE-L':>8}", "-" * 35]
    for name, result in rows:
        if result:
            lines.append(f"{name:<16} {result['val_loss']:>9.4f} {result['rougeL']:>8.2f}")
    teacher, before, after = (result for _, result in rows)
    if teacher:
        shares = [f"{gap_recovered(teacher[key], before[key], after[key]):.0%}" for key in ("val_loss", "rougeL")]
        lines.append(f"{'gap recovered':<16} {shares[0]:>9} {shares[1]:>8}")
    return "\n".join(lines)


def gap_recovered(teacher: float, before: float, after: float) -> float:
    """The share of the teacher's lead that training recovered: (after - before) / (teacher -
    before); 1 is the teacher's score, 0 no change, and a share above 1 passes the teacher."""
    return (after - before) / (teacher - before) if teacher != before else float("nan")


def missing_train_requirements() -> list:
    """The distributions of the `[train]` extra (pyproject.toml) that are not installed."""
    try:
        requirements = metadata.requires("distillm_ext") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return []
    missing = []
    for requirement in requirements:
        if not re.search(r"""extra\s*==\s*["']train["']""", requirement):
            continue
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def main(argv=None) -> int:
    missing = missing_train_requirements()
    if missing:
        print(f"distillm: the trainer needs the [train] extra, and {', '.join(missing)} "
              f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'distillm_ext[train]'",
              file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if args.command == "sft" and args.builtin_teacher:
            from .builtin_teacher import tuned_dir

            if args.config or args.overrides or args.resume or args.overwrite:
                raise ConfigError("sft --builtin-teacher makes the built-in teacher with its fixed recipe and "
                                  "takes no other arguments")
            print(tuned_dir())
        elif args.command in ("train", "sft"):
            from .stopping import RunStopped
            from .trainer import NonFiniteError, Trainer

            settings = SFT_SETTINGS if args.command == "sft" else []
            config = load_config(args.config, settings + args.overrides)  # the user may not contradict them
            if settings and config.teacher.path != NO_TEACHER:
                raise ConfigError(f"distillm sft trains without a teacher: config key 'teacher.path' must be "
                                  f"{NO_TEACHER}, got {config.teacher.path!r}")
            try:
                summary = Trainer(config, resume=args.resume, overwrite=args.overwrite).fit()
            except NonFiniteError as error:
                print(f"distillm: error: {error}", file=sys.stderr)
                return 1
            except RunStopped as stopped:
                print(f"distillm: {stopped}", file=sys.stderr)
                return 130
            print(results_table(summary))
            print(f"run directory: {config.output.dir}")
        elif args.command == "export":
            from .export import export

            checkpoint = export(Path(args.run_dir), Path(args.out_dir), overwrite=args.overwrite)
            print(f"exported {checkpoint} to {args.out_dir}")
        elif args.command == "cache-teacher":
            from .cache_teacher import cache_teacher

            config = load_config(args.config, args.overrides)
            manifest = cache_teacher(config, overwrite=args.overwrite)
            print(f"teacher cache: {manifest['data']['examples']} examples, {manifest['tokens']} tokens, top-"
                  f"{manifest['codec']['top_k']}, {manifest['bytes_per_token']} B/token in {config.cache.dir}")
        else:
            result = run_eval(args)
            print(json.dumps(result, indent=2))
            if args.output:
                Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    except (ConfigError, FileNotFoundError) as error:
        print(f"distillm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a checkpoint
        print("distillm: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


def exit_process(code: int) -> None:
    """sys.exit(code); in a torchrun launch, os._exit(code) after flushing, without interpreter
    teardown. After finished FSDP runs on gloo, a native thread still alive at teardown now and
    then aborted rank 0 (SIGABRT, "terminate called without an active exception"; 3 of some 40
    launches, even after destroy_process_group), which torchrun reports as a failed run. Every
    output is written and closed by then, so skipping the teardown loses nothing."""
    if "WORLD_SIZE" not in os.environ:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    """The `distillm` command."""
    exit_process(main())


if __name__ == "__main__":
    run()
