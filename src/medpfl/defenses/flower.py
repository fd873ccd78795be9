"""Defenses on the Flower engine, run by Flower's own parts, so a Flower user audits what Flower deploys.

The Flower engine (fl.flower) takes these parts from outside: `client_mods` for the ClientApp and
`wrap_strategy` for the ServerApp's strategy (flwr is imported only when a Flower run asks for them).

- `clip:norm=C` and/or `gaussian:sigma=S` at every site: Flower's LocalDpMod (clip the update to C, add
  N(0, S^2) to every entry). LocalDpMod is parameterised by (sensitivity, epsilon, delta) and draws std
  sensitivity x sqrt(2 ln(1.25/delta)) / epsilon; the spec's S is turned into those numbers.
- `cdp:noise=Z,clip=C` (client-level DP): Flower's fixedclipping_mod at the sites and its
  DifferentialPrivacyClientSideFixedClipping wrapper at the server, whose noise N(0, (Z C / sites)^2) lands
  on the new global weights (FedAvg only: under FedSGD the in-process engine's noise is scaled by the lr).
- `secagg:k=SITES`: Flower's SecAgg+ (fl.flower.secagg).

Flower's mods clip "weights sent back minus weights received"; a MedPFL site sends its update, so the mod
here hands them weights (received + update) and turns the reply back into an update. Flower draws its noise
from numpy's global generator: it is seeded from the run's seed, round and site right before each draw, so
the same seed gives the same run on either side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from medpfl.defenses.chain import Chain
from medpfl.defenses.spec import parse_defense
from medpfl.errors import MedPFLError
from medpfl.fl.flower.client_app import ROUND_KEY, array_record, tensors
from medpfl.fl.flower.federation import FederationSpec
from medpfl.seeds import SITE_NOISE, numpy_global_seed

FLOWER_DEFENSES = ("clip", "gaussian", "cdp", "secagg")
_DELTA = 1e-5  # LocalDpMod's delta; with sensitivity C it fixes the epsilon that gives the spec's sigma
SERVER = -1  # the "site" of the server's own noise stream
FLOWER_DRAWS = 2  # the key of Flower's numpy draws in a site's noise stream (the in-process engine uses 0 and 1)


def flower_defense(spec_defense: str, protocol: str) -> Chain:
    """The chain `spec_defense` names, refused in one sentence where Flower has no part that runs it."""
    chain = parse_defense(spec_defense)
    other = [d.name for d in chain.defenses if d.name not in FLOWER_DEFENSES]
    if other:
        raise MedPFLError(f"--engine flower runs clip, gaussian, cdp (Flower's LocalDpMod, fixedclipping_mod and "
                          f"DP wrapper) and secagg (SecAgg+); '{other[0]}' runs on --engine inprocess.")
    if chain.server is not None and protocol != "fedavg":
        raise MedPFLError("Client-level DP on --engine flower adds its noise to the new global weights, which is "
                          "the in-process noisy mean only for FedAvg; use --protocol fedavg or --engine inprocess.")
    if chain.server is not None and len(chain.defenses) > 1:
        raise MedPFLError("On --engine flower, cdp runs alone (fixedclipping_mod and Flower's DP wrapper); "
                          "drop the other defenses or use --engine inprocess.")
    return chain


def numpy_seed(seed: int, round_index: int, site: int) -> int:
    """The seed of numpy's global generator before Flower draws a site's (or the SERVER's) noise in a round: the
    site's own noise stream of that round (as the in-process engine's, under a key of its own)."""
    return numpy_global_seed(seed, SITE_NOISE, round_index, site + 1, FLOWER_DRAWS)


def local_dp_mod(chain: Chain) -> LocalDpMod | None:
    """Flower's LocalDpMod for the chain's site-side clip and Gaussian noise (None if it has neither)."""
    clip = next((d.norm for d in chain.defenses if d.name == "clip"), None)
    sigma = next((d.sigma for d in chain.defenses if d.name == "gaussian"), None)
    if clip is None and sigma is None:
        return None
    factor = math.sqrt(2 * math.log(1.25 / _DELTA))
    if not sigma:  # sensitivity 0: no noise
        return LocalDpMod(clipping_norm=clip or math.inf, sensitivity=0.0, epsilon=1.0, delta=_DELTA)
    sensitivity = clip if clip is not None else 1.0
    return LocalDpMod(clipping_norm=clip or math.inf, sensitivity=sensitivity, epsilon=sensitivity * factor / sigma,
                      delta=_DELTA)


def defense_mod(msg: Message, context: Context, call_next):
    """ClientApp mod: the run's defense (named in the message's config) by Flower's mods, on this site's update."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    config = msg.content["config"]
    spec = FederationSpec.from_config(config)
    chain = parse_defense(spec.defense)
    mod = fixedclipping_mod if chain.server is not None else local_dp_mod(chain)
    if mod is None:
        return call_next(msg, context)
    sent = tensors(msg.content["arrays"])

    def as_weights(m: Message, c: Context) -> Message:  # what Flower's mods expect a client to send back
        out = call_next(m, c)
        if not out.has_error():
            out.content["arrays"] = array_record({n: sent[n] + u for n, u in tensors(out.content["arrays"]).items()})
        return out

    np.random.seed(numpy_seed(spec.seed, int(config[ROUND_KEY]), int(context.node_config["partition-id"])))
    out = mod(msg, context, as_weights)
    if not out.has_error():
        key = next(iter(out.content.array_records))
        out.content[key] = array_record({n: w - sent[n] for n, w in tensors(out.content[key]).items()})
    return out


class SeededClientSideFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-level DP wrapper, its noise drawn from the run's seeded server stream."""

    def __init__(self, strategy: Strategy, seed: int, round_of, **options) -> None:
        super().__init__(strategy, **options)
        self.seed, self.round_of = seed, round_of

    def aggregate_train(self, server_round: int, replies):
        np.random.seed(numpy_seed(self.seed, self.round_of(server_round), SERVER))
        return super().aggregate_train(server_round, replies)


@dataclass
class FlowerParts:
    """What the Flower engine runs for a defense: ClientApp mods, a wrapper of the server's strategy, and the
    aggregator the auditor applies before the wrapper (None: the engine's own)."""

    client_mods: tuple = ()
    wrap_strategy: Callable[[Strategy], Strategy] | None = None
    aggregate: Callable | None = None


def flower_parts(chain: Chain, seed: int, sites: int) -> FlowerParts:
    """The Flower parts that run `chain` (secure aggregation aside, which fl.flower.secagg runs)."""
    if chain.server is not None:
        def wrap(auditor: Strategy) -> Strategy:
            return SeededClientSideFixedClipping(auditor, seed, auditor.run_round,
                                                 noise_multiplier=chain.server.noise_multiplier,
                                                 clipping_norm=chain.server.clip, num_sampled_clients=sites)
        return FlowerParts((defense_mod,), wrap, unweighted_mean)
    return FlowerParts((defense_mod,) if local_dp_mod(chain) is not None else ())


def unweighted_mean(stacked: dict[str, torch.Tensor], n_images) -> dict[str, torch.Tensor]:
    """The plain mean of the sites' clipped updates, which Flower's DP wrapper noises (its noise assumes it)."""
    return {n: t.mean(0) for n, t in stacked.items()}
