"""Scoring one victim's answer against the originals the attack never saw, the same way in every command.

For `--attack strongest` the answer holds every candidate; per image the scorer keeps the best by SSIM (the
auditor's worst case: what the best attack tried recovered), and records the attacker's own pick beside it.
"""

from __future__ import annotations

from typing import Any

import torch

from medpfl.metrics.privacy import VictimScore, match_and_score


def score_victim(originals: torch.Tensor, true_labels: torch.Tensor, result, j: int
                 ) -> tuple[VictimScore, torch.Tensor, dict[str, Any]]:
    """Victim `j` of an attack's `result` (a Reconstruction) scored against its originals (B x C x H x W):
    the scores, its reconstructions in the originals' order, and for `strongest` the fields naming the winner
    per image, each attack's SSIM and the attacker's pick."""
    def score_of(answer) -> tuple[VictimScore, torch.Tensor]:
        recon = answer.images[j].cpu()
        score = match_and_score(originals.cpu(), true_labels.cpu(), recon, answer.labels[j].cpu())
        return score, recon[torch.as_tensor(score.order)]

    score, matched = score_of(result)
    if "candidates" not in result.extra:
        return score, matched, {}
    strongest = {"attacker_pick": result.extra["attacker_pick"][j], "attacker_pick_ssim": score.ssim}
    scored = {name: score_of(answer) for name, answer in result.extra["candidates"].items()}
    B = originals.shape[0]
    winners = [max(scored, key=lambda name: scored[name][0].ssim[b]) for b in range(B)]
    score = VictimScore(*([getattr(scored[w][0], f)[b] for b, w in enumerate(winners)]
                          for f in ("ssim", "psnr", "mse", "label_correct", "order")))
    matched = torch.stack([scored[w][1][b] for b, w in enumerate(winners)])
    return score, matched, strongest | {"winner": winners,
                                        "ssim_by_attack": {name: s.ssim for name, (s, _) in scored.items()}}


def victim_record(originals: torch.Tensor, true_labels: torch.Tensor, result, j: int, items: list[str],
                  attacked_together: int) -> tuple[dict[str, Any], torch.Tensor]:
    """The per-image record of victim `j` of `result` (every command writes the same fields: the images' ids,
    true and recovered labels, scores per image, what the attack spent), and its reconstructions in the
    originals' order. Victims attacked together are each charged an equal share of the attack's wall time."""
    score, matched, strongest = score_victim(originals, true_labels, result, j)
    record = {
        "items": items,
        "labels": true_labels.tolist(),
        "recovered_labels": result.labels[j].tolist(),
        "ssim": score.ssim,
        "psnr": score.psnr,
        "mse": score.mse,
        "label_correct": score.label_correct,
        "diverged": bool(result.diverged[j]),
        "objective": float(result.objective[j]),
        "evaluations": int(result.evaluations[j]),
        **({"runs": int(result.extra["runs"][j])} if "runs" in result.extra else {}),
        # Runs that ended at their first evaluation: never an answer (restarted while restarts remain).
        **({"stalled_runs": int(result.extra["stalled_runs"][j])} if "stalled_runs" in result.extra else {}),
        "seconds": result.seconds / attacked_together,
        **strongest,
    }
    return record, matched
