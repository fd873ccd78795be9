"""Turn a decoded image (float [0,1], H x W or H x W x C) into a model-ready square tensor, with torch only."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medpfl.errors import MedPFLError

# ITU-R BT.601 luma weights, the same PIL uses for RGB -> L.
LUMA_601 = (0.299, 0.587, 0.114)


def to_tensor(array: np.ndarray | torch.Tensor, size: int, channels: int = 3) -> torch.Tensor:
    """float32 C x size x size in [0,1]: shorter side resized to `size` (antialiased bilinear), centre-cropped."""
    if channels not in (1, 3):
        raise MedPFLError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB).")
    if size < 1:
        raise MedPFLError(f"Image size {size} is invalid; use a positive number of pixels, e.g. 32.")
    x = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array, dtype=torch.float32)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    elif x.ndim == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):
        x = x.permute(2, 0, 1)  # H x W x C -> C x H x W
    elif x.ndim == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] in (1, 3, 4) and x.shape[-1] < x.shape[0]:
        x = x.permute(2, 0, 1)  # ambiguous tiny image: take the smaller trailing dim as channels
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise MedPFLError(f"Image of shape {tuple(x.shape)} is not H x W or H x W x 3; convert it to gray or RGB.")
    if x.shape[0] == 4:
        x = x[:3]  # drop alpha
    if channels == 1 and x.shape[0] == 3:
        # Reduce before resizing: a third of the work.
        weights = torch.tensor(LUMA_601, dtype=x.dtype).view(3, 1, 1)
        x = (x * weights).sum(0, keepdim=True)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x.unsqueeze(0), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, top : top + size, left : left + size]
    if channels == 3 and x.shape[0] == 1:
        x = x.expand(3, -1, -1)  # repeat gray after resizing: a third of the work
    return x.clamp(0.0, 1.0).contiguous()
