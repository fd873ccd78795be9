"""The strongest attacker: every attack that fits the defense on each victim, and the answer it would pick.

A FedAvg weight change of several local steps only the attacks that unroll local training take; there the
strongest attacker is those.

Which reconstruction is truly best needs the originals, so that choice (the auditor's worst case) is the
scorer's; here each victim gets every candidate and the one the attacker itself would pick, judged by one
distance all candidates share: the cosine between the candidate's gradient and the observed update on the
entries the update holds (the entries a top-k update kept; all others); an answer drawn from several rounds
is judged on the last.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from medpfl.attacks.defense_aware import STRONGEST, applicable_attacks
from medpfl.attacks.gradient_matching import matching_objective
from medpfl.attacks.registry import AttackEntry, attack_entry, build_attack, register
from medpfl.attacks.threat import ObservedUpdate, Reconstruction, ServerPayload


class StrongestAttack:
    """Run every attack `applicable_attacks` names for the payload's defense, each from the same random
    stream a run of that attack alone would get (so each candidate is exactly that attack's answer)."""

    name = STRONGEST
    takes_checkpoints = False

    def __init__(self, **overrides) -> None:
        build_attack("idlg", **overrides)  # every attack it runs takes the L-BFGS attacks' settings
        self.overrides = overrides

    def _settings_of(self, name: str) -> dict:
        """The overrides that `name` takes: all of them for the L-BFGS attacks; for one that unrolls local
        training (its own optimiser), those its settings share with them, such as steps and restarts."""
        if not attack_entry(name).unrolls_local_training:
            return self.overrides
        known = attack_entry(name).build.settings_class.__dataclass_fields__
        return {k: v for k, v in self.overrides.items() if k in known}

    def config(self) -> dict:
        return {"attack": self.name, "settings": dict(self.overrides)}

    def reconstruct(self, payload: ServerPayload, update: ObservedUpdate, generator: torch.Generator) -> Reconstruction:
        return self.reconstruct_rounds([payload], [update], generator)

    def reconstruct_rounds(self, payloads: list[ServerPayload], updates: list[ObservedUpdate],
                           generator: torch.Generator) -> Reconstruction:
        """Every attack on the last round's update; given several rounds of each victim behind the same images
        (gradient_matching.GradientMatchingAttack.reconstruct_rounds), under noise also the one combining them."""
        start = time.perf_counter()
        payload, update = payloads[-1], updates[-1]
        initial = generator.get_state()
        candidates: dict[str, Reconstruction] = {}
        weight_change = payload.local_training.protocol == "fedavg"  # several local steps (one is a gradient)
        for name in applicable_attacks(payload.defense, len(payloads), weight_change):
            stream = torch.Generator(generator.device)
            stream.set_state(initial)
            attack = build_attack(name, **self._settings_of(name))
            combined = attack_entry(name).combines_rounds
            candidates[name] = (attack.reconstruct_rounds(payloads, updates, stream) if combined
                                else attack.reconstruct(payload, update, stream))
        names = list(candidates)
        if len(names) == 1:  # nothing to choose between: the attack's own objective stands
            only = candidates[names[0]]
            return Reconstruction(
                images=only.images, labels=only.labels, objective=only.objective, evaluations=only.evaluations,
                diverged=only.diverged, seconds=time.perf_counter() - start,
                extra={"candidates": candidates, "attacker_pick": names * len(only.images)})
        judged = torch.stack([attacker_distance(payload, update, candidates[n]) for n in names], dim=1)  # V x A
        pick = judged.nan_to_num(float("inf")).argmin(1)
        rows = torch.arange(len(pick), device=pick.device)

        def chosen(field: str) -> torch.Tensor:
            return torch.stack([getattr(candidates[n], field) for n in names], dim=1)[rows, pick]

        return Reconstruction(
            images=chosen("images"), labels=chosen("labels"), objective=judged[rows, pick],
            evaluations=sum(c.evaluations for c in candidates.values()), diverged=chosen("diverged"),
            seconds=time.perf_counter() - start,
            extra={"candidates": candidates, "attacker_pick": [names[i] for i in pick.tolist()]})


def attacker_distance(payload: ServerPayload, update: ObservedUpdate, answer: Reconstruction) -> torch.Tensor:
    """How well each victim's answer explains its observed update, in a unit every attack shares: the cosine
    distance between the answer's gradient (with its labels) and the update on the entries it holds. V."""
    V, B = answer.images.shape[:2]
    targets = F.one_hot(answer.labels, payload.num_classes).to(answer.images.dtype)
    support = {n: (g != 0).to(g.dtype) for n, g in update.gradients.items()}
    objective = matching_objective(payload, update, targets, B, payload.image_shape, support=support,
                                    distance="cosine")
    loss, _ = objective(answer.images.reshape(V, -1), torch.arange(V, device=answer.images.device))
    return loss


register(AttackEntry(
    STRONGEST, StrongestAttack, "every attack that fits the defense on each victim (plain iDLG among them); the "
    "report gives per image the best by SSIM and the one the attacker would pick by its own distance",
    "strongest attacker", "runs every attack that fits the defense (plain iDLG among them) on each image; the best "
    "reconstruction per image is the hospital's worst case", default_model="lenet-idlg", combines_rounds=True))
