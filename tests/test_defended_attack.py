"""Defenses on what the attacker observes: `medpfl attack --defense`, secure aggregation's k x B images."""

from __future__ import annotations

import json

import pytest
import torch

from medpfl.cli import main
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.defenses import parse_defense
from medpfl.defenses.base import flatten_sites
from medpfl.defenses.observe import observed_gradients
from medpfl.fl.gradients import site_gradients, stack_params
from medpfl.models.registry import build_model

QUICK = ["--image-size", "16", "--steps", "3", "--restarts", "0", "--quiet"]


@pytest.fixture(scope="module")
def real_images():
    source = embedded_source()
    x, y = ImageDataset(source, sample_items(source.items, 8, seed=2), size=16).load_batch(range(8))
    return x, y, len(source.classes)


def test_secure_aggregate_of_k_sites_is_the_gradient_of_all_their_images_on_the_shared_model(real_images):
    x, y, K = real_images
    models = [build_model("lenet-idlg", K, 3, 16, seed=v) for v in range(2)]
    params = stack_params([dict(m.named_parameters()) for m in models])
    images, labels = x.reshape(2, 4, *x.shape[1:]), y.reshape(2, 4)  # 2 victims, k=2 sites x B=2 images each
    seen = observed_gradients(parse_defense("secagg:k=2"), models[0], params, images, labels, K, "train",
                              torch.Generator())
    whole = site_gradients(models[0], params, images, labels, K)  # one step on all 4 images of each victim
    for name in seen:
        assert torch.allclose(seen[name], whole[name], atol=1e-6), name
    plain = observed_gradients(parse_defense("none"), models[0], params, images, labels, K, "train",
                               torch.Generator())
    assert all(torch.equal(plain[n], whole[n]) for n in plain)
    noisy = observed_gradients(parse_defense("laplace:b=0.01"), models[0], params, images, labels, K, "train",
                               torch.Generator())
    assert (flatten_sites(noisy) - flatten_sites(whole)).abs().mean().item() == pytest.approx(0.01, rel=0.05)


def test_attack_records_the_defense_and_faces_k_times_b_images_under_secure_aggregation(tmp_path):
    out = tmp_path / "secagg"
    assert main(["attack", "--n-images", "4", "--defense", "secagg:k=2", "--out", str(out), *QUICK]) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 2 and all(len(r["items"]) == 2 and len(r["ssim"]) == 2 for r in results)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["defense"], summary["images_per_update"], summary["n_images"]) == ("secagg:k=2", 2, 4)
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["defense"] == "secagg:k=2" and config["defense_config"] == [{"defense": "secagg", "k": 2}]


def test_dpsgd_attack_reports_the_epsilon_its_noise_spends_over_the_assumed_run(tmp_path):
    out = tmp_path / "dp"
    assert main(["attack", "--n-images", "2", "--defense", "dpsgd:epsilon=8", "--out", str(out), *QUICK]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(8, rel=0.05) and summary["epsilon"] <= 8
    noise = json.loads((out / "config.json").read_text())["config"]["defense_config"][0]["noise_multiplier"]
    assert noise > 0.5


@pytest.mark.parametrize("spec, words", [("lap:b=1", "Unknown defense 'lap'"), ("laplace:b=0.01,0.005", "sweep"),
                                         ("secagg:k=3", "multiple of 3")])
def test_bad_defense_is_refused_in_one_sentence(tmp_path, capsys, spec, words):
    assert main(["attack", "--n-images", "4", "--defense", spec, "--out", str(tmp_path / "x"), *QUICK]) == 2
    assert words in capsys.readouterr().err


def test_client_level_dp_leaves_the_server_each_sites_update_unnoised_and_the_report_says_so(real_images, tmp_path):
    """The server adds client-level DP's noise to the aggregate after it has seen every site's update: what
    the curious server inverts is each plain update scaled to the clip norm, whatever epsilon the run spends."""
    x, y, K = real_images
    models = [build_model("lenet-idlg", K, 3, 16, seed=v) for v in range(2)]
    params = stack_params([dict(m.named_parameters()) for m in models])
    images, labels = x[:4].reshape(2, 2, *x.shape[1:]), y[:4].reshape(2, 2)
    plain = flatten_sites(site_gradients(models[0], params, images, labels, K))
    seen = flatten_sites(observed_gradients(parse_defense("cdp:noise=8,clip=0.5"), models[0], params, images, labels,
                                            K, "train", torch.Generator().manual_seed(0)))
    scale = (0.5 / plain.norm(dim=1)).clamp(max=1)
    assert torch.allclose(seen, plain * scale[:, None], atol=1e-6)
    out = tmp_path / "cdp"
    assert main(["attack", "--n-images", "2", "--defense", "cdp:noise=2", "--out", str(out), *QUICK]) == 0
    assert json.loads((out / "summary.json").read_text())["epsilon"] > 0
    assert "does not protect against the server" in (out / "report.html").read_text()
