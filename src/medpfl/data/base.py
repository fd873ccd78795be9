"""What every image source yields: lazily listed items, decoded one at a time into [0,1] arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from abc import ABC, abstractmethod
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Item:
    """One image a source holds, listed without decoding it."""

    item_id: str  # stable across runs, e.g. "MR/brain.nii.gz#z=12"
    label: int
    class_name: str
    provenance: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Skipped:
    """A file a source could not use, and why."""

    path: str
    reason: str


class ImageSource(ABC):
    """A labelled collection of images: `items` are listed cheaply, `load` decodes one.

    `load` returns float32 in [0,1], shape H x W (grayscale) or H x W x C (C = 3), never resized.
    """

    name: str = "source"
    classes: list[str]
    items: list[Item]
    skipped: list[Skipped]

    @abstractmethod
    def load(self, item: Item) -> np.ndarray:
        """Decode one item into float32 [0,1], H x W or H x W x 3."""

    def __len__(self) -> int:
        return len(self.items)
