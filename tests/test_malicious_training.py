"""A malicious server inside in-process training, without secure aggregation: it sends an imprinted model at the
attacked rounds and reads each site's images out of that site's own update, unless the sites' check refuses."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch

from medpfl.experiments.train_run import ATTACKS_FILE, MODEL, REFUSAL, ROUNDS, TrainRunConfig, run_training
from medpfl.fl.flower.federation import FederationSpec, federation_data
from medpfl.fl.model_check import ModelRefused
from medpfl.fl.rounds import KeptObservations, RoundHooks
from medpfl.metrics.privacy import SUCCESS_SSIM
from medpfl.report.build import build_report

# 4 sites of 16 images at 16 px, FedSGD, 256 bins: each site's update is read on its own.
CONFIG = TrainRunConfig(model="lenet-idlg", norm="none", image_size=16, sites=4, site_images=16, rounds=2,
                        protocol="fedsgd", attack="imprint", attack_rounds=[1], attack_sites=[0, 1, 2, 3],
                        attack_settings={"bins": 256}, site_check=False, seed=0)


def bins_held(sent: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[int, int]:
    """(images alone in their bin, bins holding images) of one update's images, the bins read off the sent
    model's own rows: row k fires for a brightness (mean pixel) above -bias_k / (weight_k * pixels)."""
    weight, bias = sent["imprint.weight"].double(), sent["imprint.bias"].double()
    thresholds = -bias / (weight[:, 0] * weight.shape[1])
    bins = torch.bucketize(images.double().mean((1, 2, 3)), thresholds.sort().values)
    return int(((bins[:, None] == bins[None, :]).sum(1) == 1).sum()), len(set(bins.tolist()))


def test_in_process_malicious_server_reads_each_site_and_recovers_the_images_alone_in_their_bin(tmp_path):
    keep = KeptObservations()
    summary = run_training(CONFIG, tmp_path, defenses=RoundHooks(observers=[keep]))
    lines = [json.loads(t) for t in (tmp_path / ATTACKS_FILE).read_text().splitlines()]
    assert [(a["round"], a["site"], a["observed"]) for a in summary["attacks"]] == [(1, s, "sent") for s in range(4)]
    data = federation_data(FederationSpec.of(CONFIG))
    first = [s for s in keep.seen if s.facts.round == 1]
    for line, seen in zip(lines, first):
        recovered = sum(s >= SUCCESS_SSIM for s in line["ssim"])
        # An image alone in its bin comes back exactly from a FedSGD gradient; the images sharing a bin come back
        # as one blend, which may still pass for one of them when they look alike (site 3: two of brightness
        # 0.7074 and 0.7078, SSIM 0.98).
        alone, occupied = bins_held(seen.weights, data.sites[line["site"]][0])
        assert alone <= recovered <= occupied, (line["site"], alone, recovered, occupied)
        assert "imprint" in line["site_check"]  # what a checking site would have said

    # The federation trains on from the body of what it sent, as under SecAgg+: round 2's global model is the
    # agreed architecture at the sent body minus lr x the sites' mean gradient of it.
    second = next(s for s in keep.seen if s.facts.round == 2)
    sent = first[0].weights
    for name, w in second.weights.items():
        mean = torch.stack([s.update[f"body.{name}"] for s in first]).mean(0)
        torch.testing.assert_close(w, sent[f"body.{name}"] - CONFIG.lr * mean)
    assert set(torch.load(tmp_path / MODEL, weights_only=True)) == set(second.weights)

    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", build_report(tmp_path).read_text())))
    recovered = sum(s >= SUCCESS_SSIM for a in lines for s in a["ssim"])
    assert f"A malicious server (imprint) read {recovered} of 64 images out of the updates" in text
    # 16 images behind each site's update in 256 equal bins: each alone with probability (255/256)^15 = 0.943.
    assert "expected share: 0.94, the chance that one of the 16 images" in text
    assert "it refuses 1 of the 1 models the server sent" in text


def test_sites_that_check_refuse_the_imprinted_model_in_process(tmp_path):
    config = TrainRunConfig(**{**CONFIG.__dict__, "sites": 2, "site_images": 4, "attack_sites": [0, 1],
                               "attack_rounds": [2], "site_check": True})
    with pytest.raises(ModelRefused, match="In round 2 the sites refused .* lacks: imprint.weight"):
        run_training(config, tmp_path)
    assert json.loads((tmp_path / REFUSAL).read_text())["round"] == 2
    assert [json.loads(t)["round"] for t in (tmp_path / ROUNDS).read_text().splitlines()] == [1]
    assert not (tmp_path / ATTACKS_FILE).exists() or not (tmp_path / ATTACKS_FILE).read_text()


class Interrupted(Exception):
    pass


def test_a_resumed_malicious_run_equals_the_uninterrupted_one(tmp_path):
    config = TrainRunConfig(**{**CONFIG.__dict__, "sites": 2, "site_images": 8, "attack_sites": [0, 1],
                               "attack_rounds": [1, 2], "rounds": 3, "attack_settings": {"bins": 64}})
    run_training(config, tmp_path / "whole")

    def stop_after_round_1(done: int, rounds: int) -> None:
        if done == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_training(config, tmp_path / "resumed", progress=stop_after_round_1)
    run_training(config, tmp_path / "resumed")
    whole, resumed = ([json.loads(t) for t in (tmp_path / run / ATTACKS_FILE).read_text().splitlines()]
                      for run in ("whole", "resumed"))
    assert [(a["round"], a["site"], a["ssim"]) for a in whole] == [(a["round"], a["site"], a["ssim"]) for a in resumed]
    assert len(whole) == 4
    a, b = (torch.load(tmp_path / run / MODEL, weights_only=True) for run in ("whole", "resumed"))
    assert all(torch.equal(a[n], b[n]) for n in a)

