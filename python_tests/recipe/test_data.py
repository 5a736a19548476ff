"""Tokenization and batching: labels follow the Hugging Face convention exactly."""

import pytest
import torch
from tiny_models import TEMPLATE, make_tokenizer

from distillm_ext.recipe.data import Example, collate_for_training, collate_prompts, encode_examples


def test_labels_mask_prompt_and_padding_and_keep_eos():
    tokenizer = make_tokenizer()
    encoded = encode_examples([Example("define the noun cat .", "a small animal that purrs"),
                               Example("define the noun key .", "a thing")], tokenizer, TEMPLATE, 24, 12)
    batch = collate_for_training(encoded, tokenizer.pad_token_id)
    first, second = encoded
    n_prompt = len(first.prompt_ids)
    assert tokenizer.decode(first.prompt_ids) == "Q: define the noun cat . A:"
    assert first.response_ids[-1] == tokenizer.eos_token_id
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (labels[0, :n_prompt] == -100).all()
    assert labels[0, n_prompt:].tolist() == first.response_ids == ids[0, n_prompt:].tolist()
    n_second = len(second.prompt_ids) + len(second.response_ids)
    assert (labels[1, n_second:] == -100).all() and (mask[1, n_second:] == 0).all()
    assert (ids[1, n_second:] == tokenizer.pad_token_id).all() and (mask[1, :n_second] == 1).all()


def test_long_responses_are_truncated_to_max_length():
    tokenizer = make_tokenizer()
    (encoded,) = encode_examples([Example("define the noun cat .", "a small animal that purrs " * 5)],
                                 tokenizer, TEMPLATE, 12, 10)
    assert len(encoded.prompt_ids) + len(encoded.response_ids) == 12


def test_prompts_are_left_padded_for_generation():
    tokenizer = make_tokenizer()
    encoded = encode_examples([Example("define cat .", "a"), Example("define the noun river .", "a")],
                              tokenizer, TEMPLATE, 24, 12)
    batch = collate_prompts(encoded, tokenizer.pad_token_id)
    assert batch["input_ids"][0, -len(encoded[0].prompt_ids):].tolist() == encoded[0].prompt_ids
    assert batch["attention_mask"][0].tolist() == [0, 0] + [1] * len(encoded[0].prompt_ids)
    assert torch.equal(batch["input_ids"][1], torch.tensor(encoded[1].prompt_ids))


def test_the_chat_template_gets_the_configured_system_message_or_its_own_default():
    tokenizer = make_tokenizer(extra_words=("S:", "persona"))
    # Like SmolLM2's: a default system message unless the conversation starts with one.
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}S: persona {% endif %}"
                               "{% for m in messages %}{% if m['role'] == 'system' %}S: {{ m['content'] }} "
                               "{% else %}Q: {{ m['content'] }} A:{% endif %}{% endfor %}")
    example = [Example("define the noun cat .", "a")]

    def prompt(system_prompt):
        (encoded,) = encode_examples(example, tokenizer, "chat", 24, 12, system_prompt=system_prompt)
        return tokenizer.decode(encoded.prompt_ids)

    assert prompt(None) == "S: persona Q: define the noun cat . A:"
    assert prompt("") == "S: Q: define the noun cat . A:"
    assert prompt("cat") == "S: cat Q: define the noun cat . A:"


def test_a_system_prompt_needs_the_chat_template():
    from distillm_ext.recipe.config import ConfigError, load_config

    assert load_config(None, ["data.template=Q: {prompt} A:"]).data.system_prompt == ""
    assert load_config(None, ["data.system_prompt=none"]).data.system_prompt is None
    with pytest.raises(ConfigError, match="data.system_prompt"):
        load_config(None, ["data.template=Q: {prompt} A:", "data.system_prompt=be brief"])


def test_datasets_folder_arrow_file_and_gzipped_jsonl_load_the_same_examples(tmp_path):
    import gzip
    import json

    import datasets

    from distillm_ext.recipe.data import load_examples

    rows = [{"prompt": f"define word {i} .", "response": f"gloss {i}"} for i in range(5)]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    splits.save_to_disk(str(tmp_path / "saved"))
    (arrow_file,) = (tmp_path / "saved" / "train").glob("*.arrow")
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    expected = [Example(r["prompt"], r["response"]) for r in rows]
    for source in (tmp_path / "saved", arrow_file, tmp_path / "rows.jsonl.gz", tmp_path / "rows.json"):
        assert load_examples(str(source), "train") == expected, source
