"""Bad input to the trainer and the `distillm` command: each error names the problem."""

import json
import logging

import pytest
from tiny_models import examples, make_model, make_tokenizer, overrides, write_jsonl
from transformers import ViTConfig

from distillm_ext.recipe.cli import main
from distillm_ext.recipe.config import ConfigError, load_config
from distillm_ext.recipe.trainer import Trainer


def build_trainer(tiny, tmp_path, **extra):
    return Trainer(load_config(None, overrides(tiny, tmp_path / "run", **extra)))


def test_missing_data_file(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"data.train: data file .*nowhere.jsonl does not exist"):
        build_trainer(tiny, tmp_path, data__train=tmp_path / "nowhere.jsonl")


def test_malformed_json_line_names_file_and_line(tiny, tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(row) for row in examples(4)]
    lines[2] = lines[2][:-3]  # cut the closing quote and brace
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"broken.jsonl: malformed JSON on line 3"):
        build_trainer(tiny, tmp_path, data__train=path)


def test_missing_prompt_field(tiny, tmp_path):
    path = write_jsonl(tmp_path / "renamed.jsonl", [{"question": r["prompt"], "response": r["response"]}
                                                    for r in examples(4)])
    with pytest.raises(ConfigError, match=r"example 1 of .*renamed.jsonl has no field 'prompt'.*question"):
        build_trainer(tiny, tmp_path, data__train=path)


def test_unknown_loss_type():
    with pytest.raises(ConfigError, match=r"'loss.type' must be one of .*srkl.*got 'kl'"):
        load_config(None, ["loss.type=kl"])


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*train.max_steps"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian.lr'.*teacher, student, data"):
        load_config(None, ["trian.lr=3"])


def test_wrong_value_type_on_command_line_and_in_file(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.max_steps' expects int, got 'many'"):
        load_config(None, ["train.max_steps=many"])
    config_file = tmp_path / "run.yaml"
    config_file.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"'train.lr' expects float, got 'fast'"):
        load_config(str(config_file))


def test_config_file_and_overrides_combine(tmp_path):
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"loss": {"type": "srkl", "alpha": 0.2}, "train": {"max_steps": 7}}))
    config = load_config(str(config_file), ["train.max_steps=9", "student.keep_layers=0,29", "eval.do_sample=true"])
    assert (config.loss.type, config.loss.alpha, config.train.max_steps) == ("srkl", 0.2, 9)
    assert config.student.keep_layers == [0, 29] and config.eval.do_sample is True


def test_model_directory_that_is_not_a_causal_lm(tiny, tmp_path):
    not_lm = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(not_lm)
    with pytest.raises(ConfigError, match=r"teacher.path .*vit.* holds a 'vit' model, which is not a causal language model"):
        build_trainer(tiny, tmp_path, teacher__path=not_lm)
    with pytest.raises(ConfigError, match=r"not a Hugging Face model directory \(no config.json\)"):
        build_trainer(tiny, tmp_path, teacher__path=tmp_path)


def test_tokenizer_mismatch(tiny, tmp_path):
    other = tmp_path / "other_student"
    tokenizer = make_tokenizer(extra_words=("zebra",))
    make_model(len(tokenizer), 2).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match=r"teacher and student tokenizers differ .*zebra"):
        build_trainer(tiny, tmp_path, student__path=other)


def test_separate_student_directory_trains(tiny, tmp_path):
    trainer = build_trainer(tiny, tmp_path, student__path=tiny["student"], train__max_steps=2)
    assert trainer.student.config.num_hidden_layers == 2
    assert trainer.fit()["steps"] == 2


def test_bad_keep_layers(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"student.keep_layers must be distinct layer indices in \[0, 4\)"):
        build_trainer(tiny, tmp_path, student__keep_layers="0,7")


def test_long_prompts_are_dropped_with_a_count(tiny, tmp_path, caplog):
    rows = examples(16)
    rows[0]["prompt"] = " ".join(["define the noun cat"] * 10)
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        trainer = build_trainer(tiny, tmp_path, data__train=path)
    assert "train: dropped 1 of 16 examples whose prompt is longer than data.max_prompt_length=12" in caplog.text
    assert len(trainer.train_examples) == 15


def test_cli_help_documents_every_option(capsys):
    for command in ("train", "eval"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for key in ("teacher.path", "student.keep_layers", "data.template", "loss.kd_ratio", "train.grad_accum",
                    "train.schedule", "eval.top_p", "output.keep_checkpoints"):
            assert key in text


def test_cli_reports_config_errors(capsys):
    assert main(["train", "loss.type=nope"]) == 2
    assert "distillm: error: config key 'loss.type' must be one of" in capsys.readouterr().err


def test_cli_eval_scores_a_model(tiny, tmp_path, capsys):
    out = tmp_path / "scores.json"
    args = overrides(tiny, tmp_path / "run")
    assert main(["eval", "--model", str(tiny["student"]), "--output", str(out), *args]) == 0
    scores = json.loads(out.read_text())
    assert scores["examples"] == 4 and scores["val_loss"] > 0 and 0 <= scores["rougeL"] <= 100


def test_batch_larger_than_the_data(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_size=64 is larger than the 32 training examples"):
        build_trainer(tiny, tmp_path, train__batch_size=64)


def test_distillm_without_the_train_extra_says_what_to_install(monkeypatch, capsys):
    from distillm_ext.recipe import cli

    requirements = ["torch>=2.4", 'pytest; extra == "test"', 'surely-not-installed-xyz>=1; extra == "train"']
    monkeypatch.setattr(cli.metadata, "requires", lambda name: requirements)
    assert main(["train"]) == 2
    message = capsys.readouterr().err
    assert "surely-not-installed-xyz" in message and "pip install 'distillm_ext[train]'" in message
    assert "pytest" not in message
