"""A malicious server on Flower: it sends an imprinted model through Flower's SecAgg+ and reads images out of the
aggregate, unless the sites' model check refuses the model first."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower engine is an optional extra: pip install -e '.[flower]'")

from medpfl.attacks import ObservedUpdate, ServerPayload, build_attack  # noqa: E402
from medpfl.defenses import parse_defense  # noqa: E402
from medpfl.defenses.observe import observed_gradients  # noqa: E402
from medpfl.experiments.malicious import MaliciousServer, for_secure_aggregation  # noqa: E402
from medpfl.experiments.train_run import ATTACKS_FILE, REFUSAL, TrainRunConfig, run_training  # noqa: E402
from medpfl.fl.flower.federation import FederationSpec, federation_data, global_model  # noqa: E402
from medpfl.fl.gradients import functional_model, stack_params  # noqa: E402
from medpfl.fl.model_check import ModelRefused  # noqa: E402
from medpfl.metrics.privacy import SUCCESS_SSIM, match_and_score  # noqa: E402
from medpfl.models.imprint import imprinted_architecture  # noqa: E402
from medpfl.report.build import build_report  # noqa: E402

# 4 sites of 16 images at 16 px, FedSGD, 256 bins = 4 x the 64 images behind the aggregate.
CONFIG = TrainRunConfig(model="lenet-idlg", norm="none", image_size=16, sites=4, site_images=16, rounds=1,
                        protocol="fedsgd", attack="imprint", attack_rounds=[1], attack_settings={"bins": 256},
                        engine="flower", defense="secagg:k=4", seed=0)
SHAPE = (3, 16, 16)


def in_process_secagg_recovered() -> int:
    """Images recovered from the exact in-process mean of the 4 sites (the `secagg:k=4` of medpfl attack) on
    the model the malicious server sends, scored against the sites' images."""
    spec = FederationSpec.of(CONFIG)
    data = federation_data(spec)
    model = functional_model(global_model(spec, data.num_classes))
    attack = build_attack("imprint", **CONFIG.attack_settings)
    for_secure_aggregation(attack, CONFIG.attack_settings)
    sent = MaliciousServer(attack, model, SHAPE, data.test[0], [1], 64)(
        1, {n: p.detach() for n, p in model.named_parameters()})
    architecture = functional_model(imprinted_architecture(global_model(spec, data.num_classes), SHAPE, 256))
    x = torch.cat([x for x, _ in data.sites])[None]
    y = torch.cat([y for _, y in data.sites])[None]
    params = stack_params([sent])
    update = observed_gradients(parse_defense("secagg:k=4"), architecture, params, x, y, data.num_classes, "train",
                                torch.Generator().manual_seed(0))
    payload = ServerPayload(architecture, params, data.num_classes, SHAPE)
    result = attack.reconstruct(payload, ObservedUpdate(update, 64), torch.Generator().manual_seed(0))
    return sum(s >= SUCCESS_SSIM for s in match_and_score(x[0], y[0], result.images[0], result.labels[0]).ssim)


def test_imprint_through_flower_secagg_recovers_what_the_in_process_aggregate_gives(tmp_path):
    summary = run_training(TrainRunConfig(**{**CONFIG.__dict__, "site_check": False}), tmp_path / "off")
    (line,) = [json.loads(t) for t in (tmp_path / "off" / ATTACKS_FILE).read_text().splitlines()]
    through_flower = sum(s >= SUCCESS_SSIM for s in line["ssim"])
    exact = in_process_secagg_recovered()
    # SecAgg+ rounds each value to steps of ~4e-6; with the rows scaled above that (for_secure_aggregation) it
    # costs at most a couple of the 64 images. Expected share alone in 256 equal bins: 0.78.
    assert len(line["ssim"]) == 64 and exact >= 32
    assert abs(through_flower - exact) <= 2, (through_flower, exact)
    assert summary["attacks"][0]["observed"] == "aggregate"
    # The server noted what a checking site would have said of the model it sent, and the report says it.
    assert "imprint" in line["site_check"]
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", build_report(tmp_path / "off").read_text())))
    assert f"A malicious server (imprint) read {through_flower} of 64 images out of the updates" in text
    assert ("The sites' model check would have stopped it: it refuses 1 of the 1 models the server sent" in text
            and "The sites trained without it here (--no-site-check)" in text)


def test_sites_that_check_refuse_the_imprinted_model_and_say_why(tmp_path):
    # Malicious from the first round, so the model's own fingerprint is the first one the sites saw: the imprint
    # signature refuses it (from the second round on, the fingerprint would too).
    with pytest.raises(ModelRefused, match="refuses to train: layer .* imprint module"):
        run_training(TrainRunConfig(**{**CONFIG.__dict__, "sites": 2, "site_images": 4, "defense": "secagg:k=2"}),
                     tmp_path / "on")
    refusal = json.loads((tmp_path / "on" / REFUSAL).read_text())
    assert refusal["round"] == 1 and "imprint" in refusal["reason"]
    assert not (tmp_path / "on" / ATTACKS_FILE).exists() or not (tmp_path / "on" / ATTACKS_FILE).read_text()


# Without secure aggregation the server reads each site's own update (tests/test_malicious_training.py in-process).
PLAIN = TrainRunConfig(**{**CONFIG.__dict__, "sites": 2, "site_images": 8, "defense": "none", "rounds": 2,
                          "attack_sites": [0, 1], "attack_settings": {"bins": 64}, "site_check": False})


def test_a_malicious_server_on_flower_without_secagg_reads_what_the_in_process_one_reads(tmp_path):
    run_training(PLAIN, tmp_path / "flower")
    run_training(TrainRunConfig(**{**PLAIN.__dict__, "engine": "inprocess"}), tmp_path / "inprocess")
    flower, inprocess = ([json.loads(t) for t in (tmp_path / run / ATTACKS_FILE).read_text().splitlines()]
                         for run in ("flower", "inprocess"))
    # The same sites' arithmetic (fl.rounds.site_update on the model the round's config describes), bit for bit.
    assert [(a["site"], a["observed"], a["ssim"]) for a in flower] == [(a["site"], a["observed"], a["ssim"])
                                                                        for a in inprocess]
    assert sum(s >= SUCCESS_SSIM for a in flower for s in a["ssim"]) >= 12  # of 16
    a, b = (torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("flower", "inprocess"))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_sites_on_flower_without_secagg_refuse_the_imprinted_model(tmp_path):
    config = TrainRunConfig(**{**PLAIN.__dict__, "site_images": 4, "attack_rounds": [2], "site_check": True})
    with pytest.raises(ModelRefused, match="In round 2 the sites refused the model the server sent: .*lacks: "
                                           "arrays/imprint.weight"):
        run_training(config, tmp_path)
    assert json.loads((tmp_path / REFUSAL).read_text())["round"] == 2
    assert [json.loads(t)["round"] for t in (tmp_path / "rounds.jsonl").read_text().splitlines()] == [1]
