"""Images for people: reconstructions as PNG files and a grid of originals above reconstructions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """C x H x W in [0,1] to H x W (x 3) uint8, clamped first so values never wrap around."""
    array = (image.detach().clamp(0, 1).cpu() * 255).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else array


def save_png(image: torch.Tensor, path: Path) -> None:
    """Save one C x H x W image in [0,1] as PNG."""
    Image.fromarray(to_uint8(image)).save(path)


def load_png(path: Path, channels: int) -> torch.Tensor:
    """Read a PNG written by `save_png` back as C x H x W in [0,1]."""
    array = np.asarray(Image.open(path).convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    tensor = torch.from_numpy(array)
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1)


def comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path,
                    per_row: int = 16, scale: int = 2, gap: int = 2) -> None:
    """PNG with rows of originals, each row followed by their reconstructions (N x C x H x W each)."""
    n, c, h, w = originals.shape
    rows = (n + per_row - 1) // per_row
    cell_h, cell_w = h * scale + gap, w * scale + gap
    canvas = np.full((rows * 2 * cell_h + gap, min(n, per_row) * cell_w + gap, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, per_row)
        for k, image in enumerate((originals[i], reconstructions[i])):
            tile = to_uint8(image)
            if tile.ndim == 2:
                tile = np.repeat(tile[:, :, None], 3, axis=2)
            tile = tile.repeat(scale, 0).repeat(scale, 1)
            y, x = (2 * r + k) * cell_h + gap, col * cell_w + gap
            canvas[y:y + h * scale, x:x + w * scale] = tile
    Image.fromarray(canvas).save(path)
