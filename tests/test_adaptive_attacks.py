"""Attacks that know the defense, each on a known defended update of real images (16 px, iDLG's LeNet)."""

from __future__ import annotations

import json

import pytest
import torch

from medpfl.attacks import ObservedUpdate, ServerPayload, build_attack
from medpfl.cli import main
from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.defenses import parse_defense
from medpfl.defenses.observe import observed_gradients
from medpfl.fl.gradients import stack_params
from medpfl.metrics.image import ssim
from medpfl.models.registry import build_model


@pytest.fixture(scope="module")
def real_images():
    source = embedded_source()
    x, y = ImageDataset(source, sample_items(source.items, 4, seed=0), size=16).load_batch(range(4))
    return x, y, len(source.classes)


def defended(spec: str, images: torch.Tensor, labels: torch.Tensor, K: int):
    """The server's payload (with the defense its protocol prescribes) and the defended update of victims
    V x B x C x H x W, one fresh iDLG LeNet each."""
    chain = parse_defense(spec).calibrated()
    models = [build_model("lenet-idlg", K, images.shape[2], images.shape[-1], seed=v) for v in range(len(images))]
    params = stack_params([{n: p.detach() for n, p in m.named_parameters()} for m in models])
    gradients = observed_gradients(chain, models[0], params, images, labels, K, "train",
                                   torch.Generator().manual_seed(7))
    payload = ServerPayload(models[0], params, K, tuple(images.shape[2:]), defense=chain)
    return payload, ObservedUpdate(gradients, images.shape[1] * chain.sites_per_update)


def quality(attack: str, payload, update, originals, **settings) -> list[float]:
    result = build_attack(attack, **settings).reconstruct(payload, update, torch.Generator().manual_seed(0))
    return ssim(result.images[:, 0], originals).tolist()


@pytest.mark.parametrize("attack", ["sparse-l2", "sparse-cosine"])
def test_matching_only_the_kept_entries_reconstructs_a_top_k_update(real_images, attack):
    """Half the update pruned: matching the kept entries alone recovers the images; the same attack matching
    every entry (the pruned ones as zeros, as a defense-blind attacker does) does not."""
    x, y, K = real_images
    images, labels = x[:1, None], y[:1, None]
    payload, update = defended("topk:prune=0.5", images, labels, K)
    assert (update.gradients["fc.weight"] == 0).float().mean() > 0.3  # the defense really pruned
    budget = {"restarts": 0, "steps": 60}
    assert quality(attack, payload, update, images[:, 0], **budget)[0] > 0.95
    assert quality(attack, payload, update, images[:, 0], **budget, support="all")[0] < 0.9


def test_strongest_reports_each_images_best_attack_and_contains_the_plain_run_exactly(tmp_path):
    """`--attack strongest` on a top-k update: per image the best candidate by SSIM and the winner's name; its
    plain iDLG candidate is the very answer a separate `--attack idlg` run gives, so it is never below it."""
    quick = ["--image-size", "16", "--n-images", "2", "--defense", "topk:prune=0.5", "--steps", "30",
             "--restarts", "0", "--quiet"]
    assert main(["attack", "--attack", "strongest", "--out", str(tmp_path / "strongest"), *quick]) == 0
    assert main(["attack", "--attack", "idlg", "--model", "lenet-idlg", "--out", str(tmp_path / "plain"), *quick]) == 0
    strongest = [json.loads(line) for line in (tmp_path / "strongest" / "results.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp_path / "plain" / "results.jsonl").read_text().splitlines()]
    for s, p in zip(strongest, plain):
        assert set(s["ssim_by_attack"]) == {"idlg", "sparse-l2", "sparse-cosine"}
        assert s["ssim_by_attack"]["idlg"] == p["ssim"]
        best = max(s["ssim_by_attack"], key=lambda name: s["ssim_by_attack"][name][0])
        assert s["winner"] == [best] and s["ssim"] == s["ssim_by_attack"][best]
        assert s["attacker_pick_ssim"] == s["ssim_by_attack"][s["attacker_pick"]]
    summary = json.loads((tmp_path / "strongest" / "summary.json").read_text())
    assert summary["asr"] >= json.loads((tmp_path / "plain" / "summary.json").read_text())["asr"]
    assert sum(summary["wins"].values()) == 2
