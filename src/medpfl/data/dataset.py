"""A torch-style dataset over an ImageSource: square float tensors in [0,1] and integer labels."""

from __future__ import annotations

from typing import Sequence

import torch

from medpfl.data.base import ImageSource, Item
from medpfl.data.sources._common import describe_error
from medpfl.data.transforms import to_tensor
from medpfl.errors import MedPFLError


class ImageDataset:
    """Items of `source` (all, or the given subset) as C x size x size float32 tensors with int labels.

    Converted tensors are cached in memory (they are small: size x size), so repeated epochs decode each file once.
    """

    def __init__(
        self,
        source: ImageSource,
        items: Sequence[Item] | None = None,
        size: int = 32,
        channels: int = 3,
        cache: bool = True,
    ) -> None:
        self.source = source
        self.items: list[Item] = list(source.items if items is None else items)
        self.classes: list[str] = list(source.classes)
        self.size = size
        self.channels = channels
        self.cache = cache
        self._tensors: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int) -> torch.Tensor:
        """The converted image of item `index` (C x size x size), decoded once if caching."""
        if index in self._tensors:
            return self._tensors[index]
        item = self.items[index]
        try:
            array = self.source.load(item)
        except MedPFLError:
            raise
        except Exception as exc:  # sources should raise MedPFLError; guard third-party ones that do not
            where = item.provenance.get("path", item.item_id)
            raise MedPFLError(
                f"Image '{where}' could not be decoded ({describe_error(exc)}); remove or replace the file."
            ) from exc
        tensor = to_tensor(array, self.size, self.channels)
        if self.cache:
            self._tensors[index] = tensor
        return tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self.items)
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} images")
        return self.image(index), self.items[index].label

    def load_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x: N x C x size x size float32, y: N int64) for the given item indices."""
        if len(indices) == 0:
            return torch.empty(0, self.channels, self.size, self.size), torch.empty(0, dtype=torch.long)
        pairs = [self[int(i)] for i in indices]
        x = torch.stack([p[0] for p in pairs])
        y = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        return x, y
