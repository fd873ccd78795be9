"""A fully connected net whose first layer sees the raw pixels: where trap weights go (Boenisch et al. 2023)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Linear (C*H*W -> width) + ReLU, then the Linear classifier `fc`."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 1000) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_channels * image_size * image_size, width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) for images (N, C, H, W)."""
        return self.fc(torch.relu(self.hidden(x.flatten(1))))
