"""ResNet-18 with a CIFAR-style or ImageNet-style stem and BatchNorm or GroupNorm, written with torch alone."""

from __future__ import annotations

import torch
from torch import nn

from medpfl.models.norms import make_norm


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (projection shortcut when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), make_norm(norm, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output; the sum is out of place so double backward and vmap stay valid."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock [2,2,2,2], widths 64..512), adaptive average pool, Linear classifier `fc`."""

    def __init__(self, num_classes: int, in_channels: int = 3, stem: str = "cifar", norm: str = "batch") -> None:
        super().__init__()
        if stem == "cifar":
            # Small images: keep full resolution in the first stage.
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False), make_norm(norm, 64), nn.ReLU()
            )
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                make_norm(norm, 64),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            raise ValueError(f"unknown ResNet stem {stem!r}; expected 'cifar' or 'imagenet'")
        self.stem_kind = stem
        stages: list[nn.Module] = []
        channels = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(channels, width, stride, norm), BasicBlock(width, width, 1, norm)))
            channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) for images (N, C, H, W)."""
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))
