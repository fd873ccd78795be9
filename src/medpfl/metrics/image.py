"""Image similarity between reconstructions and originals, done right: clamp to [0,1], data_range 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _gaussian_window(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, device=device, dtype=dtype) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image of two N x C x H x W batches (Gaussian window 11, sigma 1.5, data_range 1)."""
    a, b = a.clamp(0, 1).double(), b.clamp(0, 1).double()
    channels = a.shape[1]
    window = _gaussian_window(channels, a.device, a.dtype)
    # Valid (unpadded) filtering, as in Wang et al. and scikit-image, so borders do not score zeros.
    blur = lambda t: F.conv2d(t, window, groups=channels)  # noqa: E731
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, on images clamped to [0,1]."""
    return (a.clamp(0, 1) - b.clamp(0, 1)).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (peak 1); capped at 100 dB for identical images."""
    return (10 * torch.log10(1.0 / mse(a, b).clamp_min(1e-10))).clamp(max=100.0)
