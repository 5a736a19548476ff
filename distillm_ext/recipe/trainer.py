"""The lean distillation loop: the wiring, the step and the loop. Each kind of thing sits behind
a seam, and the trainer never asks which kind it has:
- models.build_models: the teacher and the student, ready for the run (dtype, device, plan);
- parallel.make_plan (ddp or fsdp): wrapping, accumulation without gradient sync, the global
  gradient norm, the checkpoint's model and optimizer state;
- forwards.make_kd_path: both models' forwards, and the KD loss that reads them (kd_loss.py);
  the teacher's side comes from the live teacher or from its top-k cache (teacher_cache.py);
- the batch source (batches.py, sgo.py): the dataset, or fresh and replayed student outputs;
- checkpoint.Checkpointer: saving, and --resume.

One optimizer step: take this rank's micro-batches from the batch source; for each, the teacher
forward (no_grad), the student forward, the loss over response tokens (labels shifted by one,
-100 on prompt and padding; from hidden states by default), backward. The loss is a sum over
tokens divided by the number of response tokens in the whole global batch (all ranks, all
micro-batches), so gradient accumulation and any number of ranks give the gradient of one big
batch. With sgo.mode adaptive, the batch source hears every validation loss.

Run directory: config.json, metrics.jsonl, plots/*.png, checkpoints/step-*/, summary.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .batches import BatchSource, DatasetBatches, to_device
from .config import Config, check_adaptive_can_engage
from .data import load_split, pad_token_id
from .distributed import all_reduce_sum, init_runtime
from .evaluate import EvalResult, evaluate
from .forwards import make_kd_path
from .metrics import MetricsLog
from .models import build_models
from .optim import build_optimizer
from .parallel import make_plan
from .run_directory import check_output_dir, start_run
from .sgo import make_batch_source
from .step_stats import StepResult, StepStats, StepTimer, ThroughputClock
from .stopping import RunStopped, StopSignals
from .teacher_cache import open_teacher_cache

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm; the weights were never updated with it."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Distills config.teacher into config.student; `fit()` runs and returns the summary.

    `resume` continues the run in output.dir from its newest checkpoint; `overwrite` replaces a
    run already there (otherwise that is an error). Nothing in output.dir changes until the
    models and data have loaded.
    `callbacks`: functions called as `callback(trainer, step)` after every optimizer step
    (after any checkpoint of that step), for monitoring or fault-injection tests.
    """

    def __init__(self, config: Config, resume: bool = False, overwrite: bool = False,
                 callbacks: tuple[Callable[["Trainer", int], None], ...] = ()):
        self.config, self.callbacks = config, callbacks
        self.runtime = init_runtime()
        self.run_dir = Path(config.output.dir)
        check_output_dir(self.run_dir, resume, overwrite)
        resume_from = ckpt.latest_checkpoint(self.run_dir) if resume else None
        if resume and resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        seed_everything(config.train.seed)
        self.bf16 = config.train.bf16 and self.runtime.device.type == "cuda"
        self.plan = make_plan(config.train.parallel, self.runtime, self.bf16)
        models = build_models(config, self.plan, resume_from, self.bf16)
        self.teacher, self.student, self.tokenizer = models.teacher, models.student, models.tokenizer
        self.vocab_size = models.vocab_size
        self._load_data()
        cache = open_teacher_cache(config, self.tokenizer, self.train_examples, self.vocab_size)
        self.forwards, self.loss = make_kd_path(config.loss, self.student, models.student_forward, self.teacher,
                                                self.vocab_size, self._autocast, self.bf16, cache)
        self.optimizer, self.lr_schedule = build_optimizer(self.student, config.train, self.total_steps)
        self.checkpointer = ckpt.Checkpointer(self.run_dir, self.plan, self.runtime, config.output.keep_checkpoints)
        self.step = 0
        self.skipped_steps = 0  # non-finite gradients skipped (train.nonfinite=skip)
        self.history: dict = {"before": {}, "evals": []}
        if resume_from is not None:
            self._restore(resume_from)
        self.metrics = None  # the main rank's MetricsLog
        if self.runtime.is_main:
            start_run(self.run_dir, config, overwrite)
            self.metrics = MetricsLog(self.run_dir, tensorboard=config.output.tensorboard)
            if resume_from is not None:
                self.metrics.truncate_after(self.step)

    # -- set-up ------------------------------------------------------------------------------

    def _load_data(self) -> None:
        data, train, runtime = self.config.data, self.config.train, self.runtime
        self.train_examples = load_split(data, "train", self.tokenizer)
        self.val_examples = load_split(data, "validation", self.tokenizer, self.config.eval.num_examples)
        dataset = DatasetBatches(self.train_examples, train.batch_size, train.grad_accum,
                                 pad_token_id(self.tokenizer), train.seed, runtime.rank, runtime.world_size)
        self.total_steps = train.max_steps or train.epochs * dataset.steps_per_epoch
        check_adaptive_can_engage(self.config, self.total_steps)
        self.source: BatchSource = make_batch_source(
            dataset, self.config.sgo, self.student, max_length=data.max_length,
            max_prompt_length=data.max_prompt_length, pad_token_id=pad_token_id(self.tokenizer),
            eos_token_id=self.tokenizer.eos_token_id, vocab_size=self.vocab_size, total_steps=self.total_steps,
            seed=train.seed, rank=runtime.rank, device=runtime.device, autocast=self._autocast)

    def _restore(self, checkpoint: Path) -> None:
        state = self.checkpointer.restore(checkpoint, self.config, self.optimizer, {"source": self.source})
        self.step, self.skipped_steps, self.history = state["step"], state["skipped_steps"], state["history"]
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self._info(f"resumed from {checkpoint} at step {self.step}")

    def save(self) -> Path:
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "history": self.history,
                 "config": self.config.to_dict(), "lr_schedule": self.lr_schedule.state_dict()}
        path = self.checkpointer.save(self.step, self.student, self.tokenizer, self.optimizer, state,
                                      {"source": self.source}, {"vocab_size": self.vocab_size})
        self._info(f"saved checkpoint {path}")
        return path

    # -- helpers -----------------------------------------------------------------------------

    def _info(self, message: str) -> None:
        if self.runtime.is_main:
            log.info(message)

    def _write_metrics(self, record: dict) -> None:
        if self.metrics:
            self.metrics.write(record)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def evaluate(self, model) -> EvalResult:
        return evaluate(model, self.tokenizer, self.val_examples, self.config.eval, self.runtime.device,
                        self.vocab_size)

    # -- the step ----------------------------------------------------------------------------

    def train_step(self, timer: StepTimer) -> StepResult:
        """One optimizer step; its statistics stay on the device (no host sync here)."""
        device = self.runtime.device
        micro_batches = [to_device(b, device) for b in self.source.next_batch(self.step)]
        local_tokens = sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)
        global_tokens = all_reduce_sum(local_tokens.clone().float())
        # The loss of a step is the mean over its response tokens on every rank. DDP and FSDP
        # average gradients over ranks, so each rank divides its sum by global_tokens / world_size.
        num_items = global_tokens.clamp(min=1.0) / self.runtime.world_size
        kd_total = torch.zeros((), device=device)
        ce_total = torch.zeros((), device=device)
        for index, batch in enumerate(micro_batches):
            accumulating = index < len(micro_batches) - 1
            with self.plan.accumulating() if accumulating else contextlib.nullcontext():
                loss, kd, ce = self._micro_batch_loss(batch, timer, num_items)
                with timer.section("student_backward"):
                    loss.backward()
            kd_total += kd
            ce_total += ce
        lr = self.optimizer.param_groups[0]["lr"]
        with timer.section("optimizer"):
            grad_norm = self.plan.clip_grad_norm_(self.config.train.max_grad_norm or float("inf"))  # inf: no clipping
            # The one host sync of a step: a non-finite update must never reach the weights. The
            # norm is global (all-reduced gradients or shards), so every rank decides the same.
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        self.step += 1
        if not finite:
            self._on_nonfinite_gradient()
        tokens = sum(b["attention_mask"].sum() for b in micro_batches)
        stats = StepStats(kd_total, ce_total, local_tokens, tokens, torch.tensor(float(not finite), device=device))
        return StepResult(stats, grad_norm.detach(), lr)

    def _micro_batch_loss(self, batch: dict, timer: StepTimer, num_items: torch.Tensor):
        """(loss, kd, ce) of one micro-batch: both models' forwards, then the KD loss."""
        with timer.section("teacher_forward"):
            teacher = self.forwards.teacher_signal(batch)
        with timer.section("student_forward"):
            student = self.forwards.student_outputs(batch)
        with timer.section("loss"):
            result = self.loss(**student, teacher=teacher, targets=batch["labels"][:, 1:], num_items=num_items)
        self.plan.after_micro_batch()
        return result

    def _on_nonfinite_gradient(self) -> None:
        """train.nonfinite: stop (the weights are as the last step left them), or skip the step."""
        if self.config.train.nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite gradient norm at step {self.step}; the weights were not updated with it, and the "
                f"last good checkpoint is {ckpt.latest_checkpoint(self.run_dir)} (set train.nonfinite=skip "
                f"to skip such steps instead)")
        self.skipped_steps += 1
        log.warning("step %d: non-finite gradient norm, step skipped (%d so far)", self.step, self.skipped_steps)

    # -- the run -----------------------------------------------------------------------------

    def _log_interval(self, pending: list[StepResult], timer: StepTimer, clock: ThroughputClock, bar) -> None:
        """Reduces the steps since the last log, checks they were finite, writes one metrics line."""
        if not pending:
            return
        stats = StepStats.reduce([result.stats for result in pending])
        applied = stats.skipped == 0
        non_finite = torch.nonzero(applied & ~(stats.kd.isfinite() & stats.ce.isfinite())).flatten()
        if len(non_finite):
            raise NonFiniteError(
                f"non-finite loss at step {self.step - len(pending) + 1 + int(non_finite[0])}; the last good "
                f"checkpoint is {ckpt.latest_checkpoint(self.run_dir)}")
        kd, ce, response_tokens = (float(values[applied].sum()) for values in (stats.kd, stats.ce, stats.response_tokens))
        kd_ratio, grad_norm, elapsed = self.config.loss.kd_ratio, float(pending[-1].grad_norm), clock.lap()

        def per_token(total: float):  # None when every step of the interval was skipped
            return total / response_tokens if response_tokens else None

        record = {
            "kind": "train", "step": self.step, "epoch": self.source.epoch,
            "loss": per_token(kd_ratio * kd + (1 - kd_ratio) * ce),
            "kd_loss": per_token(kd), "ce_loss": per_token(ce) if kd_ratio < 1 else None,
            "skipped_steps": int((~applied).sum()),
            "lr": pending[-1].lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "tokens_per_s": float(stats.tokens.sum()) / elapsed, "source": self.source.name,
            "time": {name: round(seconds, 4) for name, seconds in timer.collect().items()},
            "elapsed_s": elapsed,
        }
        stats = self.source.take_stats()
        record["time"].update(stats.pop("time", {}))
        record.update(stats)
        self._write_metrics(record)
        if bar is not None and record["loss"] is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        pending.clear()

    def _validate(self, label: str, step: int) -> EvalResult:
        """Scores the student on the validation examples, logs it and writes a metrics line."""
        result = self.evaluate(self.student)
        self._info(f"{label}: val_loss {result.val_loss:.4f}, ROUGE-L {result.rouge_l:.2f} ({result.examples} examples)")
        self._write_metrics({"kind": "eval", "step": step, **result.to_dict()})
        return result

    def fit(self) -> dict:
        """Trains to train.max_steps (or the epochs) and returns the summary; RunStopped when
        stopped early by a signal, after a checkpoint."""
        if not self.history["before"]:
            if self.config.eval.teacher and self.teacher is not None:  # none loaded: teacher.cache serves it
                with self._autocast():
                    teacher = self.evaluate(self.teacher)
                self.history["before"]["teacher"] = teacher.to_dict()
                self._info(f"teacher: val_loss {teacher.val_loss:.4f}, ROUGE-L {teacher.rouge_l:.2f}")
            before = self._validate("student before", step=0)
            self.source.on_validation(before.val_loss, before_training=True)
            self.history["before"]["student"] = before.to_dict()
        with StopSignals(self.runtime.device, announce=self.runtime.is_main) as stop_signals:
            task = "sft" if self.config.loss.kd_ratio == 0 else "distill"  # no KD term: fine-tuning
            with tqdm(total=self.total_steps, initial=self.step, desc=task, dynamic_ncols=True,
                      disable=not self.runtime.is_main) as bar:
                self._train_loop(bar, stop_signals)
        if self.step < self.total_steps:
            raise RunStopped(f"stopped at step {self.step}; continue with --resume")
        return self._finish()

    def _train_loop(self, bar, stop_signals: StopSignals) -> None:
        output, interval = self.config.output, self.config.eval.interval
        timer, clock = StepTimer(self.runtime.device), ThroughputClock()
        pending: list[StepResult] = []
        while self.step < self.total_steps:
            pending.append(self.train_step(timer))
            bar.update(1)
            last = self.step == self.total_steps
            checkpoint_now = output.checkpoint_interval and self.step % output.checkpoint_interval == 0
            stop = stop_signals.requested()
            if last or stop or checkpoint_now or self.step % output.log_interval == 0:
                self._log_interval(pending, timer, clock, bar)
            if interval and self.step % interval == 0 and not last:
                with clock.paused():
                    result = self._validate(f"step {self.step}", self.step)
                    change = self.source.on_validation(result.val_loss)
                    if change:
                        self._info(change)
                    self.history["evals"].append({"step": self.step, **result.to_dict()})
            if last or stop or checkpoint_now:
                with clock.paused():
                    self.save()
            for callback in self.callbacks:
                callback(self, self.step)
            if stop:
                return

    def _finish(self) -> dict:
        after = self._validate("student after", self.step)
        self.history["evals"].append({"step": self.step, **after.to_dict()})
        summary = {
            "teacher": self.history["before"].get("teacher"),
            "student_before": self.history["before"]["student"],
            "student_after": after.to_dict(),
            "steps": self.step,
            "skipped_steps": self.skipped_steps,
            "checkpoint": str(ckpt.latest_checkpoint(self.run_dir)),
        }
        if self.runtime.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if self.config.output.plots:
                from .plots import plot_run

                plot_run(self.run_dir)
            self.metrics.close()
        return summary
