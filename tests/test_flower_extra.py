"""Flower is an optional extra: MedPFL imports and names the install command without it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medpfl.errors import MedPFLError
from medpfl.fl.flower import INSTALL_HINT
from medpfl.fl.flower.federation import FederationSpec, federation_data


def test_missing_flower_is_one_sentence_and_bad_sites_are_named():
    code = ("import sys; sys.modules['flwr'] = None\n"
            "import medpfl.cli, medpfl.fl.flower as f\n"
            "try:\n    f.require_flower()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"MedPFLError {INSTALL_HINT}"
    with pytest.raises(MedPFLError, match="--sites"):
        federation_data(FederationSpec(sites=10**6))



def test_spec_travels_through_a_flat_config():
    spec = FederationSpec(data="/data/x", sites=3, partition="dirichlet:0.3", local_epochs=3, lr=0.1, momentum=0.9,
                          seed=7)
    config = spec.to_config()
    assert config["local-epochs"] == 3 and config["partition"] == "dirichlet:0.3"
    assert FederationSpec.from_config(config) == spec
    assert FederationSpec.from_config({**config, "lr": 1, "out": "ignored"}).lr == 1.0


def test_flower_engine_refuses_what_it_cannot_run_at_the_site():
    pytest.importorskip("flwr")
    from medpfl.fl.flower.simulation import run_simulation
    from medpfl.fl.rounds import RoundHooks

    with pytest.raises(MedPFLError, match="--engine inprocess"):
        run_simulation(FederationSpec(), RoundHooks(site_transform=lambda update, facts: update))
    with pytest.raises(MedPFLError, match="custom aggregator"):
        run_simulation(FederationSpec(), RoundHooks(aggregate=lambda updates, n: updates), secure_aggregation=True)
