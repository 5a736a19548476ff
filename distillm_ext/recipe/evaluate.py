"""Evaluation: cross-entropy on ground-truth responses, and ROUGE-L of generated answers.

The validation loss (student CE on the reference responses, per token) is the signal the
adaptive SGO schedule watches; ROUGE-L (rouge-score, stemmed, F-measure x 100) of answers
generated from the prompts is the paper's quality metric. Under torch.distributed each rank
scores its shard of the examples and the sums are all-reduced, so every rank gets the same
numbers.

Both see the model over its first `vocab_size` rows only, the vocabulary it was distilled on:
the CE normalizes over those rows, and generation never picks a row beyond them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import EvalConfig
from .data import EncodedExample, collate_for_training, collate_prompts, pad_token_id
from .distributed import all_reduce_sum, rank, world_size
from .generation import generate_with_settings, generation_config
from .parallel import is_sharded


@dataclass
class EvalResult:
    val_loss: float  # mean cross-entropy per response token (nats)
    rouge_l: float  # mean ROUGE-L F-measure x 100
    examples: int

    def to_dict(self) -> dict:
        return {"val_loss": self.val_loss, "rougeL": self.rouge_l, "examples": self.examples}


def _batches(items: list, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


@torch.no_grad()
def response_cross_entropy(model, examples: list[EncodedExample], pad_id: int, batch_size: int,
                           device: torch.device, vocab_size: int, counted: Optional[int] = None) -> tuple[float, int]:
    """(sum of per-token CE over the response tokens, number of those tokens) on this rank's
    examples; only the first `counted` count (default: all), the rest are run and ignored."""
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    counted = len(examples) if counted is None else counted
    for index, chunk in enumerate(_batches(examples, batch_size)):
        batch = {k: v.to(device) for k, v in collate_for_training(chunk, pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        targets = batch["labels"][:, 1:]
        targets[max(counted - index * batch_size, 0):] = -100  # the ignored rest
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1, :vocab_size].flatten(0, 1).float(), targets.flatten(), reduction="sum").double()
        tokens += int((targets != -100).sum())
    return float(total), tokens


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[EncodedExample], settings: EvalConfig,
                     device: torch.device, vocab_size: int) -> list[str]:
    """Answers generated from each example's prompt (special tokens removed)."""
    pad_id = pad_token_id(tokenizer)
    generation = generation_config(
        max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, temperature=settings.temperature,
        top_p=settings.top_p, top_k=settings.top_k, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    answers = []
    for chunk in _batches(examples, settings.batch_size):
        batch = {k: v.to(device) for k, v in collate_prompts(chunk, pad_id).items()}
        output = generate_with_settings(model, batch, generation, vocab_size)
        answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return [answer.strip() for answer in answers]


def rouge_l_sum(predictions: list[str], references: list[str]) -> float:
    """Sum over pairs of ROUGE-L F-measure x 100 (stemmed, as in the DistiLLM paper)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(100.0 * scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references))


def evaluate(model, tokenizer, examples: list[EncodedExample], settings: EvalConfig, device: torch.device,
             vocab_size: int) -> EvalResult:
    """Validation CE and ROUGE-L of `model`'s first `vocab_size` rows on `examples` (all ranks together)."""
    was_training = model.training
    model.eval()
    local = examples[rank()::world_size()]
    run = local
    if is_sharded(model) and examples:  # every rank must run as many forwards as the others
        run = local + examples[:1] * (-(-len(examples) // world_size()) - len(local))
    loss_sum, tokens = response_cross_entropy(model, run, pad_token_id(tokenizer), settings.batch_size, device,
                                              vocab_size, counted=len(local))
    answers = generate_answers(model, tokenizer, run, settings, device, vocab_size)[:len(local)]
    rouge_sum = rouge_l_sum(answers, [e.reference for e in local])
    model.train(was_training)
    totals = all_reduce_sum(torch.tensor([loss_sum, tokens, rouge_sum, len(local)], dtype=torch.float64, device=device))
    loss_sum, tokens, rouge_sum, count = totals.tolist()
    return EvalResult(val_loss=loss_sum / max(tokens, 1), rouge_l=rouge_sum / max(count, 1), examples=int(count))
