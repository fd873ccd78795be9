"""The attack registry: one entry per attack, which the CLI, training, the audit, the sweep and the report read.

Adding an attack is one file: the attack (a class following `attacks.base.Attack`; `SettingsAttack` gives
it settings from a dataclass) and, next to it, one entry:

    register(AttackEntry(
        name="my-attack",                      # --attack my-attack
        build=MyAttack,                        # build(**settings) -> the attack, its defaults overridden
        summary="what it does, technically (Author et al. 2024)",
        display="My attack",                   # the report's name for it
        plain="adjusts ... until ...",         # the report's explanation, in plain words
        default_model="lenet-idlg",            # the model it attacks when no --model is given
    ))

and the module imported in `attacks/__init__.py`, so that its entry exists whenever medpfl.attacks is
imported. The other fields (threat model, BatchNorm mode, the paper's procedure, when --attack strongest
runs it) have defaults for an honest-but-curious attack on ordinary training steps. `unregister` takes an
entry out again (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medpfl.attacks.base import Attack
from medpfl.attacks.threat import ThreatModel
from medpfl.registry import Registry


@dataclass(frozen=True)
class AttackEntry:
    """One attack and everything the rest of the toolkit needs to know about it."""

    name: str
    build: Callable[..., Attack]  # build(**settings): the attack with its defaults overridden by `settings`
    summary: str  # one line: what it does and where it comes from (`medpfl attack --help` lists it)
    display: str  # its name in the report
    plain: str  # how it works, for the report's readers (no jargon), completing "<display> ..."
    default_model: str  # a models.registry name: the model it attacks when no --model is given
    bn_mode: str = "train"  # BatchNorm in the sites' step it is run on by default: "train" (batch) or "eval"
    threat: ThreatModel = ThreatModel()  # what it is granted: true labels, changing the model the server sends
    # The settings of its paper's optimisation procedure, which `--paper` sets (None: it has none to set).
    paper_procedure: dict[str, Any] | None = None
    # It inverts a FedAvg weight change of several local steps (the payload carries the sites' local
    # training); the others invert gradients and need updates of one step.
    unrolls_local_training: bool = False
    # A curious server hands it every round it observed of a site behind the same images
    # (reconstruct_rounds(payloads, updates, generator)); the others get one round's update.
    combines_rounds: bool = False
    # When `--attack strongest` runs it: a test on the names of the defenses the sites apply (None: never).
    # Strongest builds its candidates with the settings it was given, the L-BFGS attacks' settings.
    strongest_when: Callable[[frozenset[str]], bool] | None = field(default=None, compare=False)


ATTACKS: Registry[AttackEntry] = Registry("--attack")
register = ATTACKS.register  # register(entry): add an attack; its name must be new
unregister = ATTACKS.unregister  # unregister(name): take it out again (a test's own attack, after the test)
attack_entry = ATTACKS.entry  # attack_entry(name): its entry; an unknown name is one sentence naming the known


def attack_names() -> list[str]:
    """Every registered attack's name, in the order they were registered (the papers' first)."""
    return list(ATTACKS)


def unrolling_attacks() -> list[str]:
    """The attacks that invert a FedAvg weight change of several local steps (AttackEntry.unrolls_local_training)."""
    return [e.name for e in ATTACKS.values() if e.unrolls_local_training]


def build_attack(name: str, **settings: Any) -> Attack:
    """The attack `name` with its defaults (the papers'), overridden by `settings`."""
    return attack_entry(name).build(**settings)


def display_name(name: str) -> str:
    """The report's name for attack `name` (the name itself for an attack not registered here)."""
    entry = ATTACKS.get(name)
    return entry.display if entry else name
