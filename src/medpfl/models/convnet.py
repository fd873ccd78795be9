"""A small ConvNet that trains well on 64x64 medical images in a few CPU minutes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medpfl.models.norms import make_norm


class ConvNet(nn.Module):
    """Stages of conv3x3 + norm + ReLU + 2x2 max-pool, global average pool, Linear classifier `fc`."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        norm: str = "batch",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                # A bias before a norm layer is redundant; keep it only when there is no norm.
                nn.Conv2d(channels, width, 3, padding=1, bias=norm == "none"),
                # 8 groups at most: 32 groups on 32 channels would degenerate into instance norm.
                make_norm(norm, width, max_groups=8),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) for images (N, C, H, W)."""
        return self.fc(self.pool(self.features(x)).flatten(1))
