"""The imprinted model: an agreed model behind an imprint module on its raw input (attacks.imprint crafts it).

It lives with the models because a site builds what a server describes: in a real federation the
server distributes the model, and a malicious one describes this architecture (the agreed model's
registry name plus a number of imprint rows) and sends its weights. Nothing about it is executable
beyond this class, so a site never unpickles anything it receives.
"""

from __future__ import annotations

import math

import torch
from torch import nn

IMPRINT_WEIGHT, IMPRINT_BIAS = "imprint.weight", "imprint.bias"
BODY = "body."  # the prefix of the agreed model's parameters inside an imprinted one


class ImprintedModel(nn.Module):
    """The agreed model `body` behind an imprint module on its raw input (what the malicious server sends)."""

    def __init__(self, body: nn.Module, image_shape: tuple[int, int, int], edges: torch.Tensor,
                 spread: float = 1e-3, gain: float = 1e-3) -> None:
        super().__init__()
        pixels = math.prod(image_shape)
        self.image_shape = tuple(image_shape)
        self.imprint = nn.Linear(pixels, len(edges))
        self.spread = nn.Linear(len(edges), pixels)
        with torch.no_grad():
            # Every row measures brightness, the mean pixel value, scaled by `gain`: small rows get large
            # gradients, so that a FedAvg weight change (new float32 weights minus old) keeps them exactly.
            self.imprint.weight.fill_(gain / pixels)
            self.imprint.bias.copy_(-gain * edges)
            # Equal columns: each firing row hands an image the same gradient back. The body sees its images
            # shifted in brightness by `spread` times the mean firing, little, and trains much as it would have.
            self.spread.weight.fill_(spread / gain / len(edges))
            self.spread.bias.zero_()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fired = torch.relu(self.imprint(x.flatten(1)))
        return self.body(x + self.spread(fired).reshape(x.shape))


def imprint_bins(weights: dict[str, torch.Tensor]) -> int:
    """How many imprint rows a model's weights carry (0: none, the agreed model itself)."""
    return int(weights[IMPRINT_WEIGHT].shape[0]) if IMPRINT_WEIGHT in weights else 0


def imprinted_architecture(body: nn.Module, image_shape: tuple[int, int, int], bins: int) -> ImprintedModel:
    """The architecture a site builds when told 'the agreed model behind `bins` imprint rows' (weights come after)."""
    return ImprintedModel(body, image_shape, torch.zeros(bins))


def body_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The agreed model's weights inside an imprinted model's (the imprint module dropped)."""
    return {n.removeprefix(BODY): w for n, w in weights.items() if n.startswith(BODY)}
