"""A new attack is one file plus one registry entry: the CLI offers it, `medpfl attack` runs it, the report
explains it; and the built-in entries say what the attacks did before the registry."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import pytest
import torch

from medpfl.attacks import (AttackEntry, ObservedUpdate, Reconstruction, ServerPayload, SettingsAttack, attack_entry,
                            attack_names, build_attack, register, unregister)
from medpfl.attacks.defense_aware import applicable_attacks
from medpfl.attacks.labels import recover_labels
from medpfl.cli import _parser, main
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.defenses import parse_defense
from medpfl.errors import MedPFLError

# ---- the toy attack: what a contributor's file holds ----------------------------------------------


@dataclass
class FlatGuessSettings:
    level: float = 0.5  # the grey level of every guessed image


class FlatGuess(SettingsAttack):
    """Guesses every image as one flat grey picture, with the labels read off the update's last layer."""

    name = "flat-guess"
    settings_class = FlatGuessSettings

    def reconstruct(self, payload: ServerPayload, update: ObservedUpdate, generator: torch.Generator) -> Reconstruction:
        start = time.perf_counter()
        V, B = payload.n_victims, update.batch_size
        images = torch.full((V, B, *payload.image_shape), float(self.settings.level))
        return Reconstruction(images=images, labels=recover_labels(update, payload).cpu(), objective=torch.zeros(V),
                              evaluations=torch.zeros(V, dtype=torch.long), diverged=torch.zeros(V, dtype=torch.bool),
                              seconds=time.perf_counter() - start)


TOY = AttackEntry("flat-guess", FlatGuess, "a flat grey image per victim, labels from the last layer",
                  display="Flat grey guess", plain="answers every image with one flat grey picture, a baseline "
                  "any real attack must beat", default_model="lenet-idlg")

# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_attack():
    register(TOY)
    try:
        yield TOY
    finally:
        unregister(TOY.name)


def _attack_choices() -> list[str]:
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    option = next(a for a in commands.choices["attack"]._actions if "--attack" in a.option_strings)
    return list(option.choices)


def test_a_registered_attack_is_offered_run_and_explained(toy_attack, tmp_path, capsys):
    assert "flat-guess" in _attack_choices()
    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    assert "  flat-guess        a flat grey image per victim, labels from the last layer" in capsys.readouterr().out

    out = tmp_path / "run"
    assert main(["attack", "--attack", "flat-guess", "--image-size", "16", "--n-images", "1", "--seed", "4",
                 "--set", "level=0.25", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["attack_settings"] == {"attack": "flat-guess", "level": 0.25}
    assert config["model"] == "lenet-idlg" and config["bn_mode_used"] == "train" and not config["labels_granted"]
    # Scored against the attacked image itself, read here from the data set: MSE of a flat 0.25 guess.
    source = embedded_source()
    original = ImageDataset(source, sample_items(source.items, 1, 4), size=16).image(0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attack"] == "flat-guess"
    assert summary["mean_mse"] == pytest.approx(float(((original - 0.25) ** 2).mean()), rel=1e-5)

    html = (out / "report.html").read_text()
    assert "Flat grey guess" in html and "a baseline any real attack must beat" in html


def test_the_registry_is_left_as_found(toy_attack):
    assert "flat-guess" in attack_names()
    unregister("flat-guess")
    assert "flat-guess" not in attack_names() and "flat-guess" not in _attack_choices()
    register(TOY)  # for the fixture to take out again


def test_one_entry_per_name_and_unknown_names_and_settings_are_one_sentence(toy_attack):
    with pytest.raises(ValueError, match="registered already"):
        register(TOY)
    with pytest.raises(MedPFLError, match="Unknown --attack 'flat-gues'; choose one of: .*flat-guess"):
        build_attack("flat-gues")
    with pytest.raises(MedPFLError, match="Attack 'flat-guess' has no setting 'levle'; valid settings: level"):
        build_attack("flat-guess", levle=0.3)
    with pytest.raises(MedPFLError, match="Attack 'invgrad' has no setting 'stepz'"):
        build_attack("invgrad", stepz=3)


def test_built_in_entries_keep_the_tables_they_replace():
    """What the attacks' four tables and the report's two said before there was one registry."""
    names = attack_names()
    assert set(names) == {"dlg", "idlg", "cpl", "invgrad", "sparse-l2", "sparse-cosine", "robust-l2", "robust-cosine",
                          "multi-round", "strongest", "update-inversion", "imprint", "trap"}
    assert {n: attack_entry(n).default_model for n in ("dlg", "idlg", "cpl", "invgrad", "update-inversion", "trap",
                                                        "imprint", "strongest", "robust-l2")} == {
        "dlg": "lenet-dlg", "idlg": "lenet-idlg", "cpl": "lenet-cpl", "invgrad": "resnet18",
        "update-inversion": "convnet", "trap": "mlp", "imprint": "lenet-idlg", "strongest": "lenet-idlg",
        "robust-l2": "lenet-idlg"}
    assert [n for n in names if attack_entry(n).bn_mode == "eval"] == ["invgrad"]
    assert [n for n in names if attack_entry(n).threat.knows_labels] == ["invgrad"]
    assert sorted(n for n in names if attack_entry(n).threat.modifies_model) == ["imprint", "trap"]
    assert sorted(n for n in names if attack_entry(n).paper_procedure) == ["cpl", "dlg", "idlg", "invgrad"]
    assert attack_entry("invgrad").paper_procedure == {"steps": 24_000, "restarts": 8}
    assert attack_entry("idlg").paper_procedure == {
        "steps": 300, "restarts": 0, "normalize": False, "logit_gradient": "candidate", "tolerance_grad": 1e-7,
        "tolerance_change": 1e-9, "curvature_tolerance": 1e-10}
    assert (attack_entry("idlg").display, attack_entry("update-inversion").display) == ("iDLG", "update inversion")
    # Strongest's candidates under each kind of defense, in this order (it picks the first of equals).
    assert applicable_attacks(parse_defense("none")) == ["idlg"]
    assert applicable_attacks(parse_defense("topk:prune=0.5")) == ["idlg", "sparse-l2", "sparse-cosine"]
    for noisy in ("laplace:b=0.01", "clip:norm=1", "topk:prune=0.5+quant:bits=4"):
        assert applicable_attacks(parse_defense(noisy)) == ["idlg", "robust-l2", "robust-cosine"]
        # several rounds of the same images observed: also the attack that combines them
        assert applicable_attacks(parse_defense(noisy), rounds=3) == ["idlg", "robust-l2", "robust-cosine",
                                                                      "multi-round"]
    assert applicable_attacks(parse_defense("topk:prune=0.5"), rounds=3) == ["idlg", "sparse-l2", "sparse-cosine"]
    assert sorted(n for n in names if attack_entry(n).combines_rounds) == ["multi-round", "strongest"]
