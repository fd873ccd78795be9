"""A site's model check refuses imprinted and trapped models and lets an honest federation train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medpfl.attacks.imprint import ImprintedModel
from medpfl.attacks.trap import trap
from medpfl.fl.flower.federation import FederationSpec, federation_data, global_model
from medpfl.fl.gradients import functional_model
from medpfl.fl.model_check import ModelCheck, ModelRefused, fingerprint
from medpfl.fl.simulation import InProcessFederation
from medpfl.models.registry import build_model

SPEC = FederationSpec(sites=2, site_images=8, rounds=4, model="lenet-idlg", image_size=16, channels=1,
                      protocol="fedavg", local_epochs=1, local_batch=4, lr=0.05, momentum=0.0, seed=1)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _conv_imprint(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The agreed LeNet whose first filters all measure a patch's brightness, each firing above its own level:
    an imprint hidden inside the agreed architecture (no new parameter)."""
    name = next(n for n, w in weights.items() if w.dim() == 4)
    bias = name.removesuffix("weight") + "bias"
    out = dict(weights)
    out[name] = torch.full_like(weights[name], 1 / weights[name][0].numel())
    out[bias] = -torch.linspace(0, 1, len(weights[bias]))
    return out


def test_an_imprinted_model_is_refused_by_its_fingerprint_and_by_its_rows_alone():
    honest = build_model("lenet-idlg", 6, 1, 16, seed=0)
    imprinted = _params(ImprintedModel(honest, (1, 16, 16), torch.linspace(-1, 0.9, 64)))
    reason = ModelCheck(fingerprint(_params(honest))).verify(imprinted)
    assert reason.startswith("The site refuses to train: the received model has 4 parameter(s)")
    assert "imprint.weight (64 x 256)" in reason
    # A server malicious from the first round: the site enrolled on the imprinted model itself.
    reason = ModelCheck().verify(imprinted)
    assert "layer imprint has 64 rows taking the same measurement" in reason and "64 staggered" in reason
    assert ModelCheck().verify(_params(honest)) is None


def test_trap_weights_are_refused_and_the_layers_own_draw_is_not():
    honest = build_model("mlp", 6, 3, 16, seed=0)
    public = torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    sent = _params(trap().craft(honest, (3, 16, 16), public, 8))
    assert ModelCheck().verify(_params(honest)) is None
    # Same architecture, so the fingerprint passes; the weights do not.
    reason = ModelCheck(fingerprint(_params(honest))).verify(sent)
    assert "layer hidden has negative weights" in reason and "trap weights" in reason
    # The trap's effect that the signature stands for: each unit fires for few of these images.
    images = public.flatten(1)
    assert ((images @ sent["hidden.weight"].T + sent["hidden.bias"]) > 0).double().mean() < 0.2
    assert ((images @ honest.hidden.weight.detach().T + honest.hidden.bias.detach()) > 0).double().mean() > 0.3


def test_an_honest_federation_trains_every_round_and_an_imprinted_round_is_refused():
    data = federation_data(SPEC)
    model = functional_model(global_model(SPEC, data.num_classes))
    weights = _params(model)
    check = ModelCheck(fingerprint(weights))
    federation = InProcessFederation(model, data.sites, data.num_classes, SPEC.training, SPEC.seed, model_check=check)
    for r in range(1, SPEC.rounds + 1):
        new = federation.run_round(weights, r).weights
        assert any(not torch.equal(new[n], weights[n]) for n in weights)  # the sites trained
        weights = new
    with pytest.raises(ModelRefused, match="layer body.0 has 12 rows taking the same measurement"):
        federation.run_round(_conv_imprint(weights), SPEC.rounds + 1)


def test_a_flower_site_refuses_a_model_with_an_anchor():
    pytest.importorskip("flwr")
    from medpfl.fl.flower.simulation import run_simulation

    data = federation_data(SPEC)
    anchored = _conv_imprint(_params(global_model(SPEC, data.num_classes)))
    # The sites' error replies reach the server, which ends the run with their reason.
    with pytest.raises(ModelRefused, match="In round 1 the sites refused the model the server sent: .* layer "
                                           "arrays/body.0 has 12 rows taking the same measurement"):
        run_simulation(FederationSpec(**{**SPEC.__dict__, "rounds": 1}), weights=anchored)


def test_numbered_arrays_are_compared_by_position_and_the_first_difference_is_named():
    # Flower's legacy records (SecAgg+) number the arrays: an imprinted model's extra ones come first.
    honest = build_model("lenet-idlg", 6, 1, 16, seed=0)
    imprinted = ImprintedModel(honest, (1, 16, 16), torch.linspace(-1, 0.9, 64))

    def numbered(model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"fitins.parameters/{i}": p.detach() for i, p in enumerate(model.parameters())}

    reason = ModelCheck(fingerprint(numbered(honest))).verify(numbered(imprinted))
    assert reason == ("The site refuses to train: the received model has 12 arrays where the agreed architecture "
                      "has 8; array 0 is 64 x 256 float32 where the agreed one is 12 x 1 x 5 x 5 float32.")
