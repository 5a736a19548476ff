"""The model builder's pieces: decoder layers from what a model declares, and the built-in
student's layers read from the teacher's files under new names (single-file and sharded)."""

import pytest
import torch
from tiny_models import make_model
from torch import nn

from distillm_ext.recipe.config import ConfigError
from distillm_ext.recipe.models import causal_lm, decoder_layers, student_from_layers


def test_decoder_layers_are_the_blocks_the_model_declares():
    model = make_model(30, 3)
    name, layers = decoder_layers(model)
    assert name == "model.layers" and layers is model.model.layers
    assert type(layers[0]).__name__ in model._no_split_modules
    with pytest.raises(ConfigError, match="found no decoder layers in Sequential"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_causal_lm_unwraps_a_wrapper():
    model = make_model(30, 1)

    class Wrapper(nn.Module):  # peft's PeftModel answers get_base_model() the same way
        def get_base_model(self):
            return model

    assert causal_lm(Wrapper()) is model and causal_lm(model) is model


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_student_layers_are_the_teachers_renamed(tmp_path, shard_size):
    teacher = make_model(30, 4, seed=3)
    options = {"max_shard_size": shard_size} if shard_size else {}
    teacher.save_pretrained(tmp_path, **options)
    if shard_size:
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    student = student_from_layers(tmp_path, [3, 0])
    assert student.config.num_hidden_layers == 2
    expected, teacher_layer = teacher.state_dict(), {"0": "3", "1": "0"}
    for name, tensor in student.state_dict().items():
        parts = name.split(".")
        if name.startswith("model.layers."):
            parts[2] = teacher_layer[parts[2]]
        assert torch.equal(tensor, expected[".".join(parts)]), name
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    assert student.training and all(p.requires_grad for p in student.parameters())


def test_a_teacher_without_safetensors_is_a_clear_error(tmp_path):
    make_model(30, 2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="has no safetensors weights"):
        student_from_layers(tmp_path, [0])
