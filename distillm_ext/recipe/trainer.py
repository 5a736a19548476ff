"""The lean distillation loop: a frozen teacher, a student, the fused KD loss, AdamW.

One optimizer step: take this rank's micro-batches from the batch source; for each, the teacher
forward (no_grad), the student forward, the loss over response tokens (labels shifted by one,
-100 on prompt and padding; kd_loss.py, from hidden states by default), backward. The models are
whole on every rank (DDP) or sharded (FSDP2; parallel.py). The loss is a sum over tokens divided
by the number of response tokens in the whole global batch (all ranks, all micro-batches), so
gradient accumulation and any number of ranks give the gradient of one big batch.

With sgo.mode on_policy or adaptive, the batch source (sgo.SGOBatches) may replace the dataset
batch with fresh or replayed student outputs; the adaptive schedule hears every validation loss.

Run directory: config.json, metrics.jsonl, plots/*.png, checkpoints/step-*/, summary.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .batches import BatchSource, DatasetBatches
from .config import Config, ConfigError, check_adaptive_can_engage
from .data import load_split, pad_token_id
from .distributed import all_reduce_sum, init_runtime
from .evaluate import EvalResult, evaluate
from .kd_loss import MicroBatchLoss
from .metrics import MetricsLog
from .models import load_causal_lm, load_student, load_teacher
from .parallel import (check_launch, full_model_state, gradient_sync, is_sharded, load_sharded_state,
                       release_teacher_root, shard, sharded_state)
from .run_directory import check_output_dir, start_run
from .sgo import SGOBatches

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm; the weights were never updated with it."""


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


class StepTimer:
    """Seconds per named section of a step; CUDA events on GPU so timing adds no host sync."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[str, object, object]] = []
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            start = time.perf_counter()
            yield
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def collect(self) -> dict[str, float]:
        """Totals since the last collect (synchronizes on GPU: call it when logging)."""
        for name, start, end in self._events:
            end.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        totals, self._events, self.totals = self.totals, [], {}
        return totals


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
        self.resume_from = ckpt.latest_checkpoint(self.run_dir) if resume else None
        if resume and self.resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        seed_everything(config.train.seed)
        self._stop_requested = False
        self._load_models()
        self._load_data()
        self.loss = MicroBatchLoss(config.loss, self.student, self.teacher, self.vocab_size, self.bf16)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay)
        self.step = 0
        self.skipped_steps = 0  # non-finite gradients skipped (train.nonfinite=skip)
        self.history: dict = {"before": {}, "evals": []}
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.metrics = None  # the main rank's MetricsLog
        if self.runtime.is_main:
            start_run(self.run_dir, config, overwrite)
            self.metrics = MetricsLog(self.run_dir, tensorboard=config.output.tensorboard)
            if self.resume_from is not None:
                self.metrics.truncate_after(self.step)

    # -- set-up ------------------------------------------------------------------------------

    def _load_models(self) -> None:
        config, device = self.config, self.runtime.device
        check_launch(config.train.parallel)
        self.teacher, self.tokenizer = load_teacher(config.teacher.path)
        if self.resume_from is not None:
            self.student, _ = load_causal_lm(str(self.resume_from / "model"), "student")
            self.student.train()
        else:
            self.student = load_student(config.student.path, config.student.keep_layers, self.teacher, self.tokenizer)
        self.bf16 = config.train.bf16 and device.type == "cuda"
        if self.bf16:
            self.teacher.to(torch.bfloat16)
        self.teacher.to(device)
        self.student.to(device)
        # Vocabularies padded to different multiples (152064 vs 151936) share their first rows.
        self.vocab_size = min(self.teacher.get_output_embeddings().weight.shape[0],
                              self.student.get_output_embeddings().weight.shape[0])
        if len(self.tokenizer) > self.vocab_size:
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} tokens but a model outputs only {self.vocab_size}")
        self.model = self.student  # what the student's training forward goes through
        if config.train.parallel == "fsdp":
            shard(self.teacher, device, frozen=True)
            shard(self.student, device, frozen=False, bf16=self.bf16)
            for model in (self.student, self.teacher):  # generation runs outside forward()
                register_fsdp_forward_method(model, "generate")
        elif self.runtime.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None)

    def _load_data(self) -> None:
        data, runtime = self.config.data, self.runtime
        self.train_examples = load_split(data, "train", self.tokenizer)
        self.val_examples = load_split(data, "validation", self.tokenizer, self.config.eval.num_examples)
        train, sgo = self.config.train, self.config.sgo
        dataset = DatasetBatches(self.train_examples, train.batch_size, train.grad_accum,
                                 pad_token_id(self.tokenizer), train.seed, runtime.rank, runtime.world_size)
        self.total_steps = train.max_steps or train.epochs * dataset.steps_per_epoch
        check_adaptive_can_engage(self.config, self.total_steps)
        self.source: BatchSource = dataset
        if sgo.mode != "off":
            self.source = SGOBatches(
                dataset, self.student, sgo, max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                pad_token_id=pad_token_id(self.tokenizer), eos_token_id=self.tokenizer.eos_token_id,
                vocab_size=self.vocab_size, total_steps=self.total_steps, seed=train.seed, rank=runtime.rank,
                device=runtime.device, autocast=self._autocast)

    # Keys whose change would make a checkpoint's state mean something else (the batch source's
    # kind, the replay buffer's shape): --resume refuses them rather than misreading the state.
    RESUME_FIXED_KEYS = ("sgo.mode", "sgo.buffer_size", "data.max_length")

    def _check_resumable(self, checkpoint: Path, saved: dict) -> None:
        info = ckpt.read_info(checkpoint)
        if info["world_size"] != self.runtime.world_size:
            raise ConfigError(
                f"--resume: {checkpoint} was saved by {info['world_size']} process(es), and this run has "
                f"{self.runtime.world_size}; resume with torchrun --nproc_per_node {info['world_size']} "
                f"(x nodes) so that every rank finds its own state")
        for key in self.RESUME_FIXED_KEYS:
            section, name = key.split(".")
            before, now = saved[section][name], getattr(getattr(self.config, section), name)
            if before != now:
                raise ConfigError(f"--resume: {key} was {before!r} in {checkpoint}, and is {now!r} now; "
                                  f"resume with {key}={before}, or start a new run")

    def _restore(self, checkpoint: Path) -> None:
        state = ckpt.load_trainer_state(checkpoint)
        self._check_resumable(checkpoint, state["config"])  # before reading this rank's own file
        rank_state = ckpt.load_rank_state(checkpoint)
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        if is_sharded(self.student):
            load_sharded_state(self.student, self.optimizer, checkpoint / ckpt.SHARDED_DIR)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.source.load_state_dict(rank_state["source"])
        self.history = state["history"]
        ckpt.set_rng_state(rank_state["rng"])
        self._info(f"resumed from {checkpoint} at step {self.step}")

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

    def save(self) -> Path:
        sharded = is_sharded(self.student)  # fsdp: the optimizer state goes to sharded/, not to rank 0
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "history": self.history,
                 "config": self.config.to_dict(), "optimizer": None if sharded else self.optimizer.state_dict()}
        info = {"vocab_size": self.vocab_size, "world_size": self.runtime.world_size}
        path = ckpt.save_checkpoint(
            self.run_dir, self.step, self.student, self.tokenizer, state, {"source": self.source.state_dict()}, info,
            self.config.output.keep_checkpoints, model_state=full_model_state(self.student) if sharded else None,
            sharded_state=sharded_state(self.student, self.optimizer) if sharded else None)
        self._info(f"saved checkpoint {path}")
        return path

    # -- the step ----------------------------------------------------------------------------

    def train_step(self, timer: StepTimer) -> dict[str, torch.Tensor]:
        """One optimizer step; returns device tensors (no host sync here)."""
        device = self.runtime.device
        micro_batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in self.source.next_batch(self.step)]
        local_tokens = sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)
        global_tokens = all_reduce_sum(local_tokens.clone().float())
        # The loss of a step is the mean over its response tokens on every rank. DDP and FSDP
        # average gradients over ranks, so each rank divides its sum by global_tokens / world_size.
        num_items = global_tokens.clamp(min=1.0) / self.runtime.world_size
        kd_total = torch.zeros((), device=device)
        ce_total = torch.zeros((), device=device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with gradient_sync(self.model, enabled=last):
                loss, kd, ce = self.loss(self.model, self.teacher, batch, timer, self._autocast, num_items)
                release_teacher_root(self.teacher)
                with timer.section("student_backward"):
                    loss.backward()
            kd_total += kd
            ce_total += ce
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.train.lr * lr_factor(
                self.step, self.config.train.warmup_steps, self.total_steps, self.config.train.schedule)
        with timer.section("optimizer"):
            max_norm = self.config.train.max_grad_norm or float("inf")  # inf: measure the norm, clip nothing
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
            if isinstance(grad_norm, DTensor):  # fsdp: the norm over every rank's shards
                grad_norm = grad_norm.full_tensor()
            # The one host sync of a step: a non-finite update must never reach the weights. Under
            # DDP the gradients are already all-reduced, so every rank decides the same.
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not finite:
            self._on_nonfinite_gradient()
        sums = torch.stack([kd_total, ce_total, local_tokens.float(),
                            sum(b["attention_mask"].sum() for b in micro_batches).float(),
                            torch.tensor(float(not finite), device=device)])
        return {"sums": sums, "grad_norm": grad_norm.detach()}

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

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True
        signal.signal(signum, signal.default_int_handler)  # a second Ctrl-C stops at once
        if self.runtime.is_main:
            log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to abort)")

    def _should_stop(self) -> bool:
        flag = torch.tensor([float(self._stop_requested)], device=self.runtime.device)
        return bool(all_reduce_sum(flag).item() > 0) if self.runtime.distributed else self._stop_requested

    def _log_interval(self, pending: list[dict], timer: StepTimer, started: float, bar) -> None:
        """Reduces the steps since the last log, checks they were finite, writes one metrics line."""
        if not pending:
            return
        first_step = self.step - len(pending) + 1
        # (steps, 5): kd, ce, response tokens, tokens, skipped (summed over ranks: world_size when skipped)
        sums = all_reduce_sum(torch.stack([p["sums"] for p in pending])).cpu()
        applied = sums[sums[:, 4] == 0]
        for offset, row in enumerate(sums):
            if row[4] == 0 and not torch.isfinite(row[:2]).all():
                raise NonFiniteError(
                    f"non-finite loss at step {first_step + offset}; the last good checkpoint is "
                    f"{ckpt.latest_checkpoint(self.run_dir)}")
        elapsed = time.perf_counter() - started
        kd, ce, response_tokens, _, _ = applied.sum(0).tolist()
        tokens = sums[:, 3].sum().item()
        kd_ratio, grad_norm = self.config.loss.kd_ratio, float(pending[-1]["grad_norm"])

        def per_token(total: float):  # None when every step of the interval was skipped
            return total / response_tokens if response_tokens else None

        record = {
            "kind": "train", "step": self.step, "epoch": self.source.epoch,
            "loss": per_token(kd_ratio * kd + (1 - kd_ratio) * ce),
            "kd_loss": per_token(kd), "ce_loss": per_token(ce) if kd_ratio < 1 else None,
            "skipped_steps": len(pending) - len(applied),
            "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "tokens_per_s": tokens / elapsed, "source": self.source.name,
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

    def _evaluate_student(self, label: str) -> EvalResult:
        result = self.evaluate(self.student)
        self._info(f"{label}: val_loss {result.val_loss:.4f}, ROUGE-L {result.rouge_l:.2f} ({result.examples} examples)")
        return result

    def fit(self) -> dict:
        config, runtime = self.config, self.runtime
        if not self.history["before"]:
            if config.eval.teacher:
                with self._autocast():
                    teacher = self.evaluate(self.teacher)
                self.history["before"]["teacher"] = teacher.to_dict()
                self._info(f"teacher: val_loss {teacher.val_loss:.4f}, ROUGE-L {teacher.rouge_l:.2f}")
            before = self._evaluate_student("student before")
            self.source.on_validation(before.val_loss, before_training=True)
            self.history["before"]["student"] = before.to_dict()
            self._write_metrics({"kind": "eval", "step": 0, **before.to_dict()})
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=self.total_steps, initial=self.step, desc="distill", dynamic_ncols=True,
                   disable=not runtime.is_main)
        try:
            self._train_loop(bar)
        finally:
            bar.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.step < self.total_steps:  # stopped by a signal, checkpoint saved
            raise KeyboardInterrupt(f"stopped at step {self.step}; continue with --resume")
        return self._finish()

    def _train_loop(self, bar) -> None:
        config = self.config
        timer = StepTimer(self.runtime.device)
        pending: list[dict] = []
        started = time.perf_counter()
        while self.step < self.total_steps:
            pending.append(self.train_step(timer))
            bar.update(1)
            last = self.step == self.total_steps
            checkpoint_now = config.output.checkpoint_interval and self.step % config.output.checkpoint_interval == 0
            stop = self._should_stop()
            if last or stop or checkpoint_now or self.step % config.output.log_interval == 0:
                self._log_interval(pending, timer, started, bar)
                started = time.perf_counter()
            if config.eval.interval and self.step % config.eval.interval == 0 and not last:
                result = self._evaluate_student(f"step {self.step}")
                change = self.source.on_validation(result.val_loss)
                if change:
                    self._info(change)
                self.history["evals"].append({"step": self.step, **result.to_dict()})
                self._write_metrics({"kind": "eval", "step": self.step, **result.to_dict()})
                started = time.perf_counter()
            if last or stop or checkpoint_now:
                self.save()
                started = time.perf_counter()
            for callback in self.callbacks:
                callback(self, self.step)
            if stop:
                return

    def _finish(self) -> dict:
        after = self._evaluate_student("student after")
        self.history["evals"].append({"step": self.step, **after.to_dict()})
        self._write_metrics({"kind": "eval", "step": self.step, **after.to_dict()})
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


def results_table(summary: dict) -> str:
    """The before/after table printed at the end of a run."""
    rows = [("teacher", summary.get("teacher")), ("student before", summary["student_before"]),
            ("student after", summary["student_after"])]
    lines = [f"{'model':<16} {'val loss':>9} {'ROUGE-L':>8}", "-" * 35]
    for name, result in rows:
        if result:
            lines.append(f"{name:<16} {result['val_loss']:>9.4f} {result['rougeL']:>8.2f}")
    return "\n".join(lines)
