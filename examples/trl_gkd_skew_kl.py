"""DistiLLM's skew KL as the divergence of TRL's GKDTrainer, with a peft LoRA student.

    pip install "distillm_ext[train,examples]"
    python examples/trl_gkd_skew_kl.py --teacher TEACHER --student STUDENT --data train.jsonl

GKDTrainer brings its loop and on-policy generation (`lmbda`: the share of steps on the
student's own answers); adopting our loss is one method, `generalized_jsd_loss`, which its
`compute_loss` calls with both models' shifted logits and the labels:

    class SkewKLGKDTrainer(GKDTrainer):
        def generalized_jsd_loss(self, student_logits, teacher_logits, labels=None,
                                 num_items_in_batch=None, **unused):
            return self.skew_kl(student_logits, teacher_logits, labels, num_items=num_items_in_batch)
"""

import argparse
import os

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import distillm_ext
from common import collate, read_rows

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental (TRL 1.x)
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402


class SkewKLGKDTrainer(GKDTrainer):
    """GKD with DistiLLM's SKL_alpha in place of its generalized Jensen-Shannon divergence."""

    def __init__(self, *args, alpha: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.skew_kl = distillm_ext.make_loss("skl", alpha=alpha, temperature=self.temperature)

    def generalized_jsd_loss(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None, **unused):
        # num_items_in_batch (when the Trainer counts it) is the response tokens of the whole
        # step, so accumulation averages as one big batch; else this micro-batch's mean.
        return self.skew_kl(student_logits, teacher_logits, labels, num_items=num_items_in_batch)


def collate_with_prompts(rows: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """common.collate, plus the left-padded prompts GKDTrainer generates from on-policy steps."""
    batch = collate(rows, tokenizer)
    prompts = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
    width = max(map(len, prompts))
    batch["prompts"] = torch.full((len(rows), width), tokenizer.pad_token_id)
    batch["prompt_attention_mask"] = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        batch["prompts"][i, width - len(ids):] = torch.tensor(ids)
        batch["prompt_attention_mask"][i, width - len(ids):] = 1
    return batch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output-dir", default="runs/trl_gkd")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lmbda", type=float, default=0.5, help="share of on-policy steps (student answers)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=8)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    config = GKDConfig(output_dir=args.output_dir, max_steps=args.steps, learning_rate=args.lr,
                       per_device_train_batch_size=args.batch_size, lmbda=args.lmbda,
                       max_new_tokens=args.max_new_tokens, logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=not torch.cuda.is_available())
    trainer = SkewKLGKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.student), teacher_model=AutoModelForCausalLM.from_pretrained(
            args.teacher), args=config, train_dataset=Dataset.from_list(read_rows(args.data)), processing_class=tokenizer,
        data_collator=lambda rows: collate_with_prompts(rows, tokenizer),
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear",
                               task_type="CAUSAL_LM"))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainable, total = trainer.model.get_nb_trainable_parameters()
    print(f"LoRA student: {trainable} of {total} parameters trained")
    print("losses:", " ".join(f"{loss:.6f}" for loss in losses))


if __name__ == "__main__":
    main()
