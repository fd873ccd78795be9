"""Privacy accounting with Opacus's accountants, over every noisy step of a whole run.

A ledger records each noisy release (noise multiplier, sample rate) as it happens, so the epsilon
reported covers all rounds and all local steps, never one round alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from medpfl.errors import MedPFLError

ACCOUNTANTS = ("rdp", "prv")
DEFAULT_DELTA = 1e-5  # the usual choice for datasets of up to ~10^5 records (delta well below 1/n)
# RDP orders: Opacus's defaults (1.1 ... 63) widened at both ends. A few noisy steps of a large noise
# multiplier (client-level DP over few rounds, DP-SGD at q = 1) put the optimal order past 63, where
# Opacus's grid gives a looser epsilon and warns on the console.
RDP_ORDERS = ([1 + x / 100 for x in range(1, 10)] + [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
              + [64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 2048, 4096, 8192])


def _accountant(kind: str):
    if kind not in ACCOUNTANTS:
        raise MedPFLError(f"Unknown privacy accountant '{kind}'; choose one of: {', '.join(ACCOUNTANTS)}.")
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=kind)


def _orders(kind: str) -> dict:
    return {"alphas": RDP_ORDERS} if kind == "rdp" else {}


def _epsilon(history: list[tuple[float, float, int]], delta: float, kind: str) -> float:
    acc = _accountant(kind)
    acc.history = list(history)
    with warnings.catch_warnings():
        # An optimum at the widened grid's edge still gives a valid (if loose) bound: no console noise.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus")  # PRV's log(0) at rate 1
        return float(acc.get_epsilon(delta=delta, **_orders(kind)))


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float = DEFAULT_DELTA,
                  accountant: str = "rdp") -> float:
    """Epsilon at `delta` after `steps` sampled Gaussian releases with these parameters."""
    if steps <= 0:
        return 0.0
    return _epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_for_epsilon(epsilon: float, sample_rate: float, steps: int, delta: float = DEFAULT_DELTA,
                      accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus's tolerance) whose epsilon over `steps` stays within `epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    if epsilon <= 0:
        raise MedPFLError(f"dpsgd epsilon must be positive, got {epsilon}.")
    _accountant(accountant)  # a clear error for an unknown accountant
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant, **_orders(accountant)))
    except ValueError as exc:
        raise MedPFLError(f"dpsgd epsilon={epsilon} cannot be reached over {steps} steps at sample rate "
                          f"{sample_rate:g}; allow a larger epsilon or fewer steps.") from exc


@dataclass
class PrivacyLedger:
    """Every noisy release of a run, as (noise multiplier, sample rate, count); epsilon over all of them."""

    history: list[tuple[float, float, int]] = field(default_factory=list)

    def record(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        """Record `count` releases (steps or rounds), merged with the last entry when they are alike."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + count)
        else:
            self.history.append((noise_multiplier, sample_rate, count))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float = DEFAULT_DELTA, accountant: str = "rdp") -> float:
        """Epsilon at `delta` over everything recorded."""
        if not self.history:
            return 0.0
        return _epsilon(self.history, delta, accountant)
