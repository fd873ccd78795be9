"""A user's own torch model, `--model module:callable` with `--model-kwargs`, in attacks and training."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from medpfl.cli import main
from medpfl.errors import MedPFLError
from medpfl.models.registry import build_model, parse_model_kwargs

USER_MODULE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's classifier: one conv, a pool and a linear head."""

    def __init__(self, in_channels=3, classes=2, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.sigmoid(self.conv(x)).mean((2, 3)))


def not_a_model(**kwargs):
    return "a string"
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "hospital_models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "hospital_models"


def test_model_kwargs_are_python_literals_else_strings():
    assert parse_model_kwargs("spatial_dims=2,in_channels=3,out_channels=6") == {
        "spatial_dims": 2, "in_channels": 3, "out_channels": 6}
    assert parse_model_kwargs("act=relu, dropout=0.1, bias=true, kernel=(3,3), extra=none") == {
        "act": "relu", "dropout": 0.1, "bias": True, "kernel": (3, 3), "extra": None}
    with pytest.raises(MedPFLError, match="--model-kwargs"):
        parse_model_kwargs("in_channels")


def test_a_users_model_is_built_with_its_arguments_and_the_same_seed_gives_the_same_weights(user_module):
    name = f"{user_module}:TinyNet"
    a = build_model(name, 6, 3, 16, seed=1, model_kwargs={"classes": 6, "width": 5})
    b = build_model(name, 6, 3, 16, seed=1, model_kwargs={"classes": 6, "width": 5})
    c = build_model(name, 6, 3, 16, seed=2, model_kwargs={"classes": 6, "width": 5})
    assert a.conv.out_channels == 5 and a.head.out_features == 6
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.conv.weight, c.conv.weight)
    before = torch.random.get_rng_state()
    build_model(name, 6, 3, 16, seed=3, model_kwargs={"classes": 6})
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is left as it was


@pytest.mark.parametrize("model, kwargs, words", [
    ("no_such_module_xyz:Net", {}, ["cannot import 'no_such_module_xyz'"]),
    ("{m}:Missing", {}, ["has no 'Missing'"]),
    ("{m}:not_a_model", {}, ["returned str, not a torch.nn.Module"]),
    ("{m}:TinyNet", {"classes": 2}, ["(1, 2)", "not (1, 6)", "--model-kwargs"]),
    ("{m}:TinyNet", {"classes": 6, "colour": 1}, ["does not take --model-kwargs"]),
    ("{m}:TinyNet", {"in_channels": 1, "classes": 6}, ["fails on 3 x 16 x 16 images", "--channels"]),
])
def test_a_users_model_that_cannot_serve_is_named_in_one_sentence(user_module, model, kwargs, words):
    with pytest.raises(MedPFLError) as error:
        build_model(model.format(m=user_module), 6, 3, 16, model_kwargs=kwargs)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_attack_and_training_run_a_users_model_from_the_command_line(tmp_path, user_module):
    model = ["--model", f"{user_module}:TinyNet", "--model-kwargs", "classes=6,width=4"]
    assert main(["attack", *model, "--attack", "idlg", "--image-size", "16", "--n-images", "2", "--steps", "5",
                 "--set", "restarts=0", "--out", str(tmp_path / "attack"), "--quiet"]) == 0
    config = json.loads((tmp_path / "attack" / "config.json").read_text())["config"]
    assert config["model"] == f"{user_module}:TinyNet" and config["model_kwargs"] == {"classes": 6, "width": 4}
    assert main(["train", *model, "--image-size", "16", "--sites", "2", "--rounds", "1", "--out",
                 str(tmp_path / "train"), "--quiet"]) == 0
    state = torch.load(tmp_path / "train" / "model.pt", weights_only=True)
    assert state["conv.weight"].shape == (4, 3, 3, 3) and state["head.weight"].shape == (6, 4)


def test_monai_densenet_is_attacked_by_inverting_gradients(tmp_path):
    pytest.importorskip("monai")
    assert main(["attack", "--model", "monai.networks.nets:DenseNet121", "--model-kwargs",
                 "spatial_dims=2,in_channels=3,out_channels=6", "--attack", "invgrad", "--steps", "3",
                 "--restarts", "1", "--n-images", "1", "--out", str(tmp_path / "monai"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "monai" / "summary.json").read_text())
    assert summary["model"] == "monai.networks.nets:DenseNet121" and summary["n_images"] == 1


def test_training_starts_from_a_given_state_and_names_one_that_does_not_fit(tmp_path, user_module, capsys):
    model = ["--model", f"{user_module}:TinyNet", "--model-kwargs", "classes=6"]
    start = build_model(f"{user_module}:TinyNet", 6, 3, 16, seed=99, model_kwargs={"classes": 6})
    torch.save(start.state_dict(), tmp_path / "start.pt")
    assert main(["train", *model, "--model-state", str(tmp_path / "start.pt"), "--lr", "1e-9", "--image-size", "16",
                 "--sites", "2", "--rounds", "1", "--out", str(tmp_path / "train"), "--quiet"]) == 0
    trained = torch.load(tmp_path / "train" / "model.pt", weights_only=True)
    assert torch.allclose(trained["conv.weight"], start.conv.weight, atol=1e-6)  # lr 1e-9: still the given start
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    assert main(["train", *model, "--model-state", str(tmp_path / "bad.pt"), "--image-size", "16", "--sites", "2",
                 "--rounds", "1", "--out", str(tmp_path / "bad"), "--quiet"]) != 0
    assert "--model-state" in capsys.readouterr().err and not (tmp_path / "bad" / "model.pt").exists()
