"""Class folders of ordinary image files (PNG, JPEG, BMP, TIFF), the layout of most Kaggle medical datasets."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from medpfl.data.base import ImageSource, Item, Skipped
from medpfl.data.sources._common import (
    class_index,
    describe_error,
    existing_path,
    relative_id,
    verify_by_file,
    visible_files,
)
from medpfl.errors import MedPFLError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Medical images are often larger than PIL's decompression-bomb threshold assumes for web images.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 1 << 30)


def is_image_file(path: Path) -> bool:
    """True if the file's extension is one FolderSource reads."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def pil_to_unit(im: Image.Image) -> np.ndarray:
    """Convert a PIL image to float32 [0,1], H x W or H x W x 3, scaling integers by their type's range."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32)
    if mode in ("L", "LA"):
        return np.asarray(im.getchannel(0), dtype=np.float32) / 255.0
    if mode.startswith("I;16"):
        # 16-bit PNG/TIFF: divide by the type's range, so a dark image stays dark (no per-image stretching).
        return np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
    if mode == "I":
        arr = np.asarray(im, dtype=np.int64)
        top = 65535.0 if arr.size == 0 or (arr.min() >= 0 and arr.max() <= 65535) else float(2**31 - 1)
        return np.clip(arr.astype(np.float32) / np.float32(top), 0.0, 1.0)
    if mode == "F":
        # Float images have no type range: keep them if already in [0,1], else stretch min..max.
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32))
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo >= 0.0 and hi <= 1.0:
            return arr
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if mode == "P":
        # Palette images with transparency must go through RGBA for PIL to apply it; alpha is dropped below.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")  # RGBA drops alpha; CMYK, YCbCr, LAB become RGB
    return np.asarray(im, dtype=np.float32) / 255.0


def check_decodes(path: str) -> None:
    """Decode a file cheaply enough for thousands of X-rays, raising if it is truncated or corrupt.

    JPEGs decode in draft mode at 1/8 scale (the entropy decoder still reads every byte, so truncation fails).
    """
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()


class FolderSource(ImageSource):
    """Images in class sub-folders: root/<class>/**/<image>; sorted folder names give labels 0..K-1."""

    name = "folder"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = existing_path(root, "Image folder")
        if not self.root.is_dir():
            raise MedPFLError(
                f"'{self.root}' is a file, not a folder; pass a folder with one sub-folder of images per class."
            )
        self.skipped: list[Skipped] = []
        per_class: dict[str, list[Path]] = {}
        stray: list[Path] = []
        for path in visible_files(self.root):
            if not is_image_file(path):
                continue  # README, CSV, thumbnails.db ...: silently ignored
            rel = path.relative_to(self.root)
            if len(rel.parts) == 1:
                stray.append(path)
            else:
                per_class.setdefault(rel.parts[0], []).append(path)
        if not per_class:
            if stray:
                raise MedPFLError(
                    f"'{self.root}' holds images but no class sub-folders; move each class's images into its own "
                    f"sub-folder, e.g. '{self.root / 'normal'}' and '{self.root / 'pneumonia'}'."
                )
            raise MedPFLError(
                f"'{self.root}' holds no PNG, JPEG, BMP or TIFF images in class sub-folders; point to the folder "
                "whose sub-folders (one per class) contain the images."
            )
        for path in stray:
            self.skipped.append(Skipped(str(path), "image lies directly in the root folder, not in a class sub-folder"))
        self.classes, index = class_index(per_class)
        self.items: list[Item] = []
        for class_name in self.classes:
            for path in per_class[class_name]:
                header = self._read_header(path)
                if isinstance(header, str):
                    self.skipped.append(Skipped(str(path), header))
                    continue
                self.items.append(
                    Item(
                        item_id=relative_id(path, self.root),
                        label=index[class_name],
                        class_name=class_name,
                        provenance={"path": str(path), "group": str(path), **header},
                    )
                )

    @staticmethod
    def _read_header(path: Path) -> dict[str, object] | str:
        """Image size and mode from the file header only; a reason string when the file is not an image."""
        try:
            if path.stat().st_size == 0:
                return "empty file (0 bytes)"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL warns about odd TIFF tags; the header is still usable
                with Image.open(path) as im:
                    return {"size": (im.height, im.width), "mode": im.mode, "format": im.format}
        except Exception as exc:  # PIL raises several types for non-images; all mean "not readable"
            return f"not a readable image ({describe_error(exc)})"

    def load(self, item: Item) -> np.ndarray:
        """Decode one image at its original size into float32 [0,1]."""
        path = item.provenance["path"]
        try:
            with Image.open(path) as im:
                im.load()
                return pil_to_unit(im)
        except Exception as exc:
            raise MedPFLError(
                f"Image '{path}' could not be decoded ({describe_error(exc)}); remove or replace the file."
            ) from exc

    def verify(self, progress: Callable[[int, int], None] | None = None) -> list[Skipped]:
        """Decode every file cheaply; drop those that fail from `items` and return them (also in `skipped`)."""
        self.items, new = verify_by_file(self.items, self.skipped, check_decodes, progress)
        return new
