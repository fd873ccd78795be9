"""Trap weights: a unit that fired for one image alone gives that image back exactly."""

from __future__ import annotations

import torch

from medpfl.attacks.trap import first_pixel_layer, trap, trapped
from medpfl.experiments.attack_run import AttackRunConfig, run_attack
from medpfl.fl.gradients import model_params, site_gradients
from medpfl.models.registry import build_model


def test_a_unit_that_fired_for_one_image_alone_reads_it_exactly():
    model = build_model("mlp", 2, 1, 8, seed=0)
    name, layer = first_pixel_layer(model, (1, 8, 8))
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.weight.copy_(trapped(layer.weight, 3.0))
        fires = (images.flatten(1) @ layer.weight.T + layer.bias) > 0  # 3 x units, by hand
    update = site_gradients(model, model_params(model), images[None], torch.tensor([[0, 1, 1]]), 2)
    weight, bias = update[f"{name}.weight"][0].double(), update[f"{name}.bias"][0].double()
    alone = [(u, int(fires[:, u].nonzero())) for u in range(fires.shape[1]) if fires[:, u].sum() == 1]
    assert alone, "no unit fired for one image alone"
    for unit, image in alone:
        assert (weight[unit] / bias[unit] - images[image].flatten().double()).abs().max() < 1e-5
    silent = fires.sum(0) == 0
    assert silent.any() and (bias[silent] == 0).all()


def test_the_trap_attack_reads_batches_out_of_a_run_and_sites_would_refuse(tmp_path):
    config = AttackRunConfig(attack="trap", image_size=16, channels=1, batch_size=4, n_images=16, seed=0)
    summary = run_attack(config, tmp_path / "trap")
    assert summary["model"] == "mlp" and summary["asr"] >= 0.5
    assert summary["site_check_refused"] == 4 and "trap weights" in summary["site_check_reason"]
