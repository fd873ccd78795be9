"""The in-process engine: the sites of a round train in parallel on the CPU's cores, or at once with vmap.

On a CPU each site trains in a thread of its own with one torch thread, as many at a time as torch has
threads (the cores), each thread with its own copy of the model (torch.func.functional_call swaps a
module's parameters, so one module cannot serve two threads). A site's arithmetic is therefore the same
whatever the number of cores, and is that of a Flower client run with one thread, bit for bit: both call
fl.rounds.site_update. Sites training side by side beat one site spread over every core here, as a
site's kernels (small images, batches of 16) are too small to split well.

Vectorised (on accelerators), sites holding the same number of images share one batch structure (same
steps, same batch sizes), so they are stacked and run through one vmapped fl.local.local_update: each
site's arithmetic is that of the site alone (no padding, which would also corrupt BatchNorm's batch
statistics), up to float rounding, as batched kernels sum in another order. Sites of different sizes
form separate groups; an IID partition gives at most two.
"""

from __future__ import annotations

import copy
import queue
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vmap

from medpfl.fl.local import LocalTraining, local_update
from medpfl.fl.model_check import ModelCheck
from medpfl.fl.rounds import (RoundHooks, SiteRound, Tamper, Update, next_global, ordered, received_architecture,
                              site_update, update_norm)


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
                 model_check: ModelCheck | None = None, workers: int | None = None, tamper: Tamper | None = None):
        """`model` must be fit for torch.func (fl.gradients.functional_model); `sites` are (images, labels).
        With `model_check` every site verifies the weights it receives before it trains (fl.model_check).
        `workers`: sites training at once on a CPU (default: torch's thread count, at most one per site).
        `tamper` makes the server malicious: it sends the weights it returns instead of the global ones."""
        self.model, self.sites, self.num_classes = model, sites, num_classes
        self.model_check, self.tamper = model_check, tamper
        self.training, self.seed, self.vectorise = training, seed, vectorise
        self.hooks = hooks or RoundHooks()
        groups: dict[int, list[int]] = defaultdict(list)
        for s, (_, labels) in enumerate(sites):
            groups[len(labels)].append(s)
        self.groups = list(groups.values()) if vectorise else [[s] for s in range(len(sites))]
        self.on_cpu = not sites or sites[0][0].device.type == "cpu"
        self.workers = max(1, min(len(sites), workers or torch.get_num_threads())) if self.on_cpu else 1
        self._replicas = [model] + [copy.deepcopy(model) for _ in range(self.workers - 1)]

    def _site_update(self, model: nn.Module, weights: Update, round_index: int, site: int) -> Update:
        """One site's update before its transform, computed with `model` (this thread's copy)."""
        return site_update(model, weights, *self.sites[site], self.num_classes, self.training, self.seed,
                           round_index, site)

    def _each_site(self, model: nn.Module, sites: list[int], weights: Update, round_index: int) -> list[Update]:
        """The updates of `sites`, in their order, trained with `model` `self.workers` at a time."""
        if not self.on_cpu:  # an accelerator: one site after another, each using all of it
            return [self._site_update(model, weights, round_index, s) for s in sites]
        free = queue.SimpleQueue()  # a copy of the model per thread at work
        replicas = (self._replicas if model is self.model else
                    [model] + [copy.deepcopy(model) for _ in range(self.workers - 1)])
        for replica in replicas:
            free.put(replica)

        def train(site: int) -> Update:
            model = free.get()
            try:
                return self._site_update(model, weights, round_index, site)
            finally:
                free.put(model)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # read by each new thread as it starts its first torch operation
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="medpfl-site") as pool:
                return list(pool.map(train, sites))
        finally:
            torch.set_num_threads(threads)

    def _raw_updates(self, model: nn.Module, weights: Update, round_index: int) -> list[Update]:
        """Every site's update of `model` at `weights` before its transform, in site order."""
        updates: list[Update | None] = [None] * len(self.sites)
        alone = [group[0] for group in self.groups if len(group) == 1]
        for s, update in zip(alone, self._each_site(model, alone, weights, round_index)):
            updates[s] = update
        for group in self.groups:
            if len(group) == 1:
                continue
            pairs = [ordered(*self.sites[s], self.seed, round_index, s) for s in group]
            x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            train = vmap(lambda xs, ys: local_update(model, weights, xs, ys, self.num_classes, self.training))
            stacked = train(x, y)
            for j, s in enumerate(group):
                updates[s] = {n: u[j] for n, u in stacked.items()}
        return updates  # type: ignore[return-value]

    def run_round(self, weights: Update, round_index: int) -> RoundOutcome:
        """Round `round_index` (1-based) from the global `weights`: send, train, transform, observe, aggregate."""
        start = time.perf_counter()
        crafted = self.tamper(round_index, weights) if self.tamper is not None else None
        device = next(iter(weights.values())).device
        payload = weights if crafted is None else {n: w.to(device) for n, w in crafted.items()}
        if self.model_check is not None:
            self.model_check.require(payload, round_index)  # the sites run one check; it refuses for all of them
        model = received_architecture(self.model, payload, tuple(self.sites[0][0].shape[1:])).to(device)
        sent, n_images = [], [len(labels) for _, labels in self.sites]
        for s, update in enumerate(self._raw_updates(model, payload, round_index)):
            facts = SiteRound(round_index, s, n_images[s], self.training, self.seed)
            update = self.hooks.site_transform(update, facts)
            self.hooks.notify(facts, payload, update)
            sent.append(update)
        stacked = {n: torch.stack([u[n] for u in sent]) for n in payload}
        aggregated = self.hooks.aggregate(stacked, n_images)
        # As under SecAgg+ (fl.flower.secagg): the sites' updates are relative to what the server sent, so the
        # federation trains on from it; an imprint module is dropped again, as it only ever held a readout.
        new = next_global(payload, aggregated, self.training.protocol, self.training.lr)
        if new and next(iter(new.values())).is_cuda:
            torch.cuda.synchronize()
        return RoundOutcome(new, [update_norm(u) for u in sent], n_images, time.perf_counter() - start)
