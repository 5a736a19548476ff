"""distillm_ext's skew KL inside a `transformers.Trainer`, through `compute_loss`.

    python examples/distill_hf_trainer.py --teacher TEACHER --student STUDENT --data train.jsonl

The Trainer brings its own loop (optimizer, schedule, accumulation, logging, checkpoints); the
distillation is only `compute_loss`. TRL's GKDTrainer can take the same loss the same way.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import distillm_ext
from common import collate, distillation_loss, read_rows


class DistillationTrainer(Trainer):
    def __init__(self, *args, teacher, loss_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.loss_fn = loss_fn

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        # num_items_in_batch (when the Trainer counts it) is the response tokens of every
        # micro-batch of the step, and of every rank with average_tokens_across_devices: the
        # loss divides by it, so accumulation averages as one big batch would, and the Trainer
        # must not divide again. Without it, the loss is this micro-batch's mean.
        loss = distillation_loss(self.loss_fn, outputs.logits, teacher_logits, labels, num_items=num_items_in_batch)
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients
        return (loss, outputs) if return_outputs else loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    training = TrainingArguments(output_dir=args.output_dir, max_steps=args.steps, learning_rate=args.lr,
                                 per_device_train_batch_size=args.batch_size,
                                 gradient_accumulation_steps=args.grad_accum, logging_steps=1,
                                 save_strategy="no", report_to=[], remove_unused_columns=False)
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.student), args=training,
        train_dataset=read_rows(args.data), data_collator=lambda rows: collate(rows, tokenizer),
        teacher=AutoModelForCausalLM.from_pretrained(args.teacher),
        loss_fn=distillm_ext.make_loss("skl", alpha=0.1))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"losses: {' '.join(f'{loss:.4f}' for loss in losses)}")


if __name__ == "__main__":
    main()
