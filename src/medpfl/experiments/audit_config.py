"""The audit's declarative configuration: dataclasses read from YAML, every key and value checked.

A wrong key or value stops the audit before anything runs, with one sentence naming it and the valid
choices. Ready configurations ship in medpfl/configs/ (`demo.yaml`, `medpfl-paper.yaml`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from medpfl.errors import MedPFLError
from medpfl.fl.settings import FederationSettings

SHIPPED = ("demo", "medpfl-paper")


@dataclass
class ThreatConfig:
    """What the adversary is granted beyond the observed update."""

    batch_size: int = 1  # images behind each shared update
    labels: str | None = None  # "granted" or "recovered"; None: as the paper ran each attack
    bn_mode: str | None = None  # BatchNorm in the sites' step, "train" or "eval"; None: as the paper ran each attack


@dataclass
class AttackConfig:
    """One attack and, optionally, the model it runs on and settings that override the paper's."""

    # The auditor's worst case by default, as the sweep's: every attack that fits the defense, best per image.
    name: str = "strongest"
    model: str | None = None  # None: the model the paper ran this attack on
    settings: dict[str, Any] = field(default_factory=dict)  # e.g. {steps: 100, restarts: 0}
    n_images: int | None = None  # None: the audit's n_images (slow attacks may take fewer)
    defended: bool = True  # also attacked under each defense of the audit (the defense grid)


@dataclass
class UtilityConfig:
    """The federation trained once per defense to measure what the defense costs in accuracy: `medpfl train`'s
    federation (fl.settings), with its sites and rounds set here."""

    enabled: bool = True
    sites: int = FederationSettings.sites
    rounds: int = FederationSettings.rounds


@dataclass(frozen=True)
class FederationConfig(FederationSettings):
    """Federated training (`medpfl train`) with a curious server attacking chosen rounds and sites.

    Data, image size, channels, seeds and device are the audit's; the rest are `medpfl train`'s options, with
    its defaults (fl.settings) but one."""

    # Its default attack, strongest (iDLG and the attacks that know the defense) on a probe update, inverts a
    # gradient, which FedAvg shares only after one local step: with train's 2 epochs the federation would be
    # refused (medpfl train names update-inversion).
    local_epochs: int = 1
    attack: str = "strongest"
    model: str = "convnet"
    norm: str = "group"
    attack_rounds: list[int] = field(default_factory=lambda: [1])
    attack_sites: list[int] = field(default_factory=lambda: [0])
    attack_batch: int | None = 1  # attack a probe update of the site's first K images; None: its whole update
    attack_settings: dict[str, Any] = field(default_factory=dict)
    engine: str = "inprocess"
    defense: str = "none"  # a defense spec run at every site in every round, as `medpfl train --defense`
    audit_canaries: int = 0  # canaries of a one-run privacy audit (`medpfl train --audit-dp canaries=N`); 0: none


@dataclass
class AuditConfig:
    """Everything an audit runs: data sets, attacks x defenses x seeds, utility, federated training."""

    title: str = "MedPFL privacy audit"
    # Data sets by name; a path (class folders, .npz, DICOM, NIfTI) or null for the embedded real-image set.
    data: dict[str, str | None] = field(default_factory=lambda: {"embedded": None})
    image_size: int = 32
    channels: int = 3
    n_images: int = 16  # images attacked per attack, data set, defense and seed
    seeds: list[int] = field(default_factory=lambda: [0])
    norm: str = "batch"
    device: str = "cpu"
    threat: ThreatConfig = field(default_factory=ThreatConfig)
    attacks: list[AttackConfig] = field(default_factory=lambda: [AttackConfig()])
    defenses: list[str] = field(default_factory=lambda: ["none"])  # specs, e.g. laplace:b=0.01,0.005
    utility: UtilityConfig = field(default_factory=lambda: UtilityConfig(enabled=False))
    federation: FederationConfig | None = None

    def check(self) -> "AuditConfig":
        """Refuse values no run could use, naming the key and the valid choices."""
        from medpfl.attacks import LABEL_ACCESS, attack_names, build_attack
        from medpfl.fl.gradients import BN_MODES
        from medpfl.models.registry import MODELS

        _choice("threat.labels", self.threat.labels, LABEL_ACCESS, optional=True)
        _choice("threat.bn_mode", self.threat.bn_mode, BN_MODES, optional=True)
        _choice("channels", self.channels, (1, 3))
        _choice("norm", self.norm, ("batch", "group", "none"))
        for key, value in (("image_size", self.image_size), ("n_images", self.n_images),
                           ("threat.batch_size", self.threat.batch_size), ("utility.sites", self.utility.sites),
                           ("utility.rounds", self.utility.rounds)):
            if value < 1:
                raise MedPFLError(f"Audit config key '{key}' is {value}; it must be 1 or more.")
        if self.n_images % self.threat.batch_size:
            raise MedPFLError(f"Audit config key 'n_images' ({self.n_images}) must be a multiple of "
                              f"'threat.batch_size' ({self.threat.batch_size}).")
        if not self.attacks or not self.seeds or not self.data or not self.defenses:
            raise MedPFLError("Audit config keys 'data', 'attacks', 'defenses' and 'seeds' must each list at "
                              "least one entry.")
        for i, attack in enumerate(self.attacks):
            _choice(f"attacks[{i}].name", attack.name, tuple(attack_names()))
            _choice(f"attacks[{i}].model", attack.model, tuple(MODELS), optional=True)
            try:
                build_attack(attack.name, **attack.settings)  # names an unknown setting and the valid ones
            except MedPFLError as exc:
                raise MedPFLError(f"Audit config key 'attacks[{i}].settings': {exc}") from None
            n = attack.n_images or self.n_images
            if n < 1 or n % self.threat.batch_size:
                raise MedPFLError(f"Audit config key 'attacks[{i}].n_images' ({n}) must be a positive multiple of "
                                  f"'threat.batch_size' ({self.threat.batch_size}).")
        defended = [a.name for a in self.attacks if a.defended]
        twice = sorted({n for n in defended if defended.count(n) > 1})
        if twice and (self.defenses != ["none"] or self.utility.enabled):
            raise MedPFLError(f"Audit config key 'attacks': '{twice[0]}' is listed more than once with 'defended: "
                              "true', but the defense grid runs each attack on one model; set 'defended: false' on "
                              "all but one.")
        for name in self.data:
            if not str(name).replace("-", "").replace("_", "").isalnum():
                raise MedPFLError(f"Audit config data set name '{name}' must be letters, digits, '-' or '_' "
                                  "(it names a folder of the audit).")
        if self.federation is not None:
            _choice("federation.attack", self.federation.attack, tuple(attack_names()))
            _choice("federation.model", self.federation.model, tuple(MODELS))
            from medpfl.experiments.train_run import TrainRunConfig
            from medpfl.experiments.train_run import _check as check_training

            try:  # medpfl train's own checks, before anything is trained
                check_training(TrainRunConfig(data=None, image_size=self.image_size, channels=self.channels,
                                            **dataclasses.asdict(self.federation)))
            except MedPFLError as exc:
                raise MedPFLError(f"Audit config key 'federation': {exc}") from None
        return self


def _choice(key: str, value: Any, valid: tuple, optional: bool = False) -> None:
    if (value is None and optional) or value in valid:
        return
    listed = ", ".join(map(str, valid)) + (" (or null)" if optional else "")
    raise MedPFLError(f"Audit config key '{key}' is '{value}'; valid values: {listed}.")


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(kind))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return {type(None): "null", dict: "mapping", list: "list"}.get(kind, getattr(kind, "__name__", str(kind)))


def _convert(value: Any, kind: Any, key: str) -> Any:
    """`value` read from YAML as `kind` (an annotation), or one sentence naming `key`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key)
            except MedPFLError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(kind):
        return from_mapping(kind, value, key)
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single item where a list is expected
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MedPFLError(f"Audit config key '{key}' must be a mapping (key: value lines), not '{value}'.")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MedPFLError(f"Audit config key '{key}' is '{value}'; it must be {_type_name(kind)}.")
    return value


def from_mapping(cls: type, values: Any, key: str = "") -> Any:
    """An instance of the dataclass `cls` from a YAML mapping; unknown keys are refused by name."""
    where = f"'{key}'" if key else "the top level"
    if cls is AttackConfig and isinstance(values, str):
        values = {"name": values}  # `- idlg` is short for `- name: idlg`
    if values is None:
        values = {}
    if not isinstance(values, dict):
        keys = ", ".join(f.name for f in dataclasses.fields(cls))
        raise MedPFLError(f"Audit config {where} must be a mapping of keys ({keys}).")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in values:
        if name not in names:
            raise MedPFLError(f"Audit config key '{(key + '.') if key else ''}{name}' is unknown; valid keys "
                              f"{'in ' + where if key else 'at the top level'}: {', '.join(names)}.")
    converted = {name: _convert(value, hints[name], f"{(key + '.') if key else ''}{name}")
                 for name, value in values.items()}
    try:
        return cls(**converted)
    except MedPFLError as exc:  # a value its class refuses (the federation's settings check themselves)
        raise MedPFLError(f"Audit config key '{key}': {exc}" if key else str(exc)) from None


def shipped_config(name: str) -> Path:
    """The path of a configuration shipped with MedPFL (`demo`, `medpfl-paper`)."""
    return Path(str(resources.files("medpfl") / "configs" / f"{name}.yaml"))


def load_audit_config(path: str | Path | None) -> AuditConfig:
    """Read and check an audit config; None or a shipped name (demo, medpfl-paper) reads the shipped one."""
    import yaml

    if path is None or str(path) in SHIPPED:
        path = shipped_config(str(path or "demo"))
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MedPFLError(f"Cannot read the audit config '{path}' ({exc.strerror}); pass a YAML file or one of: "
                          f"{', '.join(SHIPPED)}.") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MedPFLError(f"The audit config '{path}' is not valid YAML{where}; check its indentation and colons.") \
            from None
    try:
        return from_mapping(AuditConfig, values).check()
    except MedPFLError as exc:
        raise MedPFLError(f"{path.name}: {exc}") from None
