"""What every attack is (the `Attack` protocol), and the settings handling most attacks share (`SettingsAttack`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from medpfl.attacks.threat import ObservedUpdate, Reconstruction, ServerPayload
from medpfl.errors import MedPFLError


@runtime_checkable
class Attack(Protocol):
    """An attack sees what the adversary holds (the payload it sent, each victim's observed update) and answers."""

    name: str
    # Whether `reconstruct` takes a `checkpoint=` (attacks.optim.Checkpoint) to save and resume long runs.
    takes_checkpoints: bool

    def config(self) -> dict[str, Any]:
        """The attack's name and settings, for run records."""

    def reconstruct(self, payload: ServerPayload, update: ObservedUpdate, generator: torch.Generator,
                    **kwargs: Any) -> Reconstruction:
        """Each victim's images (V x B x C x H x W in [0,1]) and labels, from `payload` and `update` alone."""


@runtime_checkable
class MaliciousAttack(Attack, Protocol):
    """An attack of a server that sends the sites a model of its own making (ThreatModel.modifies_model)."""

    def craft(self, model: nn.Module, image_shape: tuple[int, int, int], public_images: torch.Tensor,
              images_per_update: int) -> nn.Module:
        """The model the server sends instead of `model`, built from images like the sites' (never theirs)."""


class SettingsAttack:
    """An attack whose settings are one dataclass: its defaults, overridden by keyword, checked by name."""

    settings_class: ClassVar[type]
    name: str
    takes_checkpoints = False

    def __init__(self, settings: Any = None, *, name: str | None = None, **overrides: Any) -> None:
        self.settings = settings if settings is not None else self.settings_class()
        if name is not None:
            self.name = name
        apply_settings(self.name, self.settings, overrides)

    def config(self) -> dict[str, Any]:
        return {"attack": self.name, **asdict(self.settings)}


def apply_settings(attack: str, settings: Any, overrides: dict[str, Any]) -> None:
    """Set `overrides` on the dataclass `settings`, refusing a name it does not have (one sentence, the valid ones)."""
    for key, value in overrides.items():
        if key not in settings.__dataclass_fields__:
            valid = ", ".join(settings.__dataclass_fields__)
            raise MedPFLError(f"Attack '{attack}' has no setting '{key}'; valid settings: {valid}.")
        setattr(settings, key, value)
