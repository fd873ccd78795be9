"""Gradient-inversion attacks: what an adversary reconstructs from an observed update.

Every attack has one entry in the registry (attacks.registry), made in the module that defines it; importing
this package imports those modules, so the entries exist wherever medpfl.attacks is used.
"""

from __future__ import annotations

from medpfl.attacks.base import Attack, MaliciousAttack, SettingsAttack
from medpfl.attacks.registry import (ATTACKS, AttackEntry, attack_entry, attack_names, build_attack, display_name,
                                     register, unregister, unrolling_attacks)
from medpfl.attacks.threat import ObservedUpdate, Reconstruction, ServerPayload, ThreatModel

# Each of these modules registers its attacks when imported, in the order the registry lists them: the papers' first.
from medpfl.attacks import (gradient_matching, inverting_gradients, update_inversion, imprint, trap,  # noqa: E402,F401,I001
                            strongest)

# Who holds the labels: handed the true ones, or recovered from the update.
LABEL_ACCESS = ("granted", "recovered")

__all__ = ["ATTACKS", "Attack", "AttackEntry", "LABEL_ACCESS", "MaliciousAttack", "ObservedUpdate", "Reconstruction",
           "ServerPayload", "SettingsAttack", "ThreatModel", "attack_entry", "attack_names", "build_attack",
           "display_name", "register", "unregister", "unrolling_attacks"]
