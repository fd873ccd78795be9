"""Canaries for the one-run privacy audit (defenses.dp_audit): what is inserted, and how it is scored.

Example level (DP-SGD, or plain SGD without DP): m Dirac gradient canaries (GradientCanaries), the white-box
canaries of Steinke, Nasr and Jagielski (2023). Noise images with random labels, scored by their gradients'
alignment with the sites' updates, were tried first: their gradients are too alike to stand out of a
multi-step FedAvg update, so even without DP they proved little.

Client level (client-level DP): m canary clients (Andrew et al., ICLR 2024), each with a random direction of
norm `clip` that, with probability 1/2, it sends as its update in every round; the server clips and noises
them with the real sites' updates. A canary's score is the cosine of its direction with the final model
change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from medpfl.defenses.base import Update
from medpfl.defenses.client_dp import ClientLevelDP
from medpfl.defenses.dpsgd import DPSGD
from medpfl.errors import MedPFLError
from medpfl.fl.rounds import SiteObservation
from medpfl.seeds import CANARIES, rng, torch_seed


def draw_membership(m: int, seed: int) -> np.ndarray:
    """Which of m canaries are in training: each with probability 1/2, independently."""
    return rng(seed, CANARIES, 0).random(m) < 0.5


def _flat(update: Update) -> torch.Tensor:
    """A whole update (or B stacked ones: name -> B x shape) as rows: B x (number of entries)."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in update.values()], dim=1)


@dataclass
class GradientCanaries:
    """m Dirac gradient canaries for DP-SGD: canary i is a per-example gradient of `clip` on one coordinate of
    the whole update (its own, none shared), held by one site (i mod S) and, with probability 1/2, in its data.

    The white-box canaries of Steinke, Nasr and Jagielski (2023), the strongest for auditing DP-SGD: in each
    local step an included canary is drawn as its site's images are (Poisson, at the site's sample rate) and
    joins the batch's per-example gradients before DP-SGD clips and noises them. A canary's
    score is how far its coordinate descended in its site's sent updates, summed over rounds."""

    coordinates: torch.Tensor  # m distinct indices into the flattened update
    site: np.ndarray
    included: np.ndarray
    rates: list[float]  # each site's local sample rate (defenses.dpsgd.local_sample_rate)
    seed: int
    scores: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.scores = np.zeros(len(self.coordinates))

    @classmethod
    def draw(cls, m: int, rates: list[float], like: Update, seed: int) -> GradientCanaries:
        """m canaries spread over sites sampling their records at `rates`, one coordinate of `like` each."""
        size = sum(w.numel() for w in like.values())
        if m > size:
            raise MedPFLError(f"--audit-dp canaries={m} needs a coordinate of the model each, but it has {size}; "
                              f"use at most {size} canaries.")
        generator = torch.Generator().manual_seed(torch_seed(seed, CANARIES, 3))
        return cls(torch.randperm(size, generator=generator)[:m], np.arange(m) % len(rates),
                   draw_membership(m, seed), list(rates), seed)

    def dpsgd(self, dp: DPSGD, norm: float | None = None) -> CanaryDPSGD:
        """`dp` with these canaries, of L2 norm `norm` (default: dp's clipping norm) in its steps."""
        return CanaryDPSGD(dp, self, norm=dp.clip if norm is None else norm)

    def sampler(self, site: int, round_index: int) -> torch.Generator:
        """The stream that draws the site's canaries into its batches in one round: from the seed, round and site
        alone, so a resumed run draws what an uninterrupted one does."""
        return torch.Generator().manual_seed(torch_seed(self.seed, CANARIES, 4, site, round_index))

    def sampled(self, site: int, sampler: torch.Generator) -> np.ndarray:
        """The site's included canaries drawn into one step's batch, each at the site's sample rate."""
        mine = np.flatnonzero((self.site == site) & self.included)
        drawn = torch.rand(len(mine), generator=sampler).numpy() < self.rates[site]
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

    def __init__(self, dp: DPSGD, canaries: GradientCanaries, norm: float, site: int | None = None,
                 round_index: int = 0) -> None:
        self.dp, self.canaries, self.norm, self.site = dp, canaries, norm, site
        self.sampler = canaries.sampler(site, round_index) if site is not None else None

    def __getattr__(self, name: str):
        return getattr(self.dp, name)

    def calibrated(self, sample_rate: float | None = None, steps: int | None = None) -> CanaryDPSGD:
        return CanaryDPSGD(self.dp.calibrated(sample_rate, steps), self.canaries, self.norm)

    def for_sites(self, schedules) -> CanaryDPSGD:
        return CanaryDPSGD(self.dp.for_sites(schedules), self.canaries, self.norm)

    def at_site(self, site: int, round_index: int = 0) -> CanaryDPSGD:
        return CanaryDPSGD(self.dp, self.canaries, self.norm, site, round_index)

    def private_gradient(self, per_example: Update, generator: torch.Generator,
                         batch_size: float | None = None) -> Update:
        batch = batch_size or next(iter(per_example.values())).shape[0]
        drawn = self.canaries.sampled(self.site, self.sampler) if self.site is not None else []
        if len(drawn):
            sizes = [g[0].numel() for g in per_example.values()]
            rows = torch.zeros(len(drawn), sum(sizes), dtype=next(iter(per_example.values())).dtype)
            rows[torch.arange(len(drawn)), self.canaries.coordinates[drawn]] = self.norm
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
        change = _flat({n: (final[n].to(initial[n]) - initial[n])[None] for n in initial})[0]
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

    def flower_mean(self, clipped: Update, n_images=None) -> Update:
        """The Flower engine's aggregator under client-level DP: the sites' updates, clipped by Flower's
        fixedclipping_mod, summed with the included canary clients' and divided by the real sites, as `aggregate`
        does; Flower's DP wrapper adds the noise (defenses.flower)."""
        sites = next(iter(clipped.values())).shape[0]
        return {n: (u.sum(0) + self.joining[n].to(u).sum(0)) / sites for n, u in clipped.items()}
