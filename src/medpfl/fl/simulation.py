"""The in-process engine: the sites of a round train one after another, or at once with torch.func.vmap.

Vectorised, sites holding the same number of images share one batch structure (same steps, same batch
sizes), so they are stacked and run through one vmapped fl.local.local_update: each site's arithmetic is
that of the site alone (no padding, which would also corrupt BatchNorm's batch statistics), up to float
rounding, as batched kernels sum in another order. Sites of different sizes form separate groups; an IID
partition gives at most two. One after another, each site runs fl.rounds.site_update exactly as a Flower
client does, bit for bit.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vmap

from medpfl.fl.aggregate import apply_update
from medpfl.fl.local import LocalTraining, local_update
from medpfl.fl.model_check import ModelCheck
from medpfl.fl.rounds import RoundHooks, SiteRound, Update, ordered, site_update, update_norm


@dataclass
class RoundOutcome:
    """What one finished round produced."""

    weights: Update  # the new global weights
    update_norms: list[float]  # L2 norm of each site's sent update
    n_images: list[int]  # images behind each site's update
    seconds: float  # wall time of the round (local training, hooks, aggregation)


class InProcessFederation:
    """Sites' data held in memory and a round function; the caller owns the loop (and checkpoints)."""

    def __init__(self, model: nn.Module, sites: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                 training: LocalTraining, seed: int, hooks: RoundHooks | None = None, vectorise: bool = True,
                 model_check: ModelCheck | None = None):
        """`model` must be fit for torch.func (fl.gradients.functional_model); `sites` are (images, labels).
        With `model_check` every site verifies the weights it receives before it trains (fl.model_check)."""
        self.model, self.sites, self.num_classes = model, sites, num_classes
        self.model_check = model_check
        self.training, self.seed, self.vectorise = training, seed, vectorise
        self.hooks = hooks or RoundHooks()
        groups: dict[int, list[int]] = defaultdict(list)
        for s, (_, labels) in enumerate(sites):
            groups[len(labels)].append(s)
        self.groups = list(groups.values()) if vectorise else [[s] for s in range(len(sites))]

    def _raw_updates(self, weights: Update, round_index: int) -> list[Update]:
        """Every site's update before its transform, in site order."""
        updates: list[Update | None] = [None] * len(self.sites)
        for group in self.groups:
            if len(group) == 1:
                s = group[0]
                updates[s] = site_update(self.model, weights, *self.sites[s], self.num_classes, self.training,
                                         self.seed, round_index, s)
                continue
            pairs = [ordered(*self.sites[s], self.seed, round_index, s) for s in group]
            x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            train = vmap(lambda xs, ys: local_update(self.model, weights, xs, ys, self.num_classes, self.training))
            stacked = train(x, y)
            for j, s in enumerate(group):
                updates[s] = {n: u[j] for n, u in stacked.items()}
        return updates  # type: ignore[return-value]

    def run_round(self, weights: Update, round_index: int) -> RoundOutcome:
        """Round `round_index` (1-based) from the global `weights`: train, transform, observe, aggregate."""
        start = time.perf_counter()
        if self.model_check is not None:
            self.model_check.require(weights)  # the sites run one check; it refuses for all of them
        sent, n_images = [], [len(labels) for _, labels in self.sites]
        for s, update in enumerate(self._raw_updates(weights, round_index)):
            facts = SiteRound(round_index, s, n_images[s], self.training, self.seed)
            update = self.hooks.site_transform(update, facts)
            self.hooks.notify(facts, weights, update)
            sent.append(update)
        stacked = {n: torch.stack([u[n] for u in sent]) for n in weights}
        aggregated = self.hooks.aggregate(stacked, n_images)
        new = apply_update(weights, aggregated, self.training.protocol, self.training.lr)
        if new and next(iter(new.values())).is_cuda:
            torch.cuda.synchronize()
        return RoundOutcome(new, [update_norm(u) for u in sent], n_images, time.perf_counter() - start)
