"""Defense specs as written on the command line: `laplace:b=0.01,0.005`, `clip:norm=1+gaussian:sigma=0.1`, `none`.

A spec is defenses joined by '+' (one chain); each is NAME or NAME:KEY=V[,V...][,KEY=V...]. A key given
several values makes several chains (every combination), as `medpfl sweep` runs them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from medpfl.defenses.chain import Chain
from medpfl.defenses.client_dp import ClientLevelDP
from medpfl.defenses.clip import ClipNorm
from medpfl.defenses.dpsgd import DPSGD
from medpfl.defenses.noise import GaussianNoise, LaplaceNoise
from medpfl.defenses.quantize import Quantize
from medpfl.defenses.secagg import SecureAggregation
from medpfl.defenses.topk import TopK
from medpfl.errors import MedPFLError


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError("must be positive")
        return value
    return parse


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError("must be in [0, 1)")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise ValueError("must be in (0, 1)")
    return value


def _rate(text: str) -> float:
    """A sampling rate: 1 is every example in every step (a FedSGD site's full batch), without amplification."""
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError("must be in (0, 1]")
    return value


def _bits(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 16:
        raise ValueError("must be 1 to 16")
    return value


def _sites(text: str) -> int:
    value = int(text)
    if value < 2:
        raise ValueError("must be 2 or more")
    return value


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError("must be true or false")
    return text.lower() in ("true", "1")


def _accountant(text: str) -> str:
    if text not in ("rdp", "prv"):
        raise ValueError("must be rdp or prv")
    return text


# name -> (class, {spec key: (constructor argument, parser)}, required keys)
DEFENSES: dict[str, tuple[type, dict[str, tuple[str, Callable[[str], Any]]], tuple[str, ...]]] = {
    "laplace": (LaplaceNoise, {"b": ("b", _positive(float))}, ("b",)),
    "gaussian": (GaussianNoise, {"sigma": ("sigma", _positive(float))}, ("sigma",)),
    "clip": (ClipNorm, {"norm": ("norm", _positive(float))}, ("norm",)),
    "topk": (TopK, {"prune": ("prune", _share), "per_layer": ("per_layer", _bool)}, ("prune",)),
    "quant": (Quantize, {"bits": ("bits", _bits), "stochastic": ("stochastic", _bool)}, ("bits",)),
    "dpsgd": (DPSGD, {"epsilon": ("epsilon", _positive(float)), "noise": ("noise_multiplier", _positive(float)),
                      "clip": ("clip", _positive(float)), "delta": ("delta", _probability),
                      "accountant": ("accountant", _accountant), "rate": ("sample_rate", _rate),
                      "steps": ("steps", _positive(int))}, ()),
    "secagg": (SecureAggregation, {"k": ("k", _sites)}, ("k",)),
    "cdp": (ClientLevelDP, {"noise": ("noise_multiplier", _positive(float)), "clip": ("clip", _positive(float)),
                            "delta": ("delta", _probability), "accountant": ("accountant", _accountant),
                            "rounds": ("rounds", _positive(int))}, ("noise",)),
}


def parse_defenses(spec: str) -> list[Chain]:
    """Every defense chain a spec names (one per combination of listed strengths)."""
    spec = spec.strip()
    if spec in ("", "none"):
        return [Chain()]
    options = [_parse_one(part.strip()) for part in spec.split("+")]
    return [Chain(tuple(combo)) for combo in itertools.product(*options)]


def parse_defense(spec: str) -> Chain:
    """The one defense chain a spec names; a list of strengths is refused."""
    chains = parse_defenses(spec)
    if len(chains) > 1:
        raise MedPFLError(f"--defense '{spec}' names {len(chains)} defenses; give one strength here "
                          "(`medpfl sweep --defenses` runs lists).")
    return chains[0]


def _parse_one(text: str) -> list:
    name, _, body = text.partition(":")
    name = name.strip()
    if name not in DEFENSES:
        raise MedPFLError(f"Unknown defense '{name}' in '{text}'; choose one of: none, {', '.join(DEFENSES)}.")
    cls, keys, required = DEFENSES[name]
    values: dict[str, list[str]] = {}
    key = None
    for token in filter(None, (t.strip() for t in body.split(","))):
        if "=" in token:
            key, _, token = token.partition("=")
            key = key.strip()
            if key not in keys:
                raise MedPFLError(f"Defense '{name}' has no key '{key}'; valid keys: {', '.join(keys)}.")
            if key in values:
                raise MedPFLError(f"Defense '{name}' gives key '{key}' twice; list its values once, e.g. "
                                  f"{key}=1,2.")
            values[key] = []
        elif key is None:
            raise MedPFLError(f"Defense '{text}' needs KEY=VALUE after the colon, e.g. {name}:{next(iter(keys))}=...")
        values[key].append(token.strip())
    missing = [k for k in required if k not in values]
    if name == "dpsgd" and ("epsilon" in values) == ("noise" in values):
        raise MedPFLError(f"Defense '{text}' needs exactly one of epsilon=... (a target over the whole run) "
                          "or noise=... (the noise multiplier).")
    if missing:
        raise MedPFLError(f"Defense '{text}' needs {' and '.join(k + '=VALUE' for k in missing)}.")
    parsed: dict[str, list[Any]] = {}
    for key, texts in values.items():
        argument, parse = keys[key]
        if not texts:
            raise MedPFLError(f"Defense '{name}' key '{key}' has no value.")
        try:
            parsed[argument] = [parse(t) for t in texts]
        except ValueError as exc:
            bad = next(t for t in texts if _fails(parse, t))
            raise MedPFLError(f"Defense '{name}' {key}={bad} is invalid: {key} {_reason(exc)}.") from None
    arguments = list(parsed)
    return [cls(**dict(zip(arguments, combo))) for combo in itertools.product(*parsed.values())]


def _fails(parse: Callable[[str], Any], text: str) -> bool:
    try:
        parse(text)
        return False
    except ValueError:
        return True


def _reason(exc: ValueError) -> str:
    message = str(exc)
    return message if message.startswith("must") else "must be a number"
