"""Gradient-inversion attacks: what an adversary reconstructs from an observed update."""

from __future__ import annotations

from typing import Any

from medpfl.attacks.defense_aware import MULTI_ROUND, NOISE_ATTACKS, SPARSE_ATTACKS
from medpfl.attacks.threat import ObservedUpdate, Reconstruction, ServerPayload, ThreatModel
from medpfl.errors import MedPFLError

ATTACKS = {
    "dlg": "Deep Leakage from Gradients: L-BFGS on image and soft label (Zhu et al. 2019)",
    "idlg": "Improved DLG: label from the last layer, L-BFGS on the image (Zhao et al. 2020)",
    "cpl": "Catastrophic privacy leakage: iDLG with a patterned start (Wei et al. 2020)",
    "invgrad": "Inverting Gradients: cosine distance, TV, signed Adam, restarts (Geiping et al. 2020)",
    "sparse-l2": "iDLG on the entries a sparsified (top-k) update kept, L2 distance, restarts",
    "sparse-cosine": "iDLG on the entries a sparsified (top-k) update kept, cosine distance, restarts",
    "robust-l2": "iDLG on a noised or quantized update: L2 distance + TV prior, stops at the defense's noise floor",
    "robust-cosine": "iDLG on a noised, clipped or quantized update: cosine distance + TV prior, stops at the "
                     "defense's noise floor",
    MULTI_ROUND: "robust-l2 on every round a curious server observed of one site behind the same images (FedSGD "
                 "on a fixed batch): the rounds' distances summed, their independent noise averaged down",
    "strongest": "every attack that fits the defense on each victim (plain iDLG among them); the report gives per "
                 "image the best by SSIM and the one the attacker would pick by its own distance",
    "update-inversion": "FedAvg weight changes: the site's local steps unrolled on candidate images, then "
                        "Inverting Gradients (Geiping et al. 2020 sec. 6; Dimitrov et al. 2022)",
    "imprint": "Robbing the Fed: a malicious server sends the model behind an imprint module and reads images "
               "alone in their brightness bin off the update (Fowl et al. 2022)",
    "trap": "Trap weights: a malicious server scales the negative weights of the first fully connected layer so "
            "that few images fire each unit, and reads images that fired a unit alone (Boenisch et al. 2023)",
}
# Attacks a curious server hands every round it observed of a site behind the same images (reconstruct_rounds).
COMBINES_ROUNDS = (MULTI_ROUND, "strongest")
# The model each attack was run on in the paper, used when no --model is given; update-inversion gets
# the ConvNet that `medpfl train` trains by default.
DEFAULT_MODELS = {"dlg": "lenet-dlg", "idlg": "lenet-idlg", "cpl": "lenet-cpl", "invgrad": "resnet18",
                  "update-inversion": "convnet", "imprint": "lenet-idlg", "trap": "mlp",
                  **{name: "lenet-idlg" for name in ("strongest", MULTI_ROUND, *SPARSE_ATTACKS, *NOISE_ATTACKS)}}
# The Inverting Gradients paper computed updates with the network in eval mode (BatchNorm on its
# running statistics); a site's ordinary training step normalises with batch statistics.
DEFAULT_BN_MODES = {name: "eval" if name == "invgrad" else "train" for name in ATTACKS}
# The paper hands Inverting Gradients the true labels; the others find them themselves.
LABEL_ACCESS = ("granted", "recovered")
MALICIOUS = ("imprint", "trap")  # the server changes the model it sends
THREAT_MODELS = {name: ThreatModel(knows_labels=name == "invgrad", modifies_model=name in MALICIOUS)
                 for name in ATTACKS}
# The papers' optimisation procedure (SEED.md), which `--paper` sets: one start per image for the L-BFGS
# attacks, whose default here restarts failed victims; Inverting Gradients' defaults are already the paper's.
# For the L-BFGS attacks also the plain distance and the absolute tolerances (gradient_matching.PAPER_PROCEDURE).
_PLAIN_MATCHING = {"restarts": 0, "normalize": False, "logit_gradient": "candidate", "tolerance_grad": 1e-7,
                   "tolerance_change": 1e-9, "curvature_tolerance": 1e-10}
PAPER_PROCEDURE = {
    "dlg": {"steps": 300, **_PLAIN_MATCHING},
    "idlg": {"steps": 300, **_PLAIN_MATCHING},
    "cpl": {"steps": 300, **_PLAIN_MATCHING},
    "invgrad": {"steps": 24_000, "restarts": 8},
}


def build_attack(name: str, **settings: Any):
    """The attack `name` with the paper's settings, overridden by `settings`."""
    if name not in ATTACKS:
        raise MedPFLError(f"Unknown --attack '{name}'; choose one of: {', '.join(ATTACKS)}.")
    if name == "strongest":
        from medpfl.attacks.strongest import StrongestAttack

        build_attack("idlg", **settings)  # every attack it runs takes the L-BFGS attacks' settings
        return StrongestAttack(build_attack, **settings)
    if name == "invgrad":
        from medpfl.attacks.inverting_gradients import invgrad as factory
    elif name == "update-inversion":
        from medpfl.attacks.update_inversion import update_inversion as factory
    elif name == "imprint":
        from medpfl.attacks.imprint import imprint as factory
    elif name == "trap":
        from medpfl.attacks.trap import trap as factory
    else:
        from medpfl.attacks import gradient_matching

        factory = getattr(gradient_matching, name.replace("-", "_"))
    attack = factory()
    for key, value in settings.items():
        if not hasattr(attack.settings, key):
            valid = ", ".join(attack.settings.__dataclass_fields__)
            raise MedPFLError(f"Attack '{name}' has no setting '{key}'; valid settings: {valid}.")
        setattr(attack.settings, key, value)
    return attack


__all__ = ["ATTACKS", "COMBINES_ROUNDS", "DEFAULT_BN_MODES", "DEFAULT_MODELS", "LABEL_ACCESS", "PAPER_PROCEDURE",
           "THREAT_MODELS", "ObservedUpdate", "Reconstruction", "ServerPayload", "ThreatModel", "build_attack"]
