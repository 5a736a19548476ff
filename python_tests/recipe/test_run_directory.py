"""Run directories are never corrupted or mixed, config files round-trip, and bad files get
one-line errors that name them."""

import json

import pytest
from test_trainer import train, train_records
from tiny_models import overrides

from distillm_ext.recipe import checkpoint as ckpt
from distillm_ext.recipe import run_directory
from distillm_ext.recipe.cli import main
from distillm_ext.recipe.config import ConfigError, load_config
from distillm_ext.recipe.trainer import Trainer


def test_killed_rotation_never_leaves_a_broken_checkpoint(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_rmtree = run_directory.shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file, then the process "dies"
        (path / ckpt.STATE_FILE).unlink()
        raise SystemExit("killed while deleting")

    monkeypatch.setattr(run_directory.shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):  # at step 4, rotating step 2 out (keep 1)
        train(overrides(tiny, run, train__max_steps=4, output__checkpoint_interval=2, output__keep_checkpoints=1))
    monkeypatch.setattr(run_directory.shutil, "rmtree", real_rmtree)
    assert [p.name for p in ckpt.checkpoints(run)] == ["step-000004"]
    assert not (run / "checkpoints" / "step-000002").exists()
    assert main(["eval", "--model", str(run)]) == 0
    # The next save clears the leftover.
    train(overrides(tiny, run, train__max_steps=6, output__checkpoint_interval=2, output__keep_checkpoints=1),
          resume=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006"]


def test_an_incomplete_step_directory_is_not_a_checkpoint(tmp_path):
    broken = tmp_path / "checkpoints" / "step-000009"
    (broken / "model").mkdir(parents=True)
    (broken / "model" / "config.json").write_text("{}")
    assert ckpt.checkpoints(tmp_path) == [] and ckpt.latest_checkpoint(tmp_path) is None


def test_saving_a_step_again_replaces_it_whole(tiny, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, overrides(tiny, run, train__max_steps=2)))
    first = trainer.save()
    (first / "marker").write_text("old")
    again = trainer.save()
    assert again == first and not (again / "marker").exists() and ckpt.is_complete(again)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000"]


def test_checkpoint_files_and_directories_are_fsynced(tiny, tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(ckpt, "_fsync", lambda path: synced.append(path.name))
    Trainer(load_config(None, overrides(tiny, tmp_path / "run", train__max_steps=1))).save()
    assert {"model.safetensors", "config.json", "model", ckpt.STATE_FILE, "rank0.pt", "checkpoints"} <= set(synced)


def test_a_fresh_run_refuses_a_directory_holding_a_run(tiny, tmp_path):
    run = tmp_path / "run"
    train(overrides(tiny, run, train__max_steps=2, output__checkpoint_interval=1))
    with pytest.raises(ConfigError, match=r"already holds a run \(config.json, metrics.jsonl, summary.json, "
                                          r"checkpoints\): continue it with --resume, replace it with --overwrite"):
        Trainer(load_config(None, overrides(tiny, run, train__max_steps=3)))
    assert main(["train", *overrides(tiny, run, train__max_steps=3)]) == 2
    summary = train(overrides(tiny, run, train__max_steps=3, output__checkpoint_interval=0), overwrite=True)
    assert [r["step"] for r in train_records(run)] == [1, 2, 3]  # the old run's lines are gone
    assert [p.name for p in ckpt.checkpoints(run)] == ["step-000003"] and summary["checkpoint"].endswith("step-000003")


def test_a_failing_command_changes_nothing_in_the_run(tiny, tmp_path):
    run = tmp_path / "run"
    train(overrides(tiny, run, train__max_steps=2))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="data.train"):
        Trainer(load_config(None, overrides(tiny, run, train__max_steps=4, data__train=tmp_path / "missing.jsonl")),
                resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("changed, message", [
    ({"sgo__mode": "on_policy"}, r"--resume: sgo.mode was 'off' in .*step-000002, and is 'on_policy' now"),
    ({"data__max_length": 30}, r"--resume: data.max_length was 24"),
])
def test_resume_with_a_changed_run_shape_is_a_clear_error(tiny, tmp_path, changed, message):
    run = tmp_path / "run"
    train(overrides(tiny, run, train__max_steps=2))
    with pytest.raises(ConfigError, match=message):
        Trainer(load_config(None, overrides(tiny, run, train__max_steps=4, **changed)), resume=True)


def test_resume_with_another_number_of_ranks_is_a_clear_error(tiny, tmp_path):
    run = tmp_path / "run"
    train(overrides(tiny, run, train__max_steps=2))
    info_file = run / "checkpoints" / "step-000002" / ckpt.INFO_FILE
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "world_size": 2}))  # as torchrun x2 saves
    with pytest.raises(ConfigError, match=r"saved by 2 process\(es\), and this run has 1; resume with torchrun "
                                          r"--nproc_per_node 2"):
        Trainer(load_config(None, overrides(tiny, run, train__max_steps=4)), resume=True)


def run_cli(args, capsys) -> str:
    assert main(args) == 2
    stderr = capsys.readouterr().err  # model loading may draw progress bars before the error
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("distillm: error: ") and "Traceback" not in stderr
    return error


def test_bad_files_get_one_line_errors_that_name_them(tiny, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    assert f"output.dir '{a_file}' is a file" in run_cli(["train", *overrides(tiny, a_file)], capsys)
    fake_gzip = tmp_path / "data.jsonl.gz"
    fake_gzip.write_text('{"prompt": "a", "response": "b"}\n')
    error = run_cli(["train", *overrides(tiny, tmp_path / "r1", data__train=fake_gzip)], capsys)
    assert f"data.train: {fake_gzip} is not gzip-compressed UTF-8 text" in error
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    assert f"data.train: {binary} is not UTF-8 text" in run_cli(
        ["train", *overrides(tiny, tmp_path / "r2", data__train=binary)], capsys)
    no_weights = tmp_path / "teacher_without_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny["teacher"] / "config.json").read_text())
    assert f"teacher.path '{no_weights}': cannot load it" in run_cli(
        ["train", *overrides(tiny, tmp_path / "r3", teacher__path=no_weights)], capsys)
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3"))  # nothing was written


def test_config_files_read_numbers_as_json_and_yaml_1_2_do(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train: {lr: 2e-4, max_grad_norm: 1E0}\nloss: {alpha: .5e-1}\n")
    config = load_config(str(yaml_file))
    assert (config.train.lr, config.train.max_grad_norm, config.loss.alpha) == (2e-4, 1.0, 0.05)
    json_file = tmp_path / "run.json"
    json_file.write_text('{"train": {"lr": 1e-05}}')
    assert load_config(str(json_file)).train.lr == 1e-05
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text("train: {lr: 'fast'}\n")
    with pytest.raises(ConfigError, match="'train.lr' expects float, got 'fast'"):
        load_config(str(quoted))


def test_a_runs_own_config_json_loads_back(tiny, tmp_path):
    run = tmp_path / "run"
    config = load_config(None, overrides(tiny, run, train__max_steps=1, train__lr=1e-5,
                                         data__template="Q: {prompt}\\nA: "))
    Trainer(config).fit()
    assert load_config(str(run / "config.json")) == config


def test_command_line_strings_keep_spaces_and_read_escapes():
    config = load_config(None, ["data.template=Question: {prompt}\\nAnswer:\\t ", "train.max_steps= 7 "])
    assert config.data.template == "Question: {prompt}\nAnswer:\t " and config.train.max_steps == 7
    assert load_config(None, ["data.template=C:\\\\dir {prompt}"]).data.template == "C:\\dir {prompt}"


@pytest.mark.parametrize("template", ["Q: {question} A:", "just text", "Q: {prompt} {answer}", "Q: {prompt", "{}"])
def test_a_template_must_have_exactly_the_prompt_field(template):
    with pytest.raises(ConfigError, match="data.template"):
        load_config(None, [f"data.template={template}"])
    assert load_config(None, ["data.template={{literal}} {prompt} again {prompt}"])
