"""A site's check that the model it received carries no anchor for a malicious server, before it trains.

A server that changes the model it sends can read images out of any update, secure aggregation or not
(attacks.imprint). The site holds two defences that need no trust in the server:

1. The fingerprint: parameter names, shapes and dtypes of the architecture agreed at enrolment (the site's
   own build of it, or the first model it received). A received model that differs, e.g. one with an
   extra linear layer on the raw pixels, is refused.
2. Weight signatures, for a server that was malicious from the first round or hides its anchor inside the
   agreed layers:
   - imprint: many rows of one layer taking the same measurement (near-parallel rows) with staggered
     biases, so that each row fires for the inputs above its own threshold (Fowl et al. 2022);
   - trap weights: the rows of a fully connected layer with negative weights larger than their positive
     ones, so that few nonnegative inputs (pixels, sigmoid or ReLU features) activate each unit and an
     input alone behind a unit comes back from its row (Boenisch et al. 2023 scale the negative weights
     up; pixels being positive and alike, a factor of 1.12 already makes a unit fire for one image in 8).
     Convolutions are not tested for it (Boenisch et al. set their traps in fully connected layers).

Thresholds rest on how far honest layers are from them: a row of d independently drawn weights has a
cosine of order 1/sqrt(d) with any other (LeNets' 75-wide conv rows: about 0.1); the median ratio of a
layer's negative to positive weight magnitudes starts at 1.00 and stayed at or below 1.048 over 10 honest
rounds of the MLP (embedded set and dermoscopy patches, IID and Dirichlet(0.3)), while the smallest trap
the attack sets (one image in 8) has 1.12. benchmarks/model_check_alarms.py counts the check's verdicts
on every honest round it ran (LeNets, ConvNet, MLP, IID and Dirichlet, several seeds, two data sets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from medpfl.errors import MedPFLError

NEAR_PARALLEL = 0.99  # cosine above which two rows take the same measurement
MIN_IMPRINT_ROWS = 3  # rows that must share one measurement (with distinct biases) to call it an imprint
TRAP_RATIO = 1.08  # median over rows of mean |negative weight| / mean positive weight above which a layer is trapped
MIN_TRAP_ROWS = 32  # a trap layer needs many units to catch images alone; a classifier of few classes is none

Fingerprint = tuple[tuple[str, tuple[int, ...], str], ...]


class ModelRefused(MedPFLError):
    """A site refused to train on the model it received; the message says why in one sentence."""

    def __init__(self, reason: str, round_index: int | None = None) -> None:
        super().__init__(reason)
        self.round = round_index  # the federation's round it happened in, where known


def fingerprint(weights: Mapping[str, torch.Tensor]) -> Fingerprint:
    """Names, shapes and dtypes of a model's parameters, in order."""
    return tuple((name, tuple(w.shape), str(w.dtype).removeprefix("torch.")) for name, w in weights.items())


def fingerprint_difference(agreed: Fingerprint, received: Fingerprint) -> str | None:
    """One sentence on how `received` differs from `agreed`, or None when they match."""
    if agreed == received:
        return None
    known, got = {n: (s, d) for n, s, d in agreed}, {n: (s, d) for n, s, d in received}
    if all(n.rpartition("/")[2].isdigit() for n in [*known, *got]):  # numbered arrays (Flower's legacy records)
        return _positional_difference(agreed, received)
    # A model that wraps the agreed one keeps its parameters under a prefix: those are not the news.
    wrapped = [n for n in got if n not in known and any(n.endswith("." + k) and got[n] == known[k] for k in known)]
    extra = [n for n in got if n not in known and n not in wrapped]
    if extra:
        shown = ", ".join(f"{n} ({' x '.join(map(str, got[n][0]))})" for n in extra[:3])
        return (f"the received model has {len(extra)} parameter(s) the agreed architecture lacks: {shown}"
                + (" ..." if len(extra) > 3 else "")
                + (f", with the agreed ones moved inside it under {wrapped[0].split('.')[0]}" if wrapped else ""))
    missing = [n for n in known if n not in got]
    if missing:
        return f"the received model lacks {len(missing)} agreed parameter(s), first {missing[0]}"
    changed = next(n for n in known if known[n] != got[n])
    return (f"parameter {changed} is {' x '.join(map(str, got[changed][0]))} {got[changed][1]} where the agreed "
            f"architecture has {' x '.join(map(str, known[changed][0]))} {known[changed][1]}")


def _positional_difference(agreed: Fingerprint, received: Fingerprint) -> str:
    """How numbered arrays differ: their count and the first that differs (names say nothing here)."""
    def shape(entry) -> str:
        return " x ".join(map(str, entry[1])) + f" {entry[2]}"

    first = next((i for i, (a, r) in enumerate(zip(agreed, received)) if a[1:] != r[1:]), min(len(agreed),
                                                                                            len(received)))
    count = (f"the received model has {len(received)} arrays where the agreed architecture has {len(agreed)}; "
             if len(received) != len(agreed) else "")
    if first >= min(len(agreed), len(received)):
        return count.removesuffix("; ")
    return f"{count}array {first} is {shape(received[first])} where the agreed one is {shape(agreed[first])}"


def _rows(weights: Mapping[str, torch.Tensor]):
    """(name, rows (out x everything else), bias or None, fully connected?) for every layer with rows. A
    layer's bias is the tensor after its weight when that is one value per row: PyTorch's order, whatever
    the names (Flower's legacy messages number the arrays)."""
    tensors = list(weights.items())
    for i, (name, w) in enumerate(tensors):
        if w.dim() < 2 or not w.is_floating_point():
            continue
        after = tensors[i + 1][1] if i + 1 < len(tensors) else None
        bias = after if after is not None and after.shape == w.shape[:1] else None
        yield (name, w.detach().flatten(1).double().cpu(), None if bias is None else bias.detach().double().cpu(),
               w.dim() == 2)


def _parallel_ladder(rows: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    """The largest group of near-parallel rows of a layer and how many distinct thresholds (bias over row
    length) it holds: scaled copies of one row firing at one point are one unit repeated, a ladder of
    thresholds makes bins."""
    norms = rows.norm(dim=1)
    live = norms > 0
    if int(live.sum()) < 2:
        return int(live.sum()), int(live.sum())
    unit = rows[live] / norms[live, None]
    parallel = (unit @ unit.T) > NEAR_PARALLEL
    group = parallel[int(parallel.sum(1).argmax())].nonzero().flatten()
    if bias is None:
        return len(group), 1
    thresholds = bias[live][group] / norms[live][group]
    return len(group), len(torch.unique(thresholds.round(decimals=9)))


def _negative_excess(rows: torch.Tensor) -> float:
    """Median over a layer's rows of the mean magnitude of its negative weights over that of its positive ones."""
    if len(rows) < MIN_TRAP_ROWS or rows.shape[1] < 2:
        return 1.0
    negative = torch.where(rows < 0, -rows, 0).sum(1) / (rows < 0).sum(1).clamp_min(1)
    positive = torch.where(rows > 0, rows, 0).sum(1) / (rows > 0).sum(1).clamp_min(1)
    return float((negative / positive.clamp_min(1e-30)).median())


def imprint_signature(weights: Mapping[str, torch.Tensor]) -> str | None:
    """A sentence naming a layer whose rows take one measurement at staggered thresholds, or None."""
    for name, rows, bias, _ in _rows(weights):
        size, thresholds = _parallel_ladder(rows, bias)
        if size >= MIN_IMPRINT_ROWS and thresholds >= MIN_IMPRINT_ROWS:
            return (f"layer {name.removesuffix('.weight')} has {size} rows taking the same measurement "
                    f"(cosine > {NEAR_PARALLEL}) at {thresholds} staggered thresholds, the mark of an imprint "
                    "module that reads images out of updates")
    return None


def trap_signature(weights: Mapping[str, torch.Tensor]) -> str | None:
    """A sentence naming a fully connected layer whose negative weights outweigh its positive ones, or None."""
    for name, rows, _, linear in _rows(weights):
        ratio = _negative_excess(rows) if linear else 1.0
        if ratio > TRAP_RATIO:
            return (f"layer {name.removesuffix('.weight')} has negative weights {ratio:.2f} times as large as its "
                    "positive ones, the mark of trap weights that few inputs activate")
    return None


def signature_margins(weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How close a model's layers come to the signatures: the largest ladder of near-parallel rows (rows
    with distinct thresholds; an imprint needs MIN_IMPRINT_ROWS) and the largest negative-to-positive weight
    ratio of a fully connected layer (a trap needs more than TRAP_RATIO)."""
    layers = list(_rows(weights))
    ladders = [min(_parallel_ladder(rows, bias)) for _, rows, bias, _ in layers]
    ratios = [_negative_excess(rows) for _, rows, _, linear in layers if linear]
    return {"largest_ladder": max(ladders, default=0), "largest_negative_excess": max(ratios, default=1.0)}


@dataclass
class ModelCheck:
    """What one site verifies before every round; `agreed` is recorded at enrolment or at the first round."""

    agreed: Fingerprint | None = None

    def verify(self, weights: Mapping[str, torch.Tensor]) -> str | None:
        """None if the site may train on `weights`, else one sentence on why it refuses."""
        received = fingerprint(weights)
        if self.agreed is None:
            self.agreed = received
        reason = (fingerprint_difference(self.agreed, received) or imprint_signature(weights)
                  or trap_signature(weights))
        return None if reason is None else f"The site refuses to train: {reason}."

    def require(self, weights: Mapping[str, torch.Tensor], round_index: int | None = None) -> None:
        """Raise ModelRefused with the reason if the site may not train on `weights` (sent in `round_index`)."""
        reason = self.verify(weights)
        if reason is not None:
            where = "" if round_index is None else f"In round {round_index} the sites refused the model the server sent: "
            raise ModelRefused(where + reason, round_index)
