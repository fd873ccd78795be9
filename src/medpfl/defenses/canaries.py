"""Canaries for the one-run privacy audit (defenses.dp_audit): what is inserted, and how it is scored.

Example level (DP-SGD, or no DP): m canary images, uniform noise with a random label, each given to one
site (canary i to site i mod S) and put in its training data with probability 1/2, where they are sampled,
clipped and noised like any image. The curious server scores every canary, in or out, in every round by
the alignment of its own gradient at the round's global weights (scaled to unit norm) with the descent its
site sent: the white-box statistic of Steinke, Nasr and Jagielski (2023) computed from what the server sees.
Noise images with random labels have gradients far from the real images' and from each other's, so one
canary's own contribution stands out of the sum.

Client level (client-level DP): m canary clients (Andrew et al., ICLR 2024), each with a random direction of
norm `clip` that, with probability 1/2, it sends as its update in every round; the server clips and noises
them with the real sites' updates. A canary's score is the cosine of its direction with the final model
change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medpfl.defenses.base import Update
from medpfl.defenses.client_dp import ClientLevelDP
from medpfl.defenses.dpsgd import DPSGD, per_example_gradients
from medpfl.errors import MedPFLError
from medpfl.fl.rounds import SiteObservation
from medpfl.seeds import CANARIES, rng, torch_seed


def draw_membership(m: int, seed: int) -> np.ndarray:
    """Which of m canaries are in training: each with probability 1/2, independently."""
    return rng(seed, CANARIES, 0).random(m) < 0.5


def _flat(update: Update) -> torch.Tensor:
    """A whole update (or B stacked ones: name -> B x shape) as rows: B x (number of entries)."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in update.values()], dim=1)


def without_label_means(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`rows` with the span of each label's mean row projected out.

    Canaries of one label share most of their gradient (its direction is the label's), so one canary's score
    would mostly echo how many of its label are in; what is left is its own. The means use every canary, in
    or out, so the projection never peeks at which are in."""
    sums = torch.zeros(int(labels.max()) + 1, rows.shape[1], dtype=rows.dtype, device=rows.device)
    sums.index_add_(0, labels, rows)
    basis, _ = torch.linalg.qr(sums.T)  # D x K, orthonormal columns
    return rows - (rows @ basis) @ basis.T


@dataclass
class ExampleCanaries:
    """m canary images, their labels, the site each belongs to, whether it is in training, and its score."""

    images: torch.Tensor  # m x C x H x W
    labels: torch.Tensor  # m
    site: np.ndarray  # m: the site whose data it joins if included
    included: np.ndarray  # m: bool
    scores: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.scores = np.zeros(len(self.labels))

    @classmethod
    def draw(cls, m: int, n_sites: int, channels: int, size: int, num_classes: int, seed: int,
             device: torch.device | str = "cpu") -> ExampleCanaries:
        generator = torch.Generator().manual_seed(torch_seed(seed, CANARIES, 1))
        images = torch.rand(m, channels, size, size, generator=generator).to(device)
        labels = torch.randint(num_classes, (m,), generator=generator).to(device)
        return cls(images, labels, np.arange(m) % n_sites, draw_membership(m, seed))

    def add_to(self, sites: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each site's (images, labels) with its included canaries appended."""
        out = []
        for s, (x, y) in enumerate(sites):
            mine = torch.as_tensor(np.flatnonzero((self.site == s) & self.included), device=y.device)
            out.append((torch.cat([x, self.images[mine]]), torch.cat([y, self.labels[mine]])))
        return out

    def scorer(self, model: nn.Module, num_classes: int) -> CanaryScorer:
        return CanaryScorer(self, model, num_classes)


class CanaryScorer:
    """The RoundObserver that adds, for each canary of an observed site, <its unit gradient, the site's descent>."""

    def __init__(self, canaries: ExampleCanaries, model: nn.Module, num_classes: int) -> None:
        self.canaries, self.model, self.num_classes = canaries, model, num_classes

    def wants(self, round_index: int, site: int) -> bool:
        return True

    def observe(self, seen: SiteObservation) -> None:
        c, s = self.canaries, seen.facts.site
        mine = np.flatnonzero(c.site == s)
        if len(mine) == 0:
            return
        index = torch.as_tensor(mine, device=c.labels.device)
        targets = F.one_hot(c.labels[index], self.num_classes).to(c.images.dtype)
        with torch.no_grad():
            grads = _flat(per_example_gradients(self.model, seen.weights, c.images[index], targets))
            sent = _flat({n: u[None] for n, u in seen.update.items()})[0]
        # FedAvg sends the weight change (descent is its negative); FedSGD sends the gradient itself.
        descent = -sent if seen.facts.training.protocol == "fedavg" else sent
        grads = without_label_means(grads, c.labels[index])
        unit = grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-12)
        c.scores[mine] += (unit @ descent.to(unit.dtype)).double().cpu().numpy()


@dataclass
class GradientCanaries:
    """m Dirac gradient canaries for DP-SGD: canary i is a per-example gradient of `clip` on one coordinate of
    the whole update (its own, none shared), held by one site (i mod S) and, with probability 1/2, in its data.

    The white-box canaries of Steinke, Nasr and Jagielski (2023), the strongest for auditing DP-SGD: in each
    local step an included canary is drawn as the accountant assumes every record is (Poisson, at the run's
    sample rate) and joins the batch's per-example gradients before DP-SGD clips and noises them. A canary's
    score is how far its coordinate descended in its site's sent updates, summed over rounds."""

    coordinates: torch.Tensor  # m distinct indices into the flattened update
    site: np.ndarray
    included: np.ndarray
    seed: int
    scores: np.ndarray = field(init=False)
    samplers: dict[int, torch.Generator] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.zeros(len(self.coordinates))

    @classmethod
    def draw(cls, m: int, n_sites: int, like: Update, seed: int) -> GradientCanaries:
        size = sum(w.numel() for w in like.values())
        if m > size:
            raise MedPFLError(f"--audit-dp canaries={m} needs a coordinate of the model each, but it has {size}; "
                              f"use at most {size} canaries.")
        generator = torch.Generator().manual_seed(torch_seed(seed, CANARIES, 3))
        return cls(torch.randperm(size, generator=generator)[:m], np.arange(m) % n_sites, draw_membership(m, seed),
                   seed)

    def dpsgd(self, dp: DPSGD) -> CanaryDPSGD:
        return CanaryDPSGD(dp, self)

    def sampled(self, site: int, rate: float) -> np.ndarray:
        """The site's included canaries drawn into one step's batch, each with probability `rate`."""
        if site not in self.samplers:
            self.samplers[site] = torch.Generator().manual_seed(torch_seed(self.seed, CANARIES, 4, site))
        mine = np.flatnonzero((self.site == site) & self.included)
        drawn = torch.rand(len(mine), generator=self.samplers[site]).numpy() < rate
        return mine[drawn]

    def wants(self, round_index: int, site: int) -> bool:
        return True

    def observe(self, seen: SiteObservation) -> None:
        """Score the site's canaries, in and out, by the descent of their coordinates in its sent update."""
        mine = np.flatnonzero(self.site == seen.facts.site)
        sent = _flat({n: u[None] for n, u in seen.update.items()})[0]
        moved = sent[self.coordinates[mine].to(sent.device)].double().cpu().numpy()
        self.scores[mine] += -moved if seen.facts.training.protocol == "fedavg" else moved


class CanaryDPSGD:
    """DP-SGD with gradient canaries among each step's per-example gradients; everything else is `dp`'s."""

    def __init__(self, dp: DPSGD, canaries: GradientCanaries, site: int | None = None) -> None:
        self.dp, self.canaries, self.site = dp, canaries, site

    def __getattr__(self, name: str):
        return getattr(self.dp, name)

    def calibrated(self, sample_rate: float | None = None, steps: int | None = None) -> CanaryDPSGD:
        return CanaryDPSGD(self.dp.calibrated(sample_rate, steps), self.canaries)

    def for_site(self, site: int) -> CanaryDPSGD:
        return CanaryDPSGD(self.dp, self.canaries, site)

    def private_gradient(self, per_example: Update, generator: torch.Generator, batch_size: int | None = None) -> Update:
        batch = batch_size or next(iter(per_example.values())).shape[0]
        drawn = self.canaries.sampled(self.site, self.dp.sample_rate) if self.site is not None else []
        if len(drawn):
            sizes = [g[0].numel() for g in per_example.values()]
            rows = torch.zeros(len(drawn), sum(sizes), dtype=next(iter(per_example.values())).dtype)
            rows[torch.arange(len(drawn)), self.canaries.coordinates[drawn]] = self.dp.clip
            per_example = {n: torch.cat([g, part.reshape(len(drawn), *g.shape[1:]).to(g.device)])
                           for (n, g), part in zip(per_example.items(), rows.split(sizes, dim=1))}
        return self.dp.private_gradient(per_example, generator, batch)


@dataclass
class ClientCanaries:
    """m canary clients: a random direction each (name -> m x shape, whole norm `clip`) and whether it takes part."""

    directions: Update
    included: np.ndarray

    @classmethod
    def draw(cls, m: int, like: Update, clip: float, seed: int) -> ClientCanaries:
        generator = torch.Generator().manual_seed(torch_seed(seed, CANARIES, 2))
        raw = {n: torch.randn(m, *w.shape, generator=generator, dtype=w.dtype).to(w.device) for n, w in like.items()}
        scale = clip / _flat(raw).norm(dim=1)
        return cls({n: t * scale.view(-1, *([1] * (t.dim() - 1))) for n, t in raw.items()},
                   draw_membership(m, seed))

    def server(self, cdp: ClientLevelDP) -> CanaryServer:
        """`cdp` with the included canary clients' updates joining every round's aggregation."""
        return CanaryServer(cdp, self)

    def scores(self, initial: Update, final: Update) -> np.ndarray:
        """Each canary direction's cosine with the final model change."""
        change = _flat({n: (final[n] - initial[n])[None] for n in initial})[0]
        flat = _flat(self.directions).to(change.dtype)
        return (flat @ change / (flat.norm(dim=1) * change.norm()).clamp_min(1e-30)).double().cpu().numpy()


class CanaryServer:
    """Client-level DP's server with the included canary clients among those it clips and noises each round.

    The mean still divides by the real sites only, so the model learns at the pace it would without them; a
    canary client's update counts in the sum as a real site's does, which is what the accountant covers."""

    def __init__(self, cdp: ClientLevelDP, canaries: ClientCanaries) -> None:
        self.cdp = cdp
        keep = torch.as_tensor(np.flatnonzero(canaries.included))
        self.joining = {n: t[keep.to(t.device)] for n, t in canaries.directions.items()}

    def __getattr__(self, name: str):
        return getattr(self.cdp, name)

    def __call__(self, update: Update, generator: torch.Generator) -> Update:
        return self.cdp(update, generator)

    def aggregate(self, updates: Update, generator: torch.Generator, expected_sites: int | None = None) -> Update:
        sites = expected_sites or next(iter(updates.values())).shape[0]
        joined = {n: torch.cat([u, self.joining[n].to(u)]) for n, u in updates.items()}
        return self.cdp.aggregate(joined, generator, expected_sites=sites)
