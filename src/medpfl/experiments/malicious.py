"""A malicious server inside a federated training run: at the attacked rounds it sends the model an attack
crafts (attacks.imprint, attacks.trap) instead of the global one, and notes what the sites' check
(fl.model_check) says of each model it sends, whether or not the sites run it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from medpfl.fl.model_check import ModelCheck, fingerprint
from medpfl.fl.rounds import Update

# SecAgg+ quantizes what the sites send to steps of about 4e-6 (fl.flower.secagg: +-8 over 2**22 levels). At
# the imprint's default spread (1e-3) a bin's gradient is of order 1e-5 and loses images to that rounding; at
# 0.1 the gradients are 100 times larger, while the body's input moves by about a quarter of `spread` in
# brightness. benchmarks/imprint_flower.py measures both against the exact in-process mean. A server that runs
# SecAgg+ knows its step.
SECURE_AGGREGATION_SPREAD = 0.1


def for_secure_aggregation(attack, settings: dict) -> None:
    """Scale an imprint attack's gradients above SecAgg+'s quantization step, unless `settings` chose a spread."""
    if hasattr(attack.settings, "spread") and "spread" not in settings:
        attack.settings.spread = SECURE_AGGREGATION_SPREAD


class MaliciousServer:
    """A round's `tamper` (fl.rounds.Tamper; the in-process engine's and fl.flower.secagg's): crafted weights at
    `rounds`, built around the global model of the round.

    `public_images` are the server's own images like the sites' (the federation's held-out test set), on
    which the attack places its bins or scales its traps; `images_per_update` are the images behind what
    the server will read (every site's under secure aggregation, else one site's)."""

    def __init__(self, attack, model: nn.Module, image_shape: tuple[int, int, int], public_images: torch.Tensor,
                 rounds: list[int], images_per_update: int) -> None:
        self.attack, self.model, self.image_shape = attack, model, image_shape
        self.public, self.rounds, self.images_per_update = public_images.cpu(), set(rounds), images_per_update
        self.verdicts: dict[int, str | None] = {}  # round -> the check's reason to refuse (None: it would pass)

    def __call__(self, round_index: int, weights: Update) -> Update | None:
        if round_index not in self.rounds:
            return None
        body = copy.deepcopy(self.model).cpu()
        with torch.no_grad():
            for name, p in body.named_parameters():
                p.copy_(weights[name])
        honest = {n: p.detach().clone() for n, p in body.named_parameters()}
        sent = self.attack.craft(body, self.image_shape, self.public, self.images_per_update)
        crafted = {n: p.detach().clone() for n, p in sent.named_parameters()}
        # What a site that agreed on the honest architecture at enrolment answers (fl.model_check).
        self.verdicts[round_index] = ModelCheck(fingerprint(honest)).verify(crafted)
        return crafted
