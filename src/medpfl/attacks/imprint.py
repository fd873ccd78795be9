"""A malicious server's imprint attack: read images straight out of an update (Fowl et al., ICLR 2022).

The server does not follow the protocol: it sends the sites the agreed model behind an imprint module,
a linear layer on the raw pixels whose N rows all take the same measurement m(x) (here brightness, the
mean pixel value) with staggered biases -e_0 < ... : row k fires for an image iff m(x) > e_k. Its output
goes back into the image through a layer whose columns are all equal, so every firing row passes the
same gradient g(x) back for an image. The update's rows are then sums over the images above each edge:

    dW_k = sum_{x: m(x) > e_k} g(x) x / B,   db_k = sum_{x: m(x) > e_k} g(x) / B,

and the difference of adjacent rows holds only the images of the bin [e_k, e_{k+1}). An image alone in
its bin comes back exactly as (dW_k - dW_{k+1}) / (db_k - db_{k+1}); the last bin is its row alone. The
edges sit at quantiles of the measurement over images like the sites' (the server's public data), so
each bin holds a share 1/N of the images and an image is alone with probability (1 - 1/N)^(B - 1).

The readout is a ratio, so it holds for a FedAvg weight change of one local step (minus the learning
rate times the gradient) and for a secure aggregate of K sites (the mean of their gradients: one
update of K x B images). Over several local steps the module's own weights move between steps, the
equal columns drift apart and the readout becomes an approximation (measured in benchmarks/).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable

import torch
from torch import nn

from medpfl.attacks.base import SettingsAttack
from medpfl.attacks.labels import recover_labels
from medpfl.attacks.registry import AttackEntry, register
from medpfl.attacks.threat import ObservedUpdate, Reconstruction, ServerPayload, ThreatModel
from medpfl.errors import MedPFLError
from medpfl.models.imprint import IMPRINT_BIAS, IMPRINT_WEIGHT, ImprintedModel

def brightness(images: torch.Tensor) -> torch.Tensor:
    """The measurement every imprint row takes: mean pixel value of each image (N x C x H x W -> N)."""
    return images.flatten(1).mean(1)


def quantile_edges(public_images: torch.Tensor, bins: int) -> torch.Tensor:
    """Lower edges of `bins` bins of equal mass under the public images' brightness; the first is below any image."""
    if bins < 1:
        raise MedPFLError(f"--bins {bins} must be 1 or more.")
    if len(public_images) < 2:
        raise MedPFLError("The imprint attack places its bins at quantiles of images like the sites'; the source "
                          "holds no images besides the attacked ones: lower --n-images or pass a larger --data.")
    levels = torch.arange(1, bins, dtype=torch.float64) / bins
    inner = torch.quantile(brightness(public_images).double(), levels)
    return torch.cat([torch.tensor([-1.0], dtype=torch.float64), inner]).float()


def gaussian_edges(public_images: torch.Tensor, bins: int) -> torch.Tensor:
    """Lower edges of `bins` bins of equal mass under a Gaussian fitted to the public images' brightness (mean
    and standard deviation; breaching's placement); the first is below any image. Smoother than empirical
    quantiles when the server holds few public images for many bins."""
    if bins < 1 or len(public_images) < 2:
        return quantile_edges(public_images, bins)  # which says what is wrong
    measured = brightness(public_images).double()
    fit = NormalDist(float(measured.mean()), float(measured.std()))
    return torch.tensor([-1.0] + [fit.inv_cdf(i / bins) for i in range(1, bins)], dtype=torch.float32)


def held_out_pairs(public_images: torch.Tensor, bins: int, place: Callable[[torch.Tensor, int], torch.Tensor],
                   folds: int = 5, repeats: int = 4) -> int:
    """Pairs of public images that fall in one bin when the bins are placed by `place` on the other folds
    (repeated `folds`-fold, a fixed shuffle): the fewer, the more equal the bins' masses on unseen images, and
    the share of a batch alone is about 1 - (B - 1) sum_k p_k^2, where sum_k p_k^2 is the chance of such a pair."""
    measured = brightness(public_images)
    generator = torch.Generator().manual_seed(0)
    pairs = 0
    for _ in range(repeats):
        fold = torch.randperm(len(measured), generator=generator) % folds
        for f in range(folds):
            per_bin = torch.bincount(torch.bucketize(measured[fold == f], place(public_images[fold != f], bins),
                                                     right=True))
            pairs += int((per_bin * (per_bin - 1) // 2).sum())
    return pairs


def auto_edges(public_images: torch.Tensor, bins: int) -> torch.Tensor:
    """The placement that holds out better on the public images themselves: Gaussian-fitted quantiles unless
    empirical ones put fewer held-out pairs of public images in one bin (held_out_pairs). Measured on real
    brightness (benchmarks/imprint_expected_share.py --public; the embedded set and each of its modalities,
    dermoscopy patches, chest X-ray, brain T1 slices and crops, CR/CT/MR DICOM crops; 25-1000 public images,
    64-512 bins, batches of 16 and 64): the Gaussian holds more images alone where public images are few per
    bin and brightness is near-Gaussian, empirical quantiles where they are many or brightness is far from
    Gaussian (brain slices with empty ones at the volume's ends, dark ultrasound); ties, most often with few
    public images, go to the Gaussian, the better of the two there on most of those data sets."""
    if len(public_images) < 10:  # too few to hold any out
        return gaussian_edges(public_images, bins)
    if held_out_pairs(public_images, bins, quantile_edges) < held_out_pairs(public_images, bins, gaussian_edges):
        return quantile_edges(public_images, bins)
    return gaussian_edges(public_images, bins)


PLACEMENTS = {"auto": auto_edges, "quantiles": quantile_edges, "gaussian": gaussian_edges}


def expected_share(masses: torch.Tensor, batch: int) -> float:
    """Expected share of a batch's images alone in their bin when images fall in bins with `masses`
    independently: sum_k p_k (1 - p_k)^(B - 1). Equal masses 1/N give (1 - 1/N)^(B - 1)."""
    return float((masses * (1 - masses) ** (batch - 1)).sum())


def readout(weight_update: torch.Tensor, bias_update: torch.Tensor,
            tolerance: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bin, the image read off adjacent rows' difference (N x pixels) and the bias difference (N) behind it.

    A bin whose bias difference is below `tolerance` times the largest held no image."""
    weight_bins = weight_update - torch.cat([weight_update[1:], torch.zeros_like(weight_update[:1])])
    bias_bins = bias_update - torch.cat([bias_update[1:], torch.zeros_like(bias_update[:1])])
    held = bias_bins.abs() > tolerance * bias_bins.abs().max().clamp_min(1e-30)
    images = torch.where(held[:, None], weight_bins / torch.where(held, bias_bins, 1.0)[:, None], 0.0)
    return images, torch.where(held, bias_bins, 0.0)


@dataclass
class ImprintSettings:
    """How the malicious server builds its module."""

    bins: int | None = None  # None: `bins_per_image` times the images behind each update
    bins_per_image: float = 4.0
    spread: float = 1e-3  # how far the body's input moves in brightness per unit of mean firing
    gain: float = 1e-3  # the imprint rows' scale (breaching's default)
    placement: str = "auto"  # bin edges from the public brightness: "auto", "quantiles" or "gaussian" (PLACEMENTS)


class ImprintAttack(SettingsAttack):
    """Robbing the Fed: the server sends an imprinted model and reads each image alone in its bin."""

    name = "imprint"
    settings_class = ImprintSettings
    takes_checkpoints = False  # a readout, no optimisation

    def bins_for(self, images_per_update: int) -> int:
        s = self.settings
        return int(s.bins) if s.bins is not None else max(1, round(s.bins_per_image * images_per_update))

    def craft(self, model: nn.Module, image_shape: tuple[int, int, int], public_images: torch.Tensor,
              images_per_update: int) -> ImprintedModel:
        """The model the server sends instead of `model`: edges at quantiles of the public images' brightness
        (empirical, or of a Gaussian fitted to it, or whichever holds out better: `placement`)."""
        if self.settings.placement not in PLACEMENTS:
            raise MedPFLError(f"--set placement={self.settings.placement} is not one of {', '.join(PLACEMENTS)}.")
        edges = PLACEMENTS[self.settings.placement](public_images, self.bins_for(images_per_update))
        return ImprintedModel(model, image_shape, edges, self.settings.spread, self.settings.gain)

    def reconstruct(self, payload: ServerPayload, update: ObservedUpdate, generator: torch.Generator) -> Reconstruction:
        """Each victim's images read off its imprint rows; V x B x C x H x W in [0,1]. Bins that held
        several images give a blend; when fewer bins than B held images, black images fill the batch."""
        start = time.perf_counter()
        if IMPRINT_WEIGHT not in update.gradients:
            raise MedPFLError("The imprint attack reads an update of the imprinted model it sent; this update "
                              "has no imprint rows.")
        V, B = payload.n_victims, update.batch_size
        shape = payload.image_shape
        images = torch.zeros(V, B, *shape)
        found = torch.zeros(V, dtype=torch.long)
        for v in range(V):
            bins, weights = readout(update.gradients[IMPRINT_WEIGHT][v].double(),
                                    update.gradients[IMPRINT_BIAS][v].double())
            held = weights.abs().argsort(descending=True)[:B]
            held = held[weights[held] != 0]
            found[v] = len(held)
            images[v, :len(held)] = bins[held].float().reshape(-1, *shape).clamp(0, 1).cpu()
        labels = recover_labels(update, payload)
        return Reconstruction(images=images, labels=labels.cpu(), objective=torch.zeros(V),
                              evaluations=torch.zeros(V, dtype=torch.long), diverged=torch.zeros(V, dtype=torch.bool),
                              seconds=time.perf_counter() - start, extra={"bins_with_images": found.tolist()})


imprint = ImprintAttack  # imprint(**settings): bins = 4 x the images behind an update, overridden by `settings`

register(AttackEntry(
    "imprint", ImprintAttack, "Robbing the Fed: a malicious server sends the model behind an imprint module and "
    "reads images alone in their brightness bin off the update (Fowl et al. 2022)", "imprint (Robbing the Fed)",
    "is a dishonest server: it puts a hidden layer that sorts images by brightness in front of the model it sends, "
    "then reads every image that fell alone in its brightness band straight out of the update (Fowl et al. 2022)",
    default_model="lenet-idlg", threat=ThreatModel(modifies_model=True)))
