"""distillm_ext's skew reverse KL in a plain PyTorch loop over Hugging Face models.

    python examples/distill_plain_loop.py --teacher TEACHER --student STUDENT --data train.jsonl

TEACHER and STUDENT: causal-LM directories (or hub names) that share a tokenizer. The data:
JSONL rows {"prompt": ..., "response": ...}. The loss is one call on the two models' logits.
"""

import argparse
import itertools

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import distillm_ext
from common import collate, distillation_loss, read_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(args.student).train()
    loss_fn = distillm_ext.make_loss("srkl", alpha=0.1)  # or fkl, rkl, skl, jsd, tvd
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)

    rows = read_rows(args.data)
    batches = itertools.cycle([rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)])
    for step in range(1, args.steps + 1):
        batch = collate(next(batches), tokenizer)
        labels = batch.pop("labels")
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits
        student_logits = student(**batch).logits
        loss = distillation_loss(loss_fn, student_logits, teacher_logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
