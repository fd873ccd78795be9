"""The sigmoid LeNets of the DLG, iDLG and CPL papers, for any square input size and channel count."""

from __future__ import annotations

import torch
from torch import nn

from medpfl.errors import MedPFLError

# (out_channels, kernel, stride, padding) per conv layer, as in the authors' notebooks.
LENET_LAYERS: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "dlg": ((12, 5, 2, 2), (12, 5, 2, 2), (12, 5, 1, 2), (12, 5, 1, 2)),
    "idlg": ((12, 5, 2, 2), (12, 5, 2, 2), (12, 5, 1, 2)),
    "cpl": ((16, 2, 1, 2),) * 6,
}


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution (PyTorch's floor formula, dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def lenet_feature_size(variant: str, image_size: int) -> int:
    """Flattened feature count before the classifier (768 for 'dlg'/'idlg', 40000 for 'cpl' at 32x32)."""
    size, channels = image_size, 0
    for channels, kernel, stride, padding in LENET_LAYERS[variant]:
        size = conv_output_size(size, kernel, stride, padding)
        if size < 1:
            raise MedPFLError(f"--image-size {image_size} is too small for lenet-{variant}; use at least 1.")
    return channels * size * size


class LeNet(nn.Module):
    """Conv + sigmoid stack and one Linear classifier `fc`; no in-place ops, so vmap and double backward work."""

    def __init__(self, variant: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels, kernel, stride, padding in LENET_LAYERS[variant]:
            layers += [nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding), nn.Sigmoid()]
            channels = out_channels
        self.variant = variant
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(lenet_feature_size(variant, image_size), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) for images (N, C, H, W)."""
        return self.fc(self.body(x).flatten(1))
