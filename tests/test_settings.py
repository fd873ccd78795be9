"""One federation-settings schema: `medpfl train`, the Flower spec, the audit and the sweep read the same
settings alike, share their defaults, refuse bad values alike, and sweeps recorded before still resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medpfl import cli
from medpfl.errors import MedPFLError
from medpfl.experiments.audit import defenses_sweep, federation_run
from medpfl.experiments.audit_config import FederationConfig, UtilityConfig, from_mapping, load_audit_config
from medpfl.experiments.sweep import SweepConfig, run_sweep
from medpfl.experiments.train_run import TrainRunConfig
from medpfl.fl.flower.deploy import parse_arguments as deployment_arguments
from medpfl.fl.flower.federation import FederationSpec
from medpfl.fl.local import LocalTraining

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"
NAMES = ("sites", "partition", "site_images", "rounds", "protocol", "local_epochs", "local_batch", "lr", "momentum")
# `medpfl train`'s defaults, as its README and help have always stated them.
TRAIN_DEFAULTS = {"sites": 5, "partition": "iid", "site_images": 0, "rounds": 20, "protocol": "fedavg",
                  "local_epochs": 2, "local_batch": 16, "lr": 0.05, "momentum": 0.9}


def _settings(config) -> dict:
    return {name: getattr(config, name) for name in NAMES}


def _audit(tmp_path: Path, text: str):
    (tmp_path / "audit.yaml").write_text(text)
    return load_audit_config(tmp_path / "audit.yaml")


def test_the_same_settings_give_train_flower_the_audit_and_the_sweep_the_same_federation(tmp_path):
    options = ["--sites", "3", "--partition", "dirichlet:0.5", "--site-images", "4", "--rounds", "6", "--protocol",
               "fedavg", "--local-epochs", "3", "--local-batch", "8", "--lr", "0.02", "--momentum", "0.5"]
    train = cli.train_config(cli._parser().parse_args(["train", *options]))
    sweep = cli.sweep_config(cli._parser().parse_args(["sweep", *options])).federation("none", 0)
    deployed = deployment_arguments(options)[0]
    on_flower = FederationSpec.from_config(FederationSpec.of(train).to_config())  # what a Flower client reads
    audit = _audit(tmp_path, "federation: {sites: 3, partition: 'dirichlet:0.5', site_images: 4, rounds: 6, "
                             "protocol: fedavg, local_epochs: 3, local_batch: 8, lr: 0.02, momentum: 0.5}\n")
    audited = federation_run(audit, {"data": "embedded", "seed": 0})
    expected = LocalTraining("fedavg", epochs=3, batch_size=8, lr=0.02, momentum=0.5)
    for name, config in (("train", train), ("sweep", sweep), ("deployment", deployed), ("flower", on_flower),
                         ("audit", audited)):
        assert (config.training, config.rounds, config.sites, config.partition, config.site_images) == \
            (expected, 6, 3, "dirichlet:0.5", 4), name


def test_every_federation_has_trains_defaults_but_the_overrides_that_say_why(tmp_path):
    assert _settings(TrainRunConfig()) == TRAIN_DEFAULTS
    assert _settings(cli.train_config(cli._parser().parse_args(["train"]))) == TRAIN_DEFAULTS
    assert _settings(FederationSpec()) == TRAIN_DEFAULTS
    assert _settings(deployment_arguments([])[0]) == TRAIN_DEFAULTS
    # The audit's federation attacks with iDLG by default, which FedAvg allows after one local step only.
    assert _settings(from_mapping(FederationConfig, {})) == {**TRAIN_DEFAULTS, "local_epochs": 1}
    utility = UtilityConfig()
    assert (utility.sites, utility.rounds) == (TRAIN_DEFAULTS["sites"], TRAIN_DEFAULTS["rounds"])
    audit = _audit(tmp_path, "defenses: ['laplace:b=0.01']\nutility: {sites: 3, rounds: 4}\n")
    assert _settings(defenses_sweep(audit, {"data": "embedded"}).federation("none", 0)) == \
        {**TRAIN_DEFAULTS, "sites": 3, "rounds": 4}
    # The sweep's privacy half attacks FedSGD updates of one image per site (and lr, momentum and local epochs
    # that FedSGD does not use but recorded sweeps hold).
    sweep_overrides = {"protocol": "fedsgd", "site_images": 1, "local_epochs": 1, "lr": 0.1, "momentum": 0.0}
    assert _settings(SweepConfig()) == {**TRAIN_DEFAULTS, **sweep_overrides}
    assert _settings(cli.sweep_config(cli._parser().parse_args(["sweep"]))) == {**TRAIN_DEFAULTS, **sweep_overrides}


@pytest.mark.parametrize("option, value", [("--sites", "0"), ("--site-images", "-1"), ("--rounds", "0"),
                                           ("--partition", "dirichlet:-1"), ("--partition", "halves"),
                                           ("--local-epochs", "0"), ("--local-batch", "0"), ("--lr", "0.0"),
                                           ("--momentum", "1.0")])
def test_a_bad_setting_is_refused_by_every_command_naming_its_option(tmp_path, capsys, option, value):
    for command in ("train", "sweep"):
        assert cli.main([command, option, value, "--out", str(tmp_path / command), "--quiet"]) == 2
        message = capsys.readouterr().err
        assert f"{option} {value} is invalid" in message or f"{option} '{value}'" in message \
            or f"{option} {value}: " in message, message
        assert not (tmp_path / command).exists()  # refused before anything is written
    key = option[2:].replace("-", "_")
    yaml_value = value if value.lstrip("-").replace(".", "").isdigit() else f"'{value}'"
    with pytest.raises(MedPFLError, match=f"key 'federation': .*{option}"):
        _audit(tmp_path, f"federation: {{{key}: {yaml_value}}}\n")


def test_a_sweep_recorded_before_the_schema_resumes(tmp_path):
    """The schema gave the sweep a partition; its finished sweeps in benchmarks/results (recorded without one)
    resume as they are: nothing is rerun and no setting is reported changed."""
    recorded = RESULTS / "federation_sweep_16px"
    for name in ("config.json", "results.jsonl"):
        shutil.copy(recorded / name, tmp_path / name)
    config = json.loads((recorded / "config.json").read_text())["config"]
    assert "partition" not in config
    rows = run_sweep(SweepConfig(**config), tmp_path, workers=1)
    assert len(rows) == len(config["defenses"]) and not (tmp_path / "cells").exists()
