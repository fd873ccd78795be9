"""Model zoo: shapes at every size, the papers' flattened sizes, seeded init, vmap and double backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from medpfl.errors import MedPFLError
from medpfl.models import (
    MODELS,
    LeNet,
    build_model,
    group_count,
    init_weights,
    lenet_feature_size,
    model_names,
)

LENETS = ["lenet-dlg", "lenet-idlg", "lenet-cpl"]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 64])
def test_output_shape_small_inputs(name: str, channels: int, size: int) -> None:
    model = build_model(name, num_classes=5, in_channels=channels, image_size=size)
    out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["lenet-dlg", "lenet-idlg", "lenet-cpl", "convnet"])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_224(name: str, channels: int) -> None:
    model = build_model(name, num_classes=3, in_channels=channels, image_size=224)
    assert model(torch.rand(1, channels, 224, 224)).shape == (1, 3)


@pytest.mark.parametrize(("name", "channels"), [("resnet18", 1), ("resnet18-imagenet", 3)])
def test_resnet_224_once_per_stem(name: str, channels: int) -> None:
    model = build_model(name, num_classes=4, in_channels=channels, image_size=224).eval()
    with torch.no_grad():
        assert model(torch.rand(1, channels, 224, 224)).shape == (1, 4)


def test_paper_flattened_sizes_at_32() -> None:
    assert build_model("lenet-dlg", 10).fc.in_features == 768
    assert build_model("lenet-idlg", 10).fc.in_features == 768
    assert build_model("lenet-cpl", 10).fc.in_features == 40000
    # Computed from the input size, not hard-coded: 64 -> 16x16 maps of 12 channels; CPL 64 -> 82.
    assert lenet_feature_size("dlg", 64) == 12 * 16 * 16
    assert lenet_feature_size("cpl", 64) == 16 * 82 * 82
    assert lenet_feature_size("dlg", 33) == 12 * 9 * 9


def test_lenet_layers_match_paper() -> None:
    convs = [m for m in build_model("lenet-dlg", 10).modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 12, (5, 5), (2, 2), (2, 2)),
        (12, 12, (5, 5), (2, 2), (2, 2)),
        (12, 12, (5, 5), (1, 1), (2, 2)),
        (12, 12, (5, 5), (1, 1), (2, 2)),
    ]
    for name in LENETS:
        acts = [m for m in build_model(name, 10).modules() if isinstance(m, (nn.Sigmoid, nn.ReLU))]
        assert acts and all(isinstance(a, nn.Sigmoid) for a in acts)


def test_uniform_init_covers_minus_half_to_half() -> None:
    for name in LENETS + ["convnet"]:
        values = torch.cat([p.flatten() for p in build_model(name, 10, init="uniform").parameters()])
        assert values.min() >= -0.5 and values.max() <= 0.5
        # Really U(-0.5, 0.5), not a narrower default init: the tails are reached.
        assert values.min() < -0.45 and values.max() > 0.45


def test_lenets_default_to_uniform_others_to_torch_default() -> None:
    assert build_model("lenet-idlg", 2).fc.weight.abs().max() > 0.45
    fc = build_model("convnet", 2).fc  # 128 inputs: torch's bound is 1/sqrt(128) ~ 0.088
    assert fc.weight.abs().max() <= 1 / 128**0.5 + 1e-6


def test_default_scheme_reproduces_torch_own_init() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        reference = LeNet("idlg", 4, 3, 32)  # initialised by torch's reset_parameters from the global RNG
    ours = init_weights(copy.deepcopy(reference), "default", torch.Generator().manual_seed(7))
    for (name, a), b in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_kaiming_scheme_scale_and_norm_reset() -> None:
    model = build_model("resnet18", 10, init="kaiming", norm="batch")
    conv = model.layer4[0].conv2.weight  # 512 x 512 x 3 x 3, fan_out = 4608
    assert abs(conv.std().item() - (2 / 4608) ** 0.5) < 0.002
    assert torch.all(model.layer4[0].bn2.weight == 1) and torch.all(model.layer4[0].bn2.bias == 0)


@pytest.mark.parametrize("name", model_names())
def test_seed_determinism(name: str) -> None:
    size = 32
    a = _params(build_model(name, 3, image_size=size, norm="group", seed=11))
    torch.manual_seed(12345)  # the global RNG must not matter
    b = _params(build_model(name, 3, image_size=size, norm="group", seed=11))
    c = _params(build_model(name, 3, image_size=size, norm="group", seed=12))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1)


def test_building_leaves_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    build_model("convnet", 3)
    build_model("lenet-cpl", 3)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", ["convnet", "resnet18", "resnet18-imagenet"])
def test_group_norm_variant_has_no_batchnorm(name: str) -> None:
    model = build_model(name, 3, norm="group")
    kinds = {type(m) for m in model.modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert nn.GroupNorm in kinds
    assert nn.BatchNorm2d in {type(m) for m in build_model(name, 3, norm="batch").modules()}


def test_group_count() -> None:
    assert group_count(64) == 32 and group_count(512) == 32
    assert group_count(12) == 12 and group_count(48) == 24 and group_count(3) == 3
    assert group_count(32, max_groups=8) == 8


def test_registry_lists_every_model() -> None:
    assert model_names() == list(MODELS)
    assert {"lenet-dlg", "lenet-idlg", "lenet-cpl", "convnet", "resnet18", "resnet18-imagenet"} <= set(MODELS)


def test_unknown_model_names_option_and_choices() -> None:
    with pytest.raises(MedPFLError, match=r"--model 'vgg'.*lenet-dlg.*resnet18-imagenet"):
        build_model("vgg", 2)


def test_impossible_image_size_names_option() -> None:
    with pytest.raises(MedPFLError, match="--image-size 16.*at least 32"):
        build_model("resnet18-imagenet", 2, image_size=16)
    with pytest.raises(MedPFLError, match="--image-size 0"):
        build_model("lenet-dlg", 2, image_size=0)


def test_unknown_init_and_norm() -> None:
    with pytest.raises(MedPFLError, match="--init 'xavier'.*uniform"):
        build_model("convnet", 2, init="xavier")
    with pytest.raises(MedPFLError, match="--norm 'layer'.*group"):
        build_model("convnet", 2, norm="layer")


def _matching_loss(model: nn.Module, label: torch.Tensor):
    """Gradient-matching loss of DLG: sum of squared differences between a dummy gradient and a target."""

    def ce(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), label)

    def match(params: dict[str, torch.Tensor], x: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
        dummy = grad(ce)(params, x)
        return sum(((dummy[k] - target[k]) ** 2).sum() for k in dummy)

    return ce, match


@pytest.mark.parametrize("name", LENETS)
def test_double_backward_through_lenet(name: str) -> None:
    model = build_model(name, 4, seed=3)
    params = _params(model)
    label = torch.tensor([2])
    ce, match = _matching_loss(model, label)
    target = grad(ce)(params, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    x_grad = grad(match, argnums=1)(params, torch.rand(1, 3, 32, 32), target)
    assert torch.isfinite(x_grad).all() and x_grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "norm"), [("lenet-dlg", "batch"), ("convnet", "group"), ("convnet", "none")])
def test_vmap_over_victims_equals_loop(name: str, norm: str) -> None:
    # Two victims with different weights, images and targets, attacked at once as the attack engine does.
    model = build_model(name, 4, norm=norm, seed=0)
    victims = [_params(build_model(name, 4, norm=norm, seed=s)) for s in (1, 2)]
    label = torch.tensor([1])
    ce, match = _matching_loss(model, label)
    gen = torch.Generator().manual_seed(5)
    truths = [torch.rand(1, 3, 32, 32, generator=gen) for _ in victims]
    targets = [grad(ce)(p, x) for p, x in zip(victims, truths)]
    dummies = [torch.rand(1, 3, 32, 32, generator=gen) for _ in victims]

    looped = torch.stack([grad(match, argnums=1)(p, d, t) for p, d, t in zip(victims, dummies, targets)])

    def stack(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}

    batched = vmap(grad(match, argnums=1))(stack(victims), torch.stack(dummies), stack(targets))
    assert not torch.equal(looped[0], looped[1])
    # Batched and looped convolutions sum in different orders; allow float32 noise relative to the scale.
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-5 * looped.abs().max().item())


def test_a_registered_model_is_built_by_name_and_offered_by_the_cli(capsys) -> None:
    from medpfl.cli import main
    from medpfl.models import ModelEntry, register_model

    entry = ModelEntry("tiny-linear", lambda k, c, n, norm: nn.Sequential(nn.Flatten(), nn.Linear(c * n * n, k)),
                       "one linear layer on the pixels", min_image_size=4)
    register_model(entry)
    try:
        model = build_model("tiny-linear", 3, in_channels=1, image_size=8, seed=2)
        assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)
        # The seeded default initialisation, as for the zoo's own: the same seed, the same weights.
        assert torch.equal(model[1].weight, build_model("tiny-linear", 3, 1, 8, seed=2)[1].weight)
        assert not torch.equal(model[1].weight, build_model("tiny-linear", 3, 1, 8, seed=3)[1].weight)
        with pytest.raises(MedPFLError, match="--image-size 2 is too small for --model tiny-linear; use at least 4"):
            build_model("tiny-linear", 3, 1, 2)
        with pytest.raises(ValueError, match="registered already"):
            register_model(entry)
        with pytest.raises(SystemExit):
            main(["attack", "--help"])
        assert "tiny-linear" in capsys.readouterr().out
    finally:
        MODELS.unregister("tiny-linear")
    assert "tiny-linear" not in model_names()
