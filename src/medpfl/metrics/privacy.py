"""Scoring an attack against the ground truth it never saw: how much of each victim leaked."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from medpfl.metrics.image import mse, psnr, ssim

SUCCESS_SSIM = 0.9  # the paper's threshold for a successful reconstruction


@dataclass
class VictimScore:
    """Per image of one victim's batch, after matching reconstructions to originals."""

    ssim: list[float]
    psnr: list[float]
    mse: list[float]
    label_correct: list[bool]
    order: list[int]  # order[j] = index of the reconstruction matched to original j


def match_and_score(originals: torch.Tensor, true_labels: torch.Tensor,
                    reconstructions: torch.Tensor, labels: torch.Tensor) -> VictimScore:
    """Pair each original (B x C x H x W) with one reconstruction by the assignment that maximises
    total SSIM (order within a batch is not recoverable from an averaged gradient), then score."""
    B = originals.shape[0]
    a = originals.repeat_interleave(B, 0)
    b = reconstructions.repeat(B, 1, 1, 1)
    similarity = ssim(a, b).reshape(B, B)
    _, order = linear_sum_assignment(-similarity.cpu().numpy())
    matched = reconstructions[torch.as_tensor(order)]
    return VictimScore(
        ssim=ssim(originals, matched).tolist(),
        psnr=psnr(originals, matched).tolist(),
        mse=mse(originals, matched).tolist(),
        # Labels are scored as multisets: the attack recovers which labels, not which image has which.
        label_correct=_multiset_hits(true_labels, labels),
        order=[int(i) for i in order],
    )


def _multiset_hits(true_labels: torch.Tensor, labels: torch.Tensor) -> list[bool]:
    remaining = labels.tolist()
    hits = []
    for label in true_labels.tolist():
        hits.append(label in remaining)
        if label in remaining:
            remaining.remove(label)
    return hits


def reidentified(reconstructions: torch.Tensor, true_index: torch.Tensor, gallery: torch.Tensor,
                 chunk: int = 256) -> torch.Tensor:
    """Whether each reconstruction's most similar image (by SSIM) in the victim's whole dataset
    (`gallery`, N x C x H x W) is its own original, whose gallery index is `true_index`. An exact
    copy of the original elsewhere in the gallery ties with it, and a tie counts as found."""
    hits = []
    for r, true in zip(reconstructions, true_index.tolist()):
        scores = torch.cat([ssim(r[None].expand(len(g), -1, -1, -1), g) for g in gallery.split(chunk)])
        hits.append(bool(scores[true] >= scores.max()))
    return torch.tensor(hits, dtype=torch.bool)
