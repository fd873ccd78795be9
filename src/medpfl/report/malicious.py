"""The report's malicious-server section: what a server that changed the model it sent recovered, against the
share its attack expects and chance, and whether the sites' model check (fl.model_check) would have stopped it."""

from __future__ import annotations

import torch

from medpfl.attacks import ATTACKS
from medpfl.attacks.imprint import expected_share
from medpfl.metrics.intervals import wilson
from medpfl.metrics.privacy import SUCCESS_SSIM
from medpfl.report.html import Section, esc
from medpfl.report.runs import AttackRun, TrainRun


def _records(run: AttackRun | TrainRun) -> list[dict]:
    return run.results if isinstance(run, AttackRun) else run.attacks


def _imprint_expected(run: AttackRun | TrainRun, images_per_update: int) -> float:
    """(1 - 1/N)^(n - 1): an image alone among n in N bins of equal mass (attacks.imprint.expected_share)."""
    settings = run.config.get("attack_settings") or run.config.get("settings") or {}
    bins = settings.get("bins") or max(1, round(float(settings.get("bins_per_image", 4.0)) * images_per_update))
    return expected_share(torch.full((int(bins),), 1 / int(bins), dtype=torch.float64), images_per_update)


def recovery_sentence(run: AttackRun | TrainRun, success_ssim: float, chance: float | None) -> str:
    """How many images the malicious server read out, with interval, expected share and chance."""
    records = _records(run)
    scores = [s for r in records for s in r["ssim"]]
    rate = wilson(sum(s >= success_ssim for s in scores), len(scores))
    per_update = len(records[0]["ssim"])
    expected = (f"; expected share: {_imprint_expected(run, per_update):.2f}, the chance that one of the "
                f"{per_update} images behind an update is alone in its brightness bin when the bins hold equal shares"
                if run.attack == "imprint" else
                "; trap weights have no expected share (which units an image fires depends on the weights)")
    chance_text = f"; a random other image of the data reaches it for {chance:.2f}" if chance is not None else ""
    return (f"A malicious server ({run.attack}) read {rate.successes} of {rate.trials} images out of the updates "
            f"recognisably (SSIM >= {success_ssim:g}): {rate.value:.2f}, 95% interval {rate.low:.2f}-{rate.high:.2f}"
            f"{expected}{chance_text}.")


def check_sentence(run: AttackRun | TrainRun) -> str:
    """The sites' check's verdict on the models the server sent."""
    records = _records(run)
    if isinstance(run, TrainRun):  # one model per round, however many sites' updates were read
        records = list({r["round"]: r for r in records}.values())
    verdicts = [r["site_check"] for r in records if "site_check" in r]
    if not verdicts:
        return "The run did not record what the sites' model check says of the models the server sent."
    refused = [v for v in verdicts if v]
    ran_unchecked = isinstance(run, TrainRun) and run.config.get("site_check") is False
    if not refused:
        return (f"The sites' model check would not have stopped it: all {len(verdicts)} models the server sent "
                "pass it.")
    stopped = "would have stopped it" if len(refused) == len(verdicts) else "would have stopped part of it"
    how = (" The sites trained without it here (--no-site-check), to measure what it prevents." if ran_unchecked
           else "")
    return (f"The sites' model check {stopped}: it refuses {len(refused)} of the {len(verdicts)} models the server "
            f"sent, e.g. \"{refused[0]}\"{how}")


def section_malicious_server(ctx) -> Section | None:
    runs = [r for r in ctx.attacked if r.attack in ATTACKS and ATTACKS[r.attack].threat.modifies_model]
    if not runs:
        return None
    parts = ["<p>These runs assume a server that does not follow the protocol: it changes the model it sends so "
             "that images can be read straight out of the updates, through secure aggregation too. A site can "
             "tell by checking the model it receives before it trains.</p><ul class=findings>"]
    for run in runs:
        summary = run.summary or {}
        threshold = float(summary.get("success_ssim", run.config.get("success_ssim", SUCCESS_SSIM)))
        recovered = recovery_sentence(run, threshold, summary.get("asr_chance"))
        parts.append(f"<li><strong>{esc(run.name)}</strong>: {esc(recovered)} {esc(check_sentence(run))}</li>")
    parts.append("</ul>")
    return Section("malicious-server", "A malicious server", "".join(parts))
