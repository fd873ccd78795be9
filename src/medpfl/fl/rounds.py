"""One round of federated training as every engine runs it, and the seams where a curious server and
defenses plug in.

A round: the server sends its weights (the payload) to every site; each site runs `site_update` (its
images in the round's seeded order, then fl.local.local_update), passes the result through its
`site_transform` (a defense; identity by default) and sends it; the server hands what it received to
its observers (the curious server's seat), then aggregates (sample-weighted FedAvg by default) and
applies the result. The in-process engine and the Flower engine both call these pieces, so they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from medpfl.fl.aggregate import apply_update, weighted_average
from medpfl.fl.local import LocalTraining, local_update
from medpfl.models.imprint import body_weights, imprint_bins, imprinted_architecture
from medpfl.seeds import SITE_NOISE, site_order, torch_seed

Update = dict[str, torch.Tensor]
AGGREGATE = -1  # the "site" of an observation that is the aggregate of every site (secure aggregation)
# A malicious server's choice: the weights it sends at a round instead of the global ones (e.g. an imprinted
# model's, models.imprint), or None to send the global model.
Tamper = Callable[[int, Update], Update | None]


@dataclass(frozen=True)
class SiteRound:
    """One site's part in one round and the protocol facts behind its update (what a threat model may grant)."""

    round: int  # 1-based
    site: int  # 0-based
    n_images: int  # local images behind the update
    training: LocalTraining  # protocol, local epochs, batch size, learning rate, momentum
    seed: int  # the run's seed

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The site's own random stream this round (e.g. a defense's noise), independent of all others."""
        return torch.Generator(device).manual_seed(torch_seed(self.seed, SITE_NOISE, self.round, self.site))


@dataclass
class SiteObservation:
    """What the server holds of one site in one round: the weights it sent and the update it got back."""

    facts: SiteRound
    weights: Update  # the server payload of that round, parameter name -> tensor
    update: Update  # as the site sent it (after its transform): gradient (fedsgd) or weight change (fedavg)


class RoundObserver(Protocol):
    """The curious server: sees the chosen sites' updates of the chosen rounds before aggregation."""

    def wants(self, round_index: int, site: int) -> bool:
        """Whether to be handed this site's update in this round."""

    def observe(self, seen: SiteObservation) -> None:
        """Receive one site's update (copies: changing them changes nothing in training)."""


class KeptObservations:
    """A RoundObserver that keeps everything it is handed, every site and round, in `seen` (a measurement beside
    the server's own)."""

    def __init__(self) -> None:
        self.seen: list[SiteObservation] = []

    def wants(self, round_index: int, site: int) -> bool:
        return True

    def observe(self, seen: SiteObservation) -> None:
        self.seen.append(seen)


SiteTransform = Callable[[Update, SiteRound], Update]  # a site-side defense: update -> what is sent
Aggregator = Callable[[Update, Sequence[int]], Update]  # server side: updates stacked over sites -> one


def send_as_is(update: Update, facts: SiteRound) -> Update:
    """The site transform of an undefended federation."""
    return update


@dataclass
class RoundHooks:
    """Where defenses and the curious server plug into a round, identically in every engine."""

    site_transform: SiteTransform = send_as_is
    aggregate: Aggregator = weighted_average
    observers: Sequence[RoundObserver] = field(default_factory=tuple)

    def notify(self, facts: SiteRound, weights: Update, update: Update) -> None:
        """Hand one received update to every observer that wants it."""
        for observer in self.observers:
            if observer.wants(facts.round, facts.site):
                observer.observe(SiteObservation(facts, {n: w.detach().clone() for n, w in weights.items()},
                                                 {n: u.detach().clone() for n, u in update.items()}))


def ordered(images: torch.Tensor, labels: torch.Tensor, seed: int, round_index: int,
            site: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's images and labels in the order it visits them in this round (seeded per run, round, site)."""
    order = torch.as_tensor(site_order(seed, round_index, site, len(labels)), device=labels.device)
    return images[order], labels[order]


def site_update(model: nn.Module, weights: Update, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                training: LocalTraining, seed: int, round_index: int, site: int) -> Update:
    """The update one site computes in a round, before any defense: what a Flower client calls."""
    x, y = ordered(images, labels, seed, round_index, site)
    return local_update(model, weights, x, y, num_classes, training)


def received_architecture(agreed: nn.Module, sent: Update, image_shape: tuple[int, int, int]) -> nn.Module:
    """The architecture of the weights a server sent: the agreed model, or it behind an imprint module."""
    bins = imprint_bins(sent)
    return imprinted_architecture(agreed, image_shape, bins) if bins else agreed


def next_global(sent: Update, aggregated: Update, protocol: str, lr: float) -> Update:
    """The next global weights: the sites' aggregate applied to the weights the server sent (their updates are
    relative to those), without the imprint module of an imprinted model: the agreed model trains on."""
    new = apply_update(sent, aggregated, protocol, lr)
    return body_weights(new) if imprint_bins(sent) else new


def update_norm(update: Update) -> float:
    """L2 norm of a whole update (all parameters together)."""
    return float(torch.sqrt(sum((u.double() ** 2).sum() for u in update.values())))
