"""NIfTI volumes (.nii, .nii.gz): 2-D slices along one axis, one item per slice (and per volume of a 4-D file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from medpfl.data.base import ImageSource, Item, Skipped
from medpfl.data.sources._common import (
    class_index,
    describe_error,
    existing_path,
    relative_id,
    robust_window,
    scale_to_unit,
    verify_by_file,
    visible_files,
)
from medpfl.errors import MedPFLError

AXIS_NAMES = ("x", "y", "z")


def is_nifti_file(path: Path) -> bool:
    """True for .nii and .nii.gz files."""
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton dimensions beyond the third (many tools write X x Y x Z x 1)."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_decodes(path: str) -> None:
    """Read the whole volume once so truncated or corrupt files raise."""
    np.asarray(nib.load(path).dataobj)


class NiftiSource(ImageSource):
    """Slices of NIfTI volumes; each 3-D volume is normalised once by its (0.5, 99.5) percentiles.

    With `min_foreground > 0`, listing reads each volume once to drop near-empty slices (share of pixels above
    the volume's low percentile below `min_foreground`); with 0, listing reads headers only.
    """

    name = "nifti"

    def __init__(
        self,
        path: str | os.PathLike[str],
        axis: int = 2,
        label: str | None = None,
        min_foreground: float = 0.05,
    ) -> None:
        target = existing_path(path, "NIfTI")
        if axis not in (0, 1, 2):
            raise MedPFLError(f"NIfTI slice axis {axis} is invalid; use 0 (sagittal), 1 (coronal) or 2 (axial).")
        if not 0.0 <= min_foreground < 1.0:
            raise MedPFLError(f"min_foreground={min_foreground} is invalid; use a fraction in [0, 1).")
        self.root = target if target.is_dir() else target.parent
        self.axis = axis
        self.min_foreground = min_foreground
        files = [target] if target.is_file() else [p for p in visible_files(target) if is_nifti_file(p)]
        if not files:
            raise MedPFLError(f"'{target}' holds no .nii or .nii.gz files; point to a NIfTI file or a folder of them.")
        self.skipped: list[Skipped] = []
        self._windows: dict[tuple[str, int], tuple[float, float]] = {}
        listed: list[tuple[Path, str, list[tuple[int | None, int]], dict[str, object]]] = []
        for file in files:
            try:
                img = nib.load(file)
                shape = _spatial_shape(img.shape)
                if len(shape) not in (3, 4):
                    raise ValueError(f"shape {tuple(img.shape)} is not a 3-D or 4-D volume")
                n_t = shape[3] if len(shape) == 4 else 1
                keep = [
                    (t if len(shape) == 4 else None, z)
                    for t in range(n_t)
                    for z in self._kept_slices(img, str(file), t, shape)
                ]
            except Exception as exc:  # nibabel raises several types on bad files
                self.skipped.append(Skipped(str(file), f"not a readable NIfTI volume ({describe_error(exc)})"))
                continue
            plane = [s for i, s in enumerate(shape[:3]) if i != axis]
            info = {
                "path": str(file),
                "group": str(file),  # neighbouring slices are near-duplicates: keep a volume on one side of a split
                "size": (plane[1], plane[0]),  # after rot90, see load()
                "mode": str(img.get_data_dtype()),
                "axis": axis,
            }
            listed.append((file, label if label is not None else file.parent.name, keep, info))
        self.classes, index = class_index(c for _, c, _, _ in listed)
        self.items: list[Item] = []
        letter = AXIS_NAMES[axis]
        for file, class_name, keep, info in listed:
            rel = relative_id(file, self.root)
            for t, z in keep:
                suffix = f"{letter}={z}" if t is None else f"t={t},{letter}={z}"
                self.items.append(
                    Item(
                        item_id=f"{rel}#{suffix}",
                        label=index[class_name],
                        class_name=class_name,
                        provenance={**info, "t": t, "slice": z},
                    )
                )

    def _volume(self, img: nib.Nifti1Image, t: int, shape: tuple[int, ...]) -> np.ndarray:
        """One 3-D volume as float32 (the t-th of a 4-D file)."""
        data = img.dataobj[..., t] if len(shape) == 4 else img.dataobj
        vol = np.asarray(data, dtype=np.float32).reshape(shape[:3])
        return np.nan_to_num(vol, copy=False)

    def _kept_slices(self, img: nib.Nifti1Image, path: str, t: int, shape: tuple[int, ...]) -> list[int]:
        """Slice indices along the axis; reads the volume (and caches its window) only to drop empty slices."""
        n = shape[self.axis]
        if self.min_foreground <= 0:
            return list(range(n))
        vol = self._volume(img, t, shape)
        lo, hi = self._window(path, t, vol)
        other = tuple(i for i in range(3) if i != self.axis)
        foreground = (vol > lo).mean(axis=other)
        return [z for z in range(n) if foreground[z] >= self.min_foreground]

    def _window(self, path: str, t: int, vol: np.ndarray | None = None) -> tuple[float, float]:
        """The volume's robust (0.5, 99.5) percentile window, computed once and cached."""
        key = (path, t)
        if key not in self._windows:
            if vol is None:
                img = nib.load(path)
                vol = self._volume(img, t, _spatial_shape(img.shape))
            self._windows[key] = robust_window(vol)
        return self._windows[key]

    def load(self, item: Item) -> np.ndarray:
        """Decode one slice via nibabel's array proxy (reads only that slice where the format allows)."""
        prov = item.provenance
        path, t, z = prov["path"], prov["t"], prov["slice"]
        try:
            img = nib.load(path)
            index: list[object] = [slice(None)] * len(img.shape)
            index[self.axis] = z
            if t is not None:
                index[3] = t
            for extra in range(4 if t is not None else 3, len(img.shape)):
                index[extra] = 0  # trailing singleton dims
            plane = np.nan_to_num(np.asarray(img.dataobj[tuple(index)], dtype=np.float32))
            lo, hi = self._window(path, t or 0)
        except Exception as exc:
            raise MedPFLError(
                f"NIfTI file '{path}' could not be read ({describe_error(exc)}); remove or replace the file."
            ) from exc
        # rot90 puts the first in-plane axis horizontal and the second pointing up, the usual radiological view.
        return np.ascontiguousarray(np.rot90(scale_to_unit(plane.reshape(prov["size"][::-1]), lo, hi)))

    def verify(self, progress: Callable[[int, int], None] | None = None) -> list[Skipped]:
        """Read every volume once; drop the items of files that fail and return them (also in `skipped`)."""
        self.items, new = verify_by_file(self.items, self.skipped, _check_decodes, progress)
        return new
