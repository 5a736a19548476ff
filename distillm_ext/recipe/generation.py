"""Generation with exactly our settings: nothing from the checkpoint's generation_config.json.

`model.generate` fills every field our GenerationConfig leaves unset from the model's own
`generation_config` (transformers 5), and transformers 4.50-4.57 also replace fields we set to
their global default (`do_sample=False`, `temperature=1.0`, `top_p=1.0`) with the model's
values. A checkpoint shipping `repetition_penalty: 3.0` would then silently change SGO sampling
and "greedy" evaluation. So during our call the model's generation_config *is* ours: both merge
rules see nothing to take.

Ids at or beyond `vocab_size` (the vocabulary both models share; a student's padded embedding
rows) are never generated: the teacher has no distribution over them.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .parallel import gathered_for_generation


def generation_config(*, max_new_tokens: int, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0, pad_token_id: int, eos_token_id: int) -> GenerationConfig:
    """Every decoding choice spelled out; the sampling knobs only when sampling."""
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1,
                            pad_token_id=pad_token_id, eos_token_id=eos_token_id, **sampling)


class VocabularyLimit(LogitsProcessor):
    """Sets the scores of ids >= vocab_size to -inf, so they are never chosen."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.vocab_size:
            scores = scores.clone()
            scores[:, self.vocab_size:] = -float("inf")
        return scores


@contextlib.contextmanager
def _model_settings(model, settings: GenerationConfig):
    saved = model.generation_config
    model.generation_config = settings
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate_with_settings(model, inputs: dict[str, torch.Tensor], settings: GenerationConfig, vocab_size: int) -> torch.Tensor:
    """`model.generate(**inputs)` with `settings` alone, never emitting an id >= vocab_size."""
    with _model_settings(model, settings), gathered_for_generation(model) as in_step:
        return model.generate(**inputs, generation_config=settings, synced_gpus=in_step,
                              logits_processor=LogitsProcessorList([VocabularyLimit(vocab_size)]))
