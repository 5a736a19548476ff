"""The trainer with the settings real checkpoints ship with: a hostile generation_config.json, a
student vocabulary padded beyond the teacher's, non-finite gradients, and evaluating a run."""

import json
import shutil

import pytest
import torch
from test_trainer import final_weights, train, train_records
from tiny_models import overrides
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from distillm_ext.recipe.cli import main
from distillm_ext.recipe.config import EvalConfig, load_config
from distillm_ext.recipe.data import collate_for_training, collate_prompts, encode_examples, load_examples
from distillm_ext.recipe.evaluate import generate_answers
from distillm_ext.losses import make_loss
from distillm_ext.recipe.step_stats import StepTimer
from distillm_ext.recipe.trainer import NonFiniteError, Trainer

# What instruct checkpoints ship, and worse: each of these changes what generate() does.
HOSTILE = dict(repetition_penalty=3.0, no_repeat_ngram_size=1, do_sample=True, temperature=0.05, top_k=2,
               top_p=0.5, min_new_tokens=4, bad_words_ids=[[7]], num_beams=1, max_new_tokens=1)


def with_hostile_generation_config(source, target):
    shutil.copytree(source, target)
    GenerationConfig(**HOSTILE).save_pretrained(target)
    return target


def tiny_examples(tiny, tokenizer, n=8):
    return encode_examples(load_examples(str(tiny["validation"]), "validation"), tokenizer, "Q: {prompt} A:", 24, 12)[:n]


def test_generation_uses_only_our_settings(tiny, tmp_path):
    hostile_dir = with_hostile_generation_config(tiny["teacher"], tmp_path / "hostile")
    clean = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    hostile = AutoModelForCausalLM.from_pretrained(hostile_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    assert hostile.generation_config.repetition_penalty == 3.0  # it did load
    rows = tiny_examples(tiny, tokenizer)
    settings = EvalConfig(batch_size=4, max_new_tokens=6)
    expected = generate_answers(clean, tokenizer, rows, settings, torch.device("cpu"), len(tokenizer))
    assert "a white mass in the sky" in expected  # the teacher knows its glosses
    # Evaluation (greedy): the checkpoint's file changes nothing.
    assert generate_answers(hostile, tokenizer, rows, settings, torch.device("cpu"), len(tokenizer)) == expected
    # What a bare generate() does with that file: the failure this guards against.
    prompts = collate_prompts(rows, tokenizer.pad_token_id)
    bare = hostile.generate(**prompts, generation_config=GenerationConfig(max_new_tokens=6, do_sample=False))
    assert tokenizer.batch_decode(bare[:, prompts["input_ids"].shape[1]:], skip_special_tokens=True) != expected


def test_student_outputs_use_only_our_settings(tiny, tmp_path):
    """SGO sampling: the same seed gives the same samples with and without the hostile file."""
    hostile_dir = with_hostile_generation_config(tiny["student"], tmp_path / "hostile")
    samples = []
    for student in (tiny["student"], hostile_dir):
        trainer = Trainer(load_config(None, overrides(tiny, tmp_path / f"run-{student.name}", student__path=student,
                                                      sgo__mode="on_policy", sgo__buffer_size=16)))
        torch.manual_seed(0)
        samples.append(trainer.source.generate(trainer.source.dataset.next_examples()[0])[0])
    assert torch.equal(samples[0], samples[1])


def padded_student(tiny, tmp_path, extra_rows=13):
    """The tiny teacher with its vocabulary padded (as Qwen pads 151665 tokens to 152064 rows),
    and the padding rows made the most likely outputs, so sampling would pick them."""
    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    rows = model.config.vocab_size
    model.resize_token_embeddings(rows + extra_rows, mean_resizing=False)
    with torch.no_grad():  # the padding rows point along the mean final hidden state, far out
        batch = collate_for_training(tiny_examples(tiny, tokenizer), tokenizer.pad_token_id)
        hidden = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
        direction = model.model.norm(hidden).flatten(0, 1).mean(0)
        model.get_output_embeddings().weight[rows:] = 100.0 * direction / direction.norm()
    path = tmp_path / "padded_student"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, rows


def test_padded_student_vocabulary_generates_only_shared_ids(tiny, tmp_path):
    student, shared = padded_student(tiny, tmp_path)
    run = tmp_path / "on_policy"
    trainer = Trainer(load_config(None, overrides(tiny, run, student__path=student, sgo__mode="on_policy",
                                                  train__max_steps=3)))
    assert trainer.vocab_size == shared and trainer.student.config.vocab_size == shared + 13
    # Unmasked, the padding rows are what the student would sample (the IndexError of the issue).
    batch = trainer.source.dataset.next_batch()[0]
    logits = trainer.student(input_ids=batch["input_ids"]).logits
    assert (logits.argmax(-1) >= shared).float().mean() > 0.5
    summary = trainer.fit()
    assert summary["steps"] == 3 and all(r["source"] == "generate" for r in train_records(run))
    tokens = trainer.source.buffer.state_dict()["tokens"]
    assert int(tokens.max()) < shared
    answers = generate_answers(trainer.student, trainer.tokenizer, trainer.val_examples, trainer.config.eval,
                               torch.device("cpu"), trainer.vocab_size)
    assert all("<unk>" not in a for a in answers)


@pytest.mark.parametrize("fused_linear", [True, False])
def test_loss_and_validation_normalize_over_the_shared_vocabulary(tiny, tmp_path, fused_linear):
    """The student's padding rows are outside the loss: changing them changes neither the KD
    loss, nor the CE term, nor the validation loss (README: "Padded vocabularies")."""
    student, shared = padded_student(tiny, tmp_path)
    trainer = Trainer(load_config(None, overrides(tiny, tmp_path / "run", student__path=student,
                                                  loss__kd_ratio=0.5, loss__fused_linear=fused_linear)))
    assert trainer.forwards.fused_linear == fused_linear
    batch = trainer.source.next_batch(0)[0]

    def measure():
        teacher = trainer.forwards.teacher_signal(batch)
        _, kd, ce = trainer.loss(**trainer.forwards.student_outputs(batch), teacher=teacher,
                                 targets=batch["labels"][:, 1:])
        return kd.item(), ce.item(), trainer.evaluate(trainer.student).val_loss

    before = measure()
    with torch.no_grad():
        trainer.student.get_output_embeddings().weight[shared:] *= -3.0
    assert measure() == pytest.approx(before, rel=1e-6, abs=0)
    # and the KD loss equals the loss on the shared rows, computed directly
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s = trainer.student(**inputs).logits[:, :-1, :shared]
        t = trainer.teacher(**inputs).logits[:, :-1, :shared]
    direct = make_loss(trainer.config.loss.type, alpha=trainer.config.loss.alpha, reduction="sum")
    assert direct(s, t, batch["labels"][:, 1:]).item() == pytest.approx(before[0], rel=1e-5)


def inject_inf_gradient(trainer, at_steps):
    """Makes the gradient of one weight infinite during the backward of the given steps (1-based)."""
    weight = trainer.student.model.norm.weight
    weight.register_hook(lambda grad: grad * float("inf") if trainer.step + 1 in at_steps else grad)


def snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_a_non_finite_gradient_stops_before_the_update(tiny, tmp_path):
    run = tmp_path / "stop"
    trainer = Trainer(load_config(None, overrides(tiny, run, output__checkpoint_interval=1, output__keep_checkpoints=5)))
    inject_inf_gradient(trainer, at_steps={2})
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm at step 2; the weights were not updated "
                                             r"with it, and the last good checkpoint is .*step-000001"):
        trainer.fit()
    # The weights in memory are exactly step 1's, and the named checkpoint is truly good.
    saved = final_weights(run, 1)
    assert all(torch.equal(saved[name], tensor) for name, tensor in trainer.student.state_dict().items()
               if name in saved)
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (run / "checkpoints" / "step-000002").exists()


def test_skip_policy_drops_the_step_and_counts_it(tiny, tmp_path):
    run = tmp_path / "skip"
    trainer = Trainer(load_config(None, overrides(tiny, run, train__nonfinite="skip")))
    inject_inf_gradient(trainer, at_steps={2, 4})
    weights = {}
    trainer.callbacks = (lambda t, step: weights.__setitem__(step, snapshot(t.student)),)
    summary = trainer.fit()
    assert summary["steps"] == 6 and summary["skipped_steps"] == 2
    records = train_records(run)
    assert [r["skipped_steps"] for r in records] == [0, 1, 0, 1, 0, 0]
    assert [r["grad_norm"] is None for r in records] == [False, True, False, True, False, False]  # JSON has no inf
    for skipped in (2, 4):
        assert all(torch.equal(weights[skipped][k], weights[skipped - 1][k]) for k in weights[skipped])
    assert not all(torch.equal(weights[3][k], weights[2][k]) for k in weights[3])
    assert all(torch.isfinite(t).all() for t in final_weights(run, 6).values())


def test_training_forwards_build_no_kv_cache(tiny, tmp_path):
    trainer = Trainer(load_config(None, overrides(tiny, tmp_path / "run", train__max_steps=1, loss__kd_ratio=0.5)))
    seen = []
    for model in (trainer.teacher, trainer.student):
        model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("use_cache")),
                                        with_kwargs=True)
    trainer.train_step(StepTimer(torch.device("cpu")))
    assert seen == [False, False]


def test_eval_of_a_run_reproduces_its_numbers_without_the_teacher(tiny, tmp_path, capsys):
    teacher = tmp_path / "teacher_copy"
    shutil.copytree(tiny["teacher"], teacher)
    run = tmp_path / "run"
    # Settings eval must take from the run: another template, fewer examples, longer answers.
    summary = train(overrides(tiny, run, teacher__path=teacher, data__template="Q: {prompt}\\nA:",
                              eval__num_examples=6, eval__max_new_tokens=5))
    shutil.rmtree(teacher)  # eval of a run needs no teacher
    scores = tmp_path / "scores.json"
    assert main(["eval", "--model", str(run), "--output", str(scores)]) == 0
    result = json.loads(scores.read_text())
    after = summary["student_after"]
    assert (result["val_loss"], result["rougeL"], result["examples"]) == (after["val_loss"], after["rougeL"], 6)
    # A checkpoint directory reads its run's config too, and overrides still win.
    checkpoint = run / "checkpoints" / "step-000006"
    assert main(["eval", "--model", str(checkpoint), "--output", str(scores), "eval.num_examples=2"]) == 0
    assert json.loads(scores.read_text())["examples"] == 2


def test_eval_of_a_run_without_a_complete_checkpoint_is_an_error(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step-000002").mkdir(parents=True)
    assert main(["eval", "--model", str(tmp_path / "run")]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
