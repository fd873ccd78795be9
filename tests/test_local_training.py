"""A site's local training, the one function every engine and the update-inversion attack share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from medpfl.errors import MedPFLError
from medpfl.fl.gradients import functional_model, parameter_gradient
from medpfl.fl.local import LocalTraining, local_update
from medpfl.models.registry import build_model


@pytest.fixture(scope="module")
def site():
    model = build_model("convnet", 3, 3, 16, norm="group", seed=0)
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    return functional_model(model), params, torch.rand(8, 3, 16, 16, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def test_fedsgd_update_is_the_gradient_and_one_fedavg_step_moves_against_it(site):
    model, params, x, y = site
    gradient = parameter_gradient(model, params, x, F.one_hot(y, 3).float())
    fedsgd = local_update(model, params, x, y, 3, LocalTraining("fedsgd"))
    one_step = local_update(model, params, x, y, 3, LocalTraining("fedavg", batch_size=8, lr=0.1))
    for name in gradient:
        torch.testing.assert_close(fedsgd[name], gradient[name])
        torch.testing.assert_close(one_step[name], -0.1 * gradient[name])


def test_fedavg_matches_torch_sgd_with_momentum(site):
    model, params, x, y = site
    training = LocalTraining("fedavg", epochs=2, batch_size=3, lr=0.05, momentum=0.9)
    update = local_update(model, params, x, y, 3, training)
    net = build_model("convnet", 3, 3, 16, norm="group", seed=0)
    sgd = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for start in range(0, 8, 3):
            sgd.zero_grad()
            F.cross_entropy(net(x[start:start + 3]), y[start:start + 3]).backward()
            sgd.step()
    assert training.steps(8) == 6
    for name, p in net.named_parameters():
        torch.testing.assert_close(update[name], p.detach() - params[name], atol=1e-6, rtol=1e-4)


def test_update_is_differentiable_in_the_images_and_vectorises_over_sites(site):
    model, params, x, y = site
    training = LocalTraining("fedavg", epochs=1, batch_size=4, lr=0.1)
    dummy = x.clone().requires_grad_()
    update = local_update(model, params, dummy, y, 3, training, create_graph=True)
    sum((u ** 2).sum() for u in update.values()).backward()
    assert dummy.grad is not None and dummy.grad.abs().sum() > 0
    two_sites = vmap(lambda p, xs, ys: local_update(model, p, xs, ys, 3, training))(
        model_params_of(params, 2), torch.stack([x, x.flip(0)]), torch.stack([y, y.flip(0)]))
    alone = local_update(model, params, x.flip(0), y.flip(0), 3, training)
    for name in alone:
        torch.testing.assert_close(two_sites[name][1], alone[name], atol=1e-6, rtol=1e-5)


def model_params_of(params: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v[None].expand(n, *v.shape).clone() for k, v in params.items()}


def test_bad_settings_are_named():
    with pytest.raises(MedPFLError, match="--protocol"):
        LocalTraining("fedprox")
    with pytest.raises(MedPFLError, match="--local-batch"):
        LocalTraining(batch_size=0)
