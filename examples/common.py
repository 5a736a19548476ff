"""What both examples share: JSONL {"prompt", "response"} rows as causal-LM training batches."""

import json

import torch


def read_rows(path: str) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def collate(rows: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask` of prompt + " " + response + EOS, and
    `labels`: the same ids, -100 on the prompt and the padding (the loss sees responses only)."""
    sequences, prompt_lengths = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(" " + row["response"], add_special_tokens=False)["input_ids"]
        sequences.append(prompt + response + [tokenizer.eos_token_id])
        prompt_lengths.append(len(prompt))
    length = max(map(len, sequences))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, prompt_length:len(ids)] = torch.tensor(ids[prompt_length:])
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def distillation_loss(loss_fn, student_logits, teacher_logits, labels, num_items=None):
    """The loss at each position against the next token: logits[:, :-1] read in place, labels
    shifted by one, both vocabularies cut to the shared rows (checkpoints pad them differently).
    num_items: the mean's denominator, if not this batch's valid positions."""
    vocab = min(student_logits.size(-1), teacher_logits.size(-1))
    return loss_fn(student_logits[:, :-1, :vocab], teacher_logits[:, :-1, :vocab], labels[:, 1:], num_items=num_items)
