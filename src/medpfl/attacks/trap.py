"""A malicious server's trap weights: read images out of a fully connected first layer (Boenisch et al. 2023).

The server keeps the agreed architecture and changes only the weights of its first fully connected layer
on the pixels: it scales each row's negative weights up by a factor s, so that each ReLU unit fires for few
inputs (s is set on the server's public images so that a unit fires for about one image in a batch). A
unit that fired for one image alone holds it exactly: its weight-gradient row over its bias gradient is
that image, and every unit that caught the same image alone gives the same readout, which is how the
attacker tells clean readouts from blends of several images.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from medpfl.attacks.base import SettingsAttack
from medpfl.attacks.labels import recover_labels
from medpfl.attacks.registry import AttackEntry, register
from medpfl.attacks.threat import ObservedUpdate, Reconstruction, ServerPayload, ThreatModel
from medpfl.errors import MedPFLError

SAME_READOUT = 1e-3  # RMS pixel distance below which two units' readouts are one image
PUBLIC_FOR_SCALE = 128  # public images the firing share is measured on while setting the scale


def first_pixel_layer(model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[str, nn.Linear]:
    """The first fully connected layer that takes the raw pixels, and its name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.in_features == math.prod(image_shape):
            return name, module
    raise MedPFLError("--attack trap sets trap weights in a fully connected first layer on the pixels; this model "
                      "has none: use --model mlp.")


def trapped(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """`weight` with every negative entry scaled by `scale`."""
    return torch.where(weight < 0, weight * scale, weight)


def firing_share(weight: torch.Tensor, bias: torch.Tensor, images: torch.Tensor) -> float:
    """Share of (image, unit) pairs for which the unit's pre-activation is positive."""
    return float(((images.flatten(1) @ weight.T + bias) > 0).double().mean())


@dataclass
class TrapSettings:
    """How the malicious server sets its traps."""

    scale: float | None = None  # None: the factor at which a unit fires for about one public image in a batch
    fires_per_batch: float = 1.0


class TrapAttack(SettingsAttack):
    """Trap weights: the server sends the agreed model with trapped first-layer weights and reads lone images."""

    name = "trap"
    settings_class = TrapSettings
    takes_checkpoints = False  # a readout, no optimisation

    def scale_for(self, layer: nn.Linear, public_images: torch.Tensor, images_per_update: int) -> float:
        """The settings' scale, or the one (bisected on a log scale) at which units fire for the wanted share."""
        if self.settings.scale is not None:
            return float(self.settings.scale)
        target = self.settings.fires_per_batch / images_per_update
        public_images = public_images[:PUBLIC_FOR_SCALE]
        low, high = 1.0, 1e4
        for _ in range(24):  # the interval shrinks to a factor of 1e4 ** (2 ** -24): exact enough
            middle = math.sqrt(low * high)
            if firing_share(trapped(layer.weight.detach(), middle), layer.bias.detach(), public_images) > target:
                low = middle
            else:
                high = middle
        return math.sqrt(low * high)

    def craft(self, model: nn.Module, image_shape: tuple[int, int, int], public_images: torch.Tensor,
              images_per_update: int) -> nn.Module:
        """The model the server sends instead of `model`: same architecture, trapped first-layer weights."""
        sent = copy.deepcopy(model)
        _, layer = first_pixel_layer(sent, image_shape)
        scale = self.scale_for(layer, public_images, images_per_update)
        with torch.no_grad():
            layer.weight.copy_(trapped(layer.weight, scale))
        return sent

    def reconstruct(self, payload: ServerPayload, update: ObservedUpdate, generator: torch.Generator) -> Reconstruction:
        """Each victim's images: readouts that several units agree on first, then the rest; V x B x C x H x W."""
        start = time.perf_counter()
        name, _ = first_pixel_layer(payload.model, payload.image_shape)
        V, B = payload.n_victims, update.batch_size
        images = torch.zeros(V, B, *payload.image_shape)
        clean = []
        for v in range(V):
            weight = update.gradients[f"{name}.weight"][v].double()
            bias = update.gradients[f"{name}.bias"][v].double()
            fired = bias.abs() > 1e-9 * bias.abs().max().clamp_min(1e-30)
            readouts = (weight[fired] / bias[fired, None]).clamp(0, 1)
            picked, agreed = _distinct_readouts(readouts, B)
            clean.append(agreed)
            images[v, :len(picked)] = picked.float().reshape(-1, *payload.image_shape).cpu()
        labels = recover_labels(update, payload)
        return Reconstruction(images=images, labels=labels.cpu(), objective=torch.zeros(V),
                              evaluations=torch.zeros(V, dtype=torch.long), diverged=torch.zeros(V, dtype=torch.bool),
                              seconds=time.perf_counter() - start, extra={"readouts_agreed": clean})


def _distinct_readouts(readouts: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Up to `count` distinct readouts, those that most units agree on first; and how many had agreement."""
    if len(readouts) == 0:
        return readouts, 0
    distance = torch.cdist(readouts, readouts) / math.sqrt(readouts.shape[1])
    same = distance < SAME_READOUT
    order = same.sum(1).argsort(descending=True, stable=True)
    picked: list[int] = []
    for i in order.tolist():
        if len(picked) == count:
            break
        if not any(same[i, j] for j in picked):
            picked.append(i)
    agreed = sum(int(same[i].sum()) > 1 for i in picked)
    return readouts[picked], agreed


trap = TrapAttack  # trap(**settings): units firing for about one image per batch, overridden by `settings`

# Trap weights go in a fully connected first layer on the pixels: the MLP's.
register(AttackEntry(
    "trap", TrapAttack, "Trap weights: a malicious server scales the negative weights of the first fully connected "
    "layer so that few images fire each unit, and reads images that fired a unit alone (Boenisch et al. 2023)",
    "trap weights", "is a dishonest server: it alters the first layer of the model it sends so that each of its "
    "units reacts to few images, then reads every image that alone set off a unit straight out of the update "
    "(Boenisch et al. 2023)", default_model="mlp", threat=ThreatModel(modifies_model=True)))
