"""MedMNIST-format .npz files: `{train,val,test}_images` (N x H x W [x 3] uint8) and `*_labels` (N or N x 1)."""

from __future__ import annotations

import os
import zipfile
from typing import Any, Callable

import numpy as np

from medpfl.data.base import ImageSource, Item, Skipped
from medpfl.data.sources._common import describe_error, existing_path
from medpfl.errors import MedPFLError

SPLITS = ("train", "val", "test")


def _npy_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an .npz, read from its .npy header without loading the data."""
    with archive.open(f"{key}.npy") as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    return tuple(shape), np.dtype(dtype)


def _to_unit(image: np.ndarray) -> np.ndarray:
    """One stored image to float32 [0,1]: integers by their type's range, floats clipped."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]  # drop alpha
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    if image.dtype == np.bool_:
        return image.astype(np.float32)
    return np.clip(image.astype(np.float32), 0.0, 1.0)


class NpzSource(ImageSource):
    """One split (or all) of a MedMNIST-style .npz; images are read once per split on first use, not copied per item."""

    name = "npz"

    def __init__(self, path: str | os.PathLike[str], split: str = "train") -> None:
        self.path = existing_path(path, "MedMNIST .npz")
        if split not in (*SPLITS, "all"):
            raise MedPFLError(f"Unknown split '{split}' for '{self.path}'; use one of train, val, test or all.")
        self.split = split
        self.skipped: list[Skipped] = []
        self._images: dict[str, np.ndarray] = {}
        try:
            with zipfile.ZipFile(self.path) as archive:
                keys = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
                headers = {k: _npy_header(archive, k) for k in keys if k.endswith("_images")}
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise MedPFLError(
                f"'{self.path}' is not a readable .npz archive ({describe_error(exc)}); re-download or re-save it."
            ) from exc
        present = [s for s in SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]
        wanted = present if split == "all" else [split]
        if not present or any(s not in present for s in wanted):
            raise MedPFLError(
                f"'{self.path}' has no '{split}_images'/'{split}_labels' arrays (it holds: {', '.join(sorted(keys))}); "
                "pass a MedMNIST-format file or another split."
            )
        # Labels are small: read all splits' labels so class numbering is the same whichever split is chosen.
        with np.load(self.path, allow_pickle=False) as data:
            labels = {s: self._labels(data[f"{s}_labels"], s) for s in present}
            names = next((data[k] for k in ("classes", "label_names") if k in keys), None)
        n_classes = max(int(l.max(initial=-1)) for l in labels.values()) + 1
        if names is not None:
            self.classes = [str(c) for c in np.asarray(names).ravel()]
            if len(self.classes) < n_classes:
                raise MedPFLError(
                    f"'{self.path}' names {len(self.classes)} classes but its labels go up to {n_classes - 1}; "
                    "fix its 'classes' array."
                )
        else:
            self.classes = [str(i) for i in range(n_classes)]
        self.items: list[Item] = []
        for s in wanted:
            shape, dtype = headers[f"{s}_images"]
            if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
                raise MedPFLError(
                    f"'{self.path}' array '{s}_images' has shape {shape}; expected N x H x W or N x H x W x 3."
                )
            if shape[0] != len(labels[s]):
                raise MedPFLError(
                    f"'{self.path}' has {shape[0]} {s} images but {len(labels[s])} labels; fix the file."
                )
            for i, label in enumerate(labels[s].tolist()):
                item_id = f"{s}/{i}"
                self.items.append(
                    Item(
                        item_id=item_id,
                        label=label,
                        class_name=self.classes[label],
                        provenance={
                            "path": str(self.path),
                            "split": s,
                            "index": i,
                            "group": item_id,
                            "size": (shape[1], shape[2]),
                            "mode": f"{dtype.name} x{shape[3] if len(shape) == 4 else 1}",
                        },
                    )
                )

    def _labels(self, raw: np.ndarray, split: str) -> np.ndarray:
        """Integer class per image; MedMNIST stores N x 1, multi-label (N x K) sets are refused."""
        arr = np.asarray(raw)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise MedPFLError(
                f"'{self.path}' has multi-label '{split}_labels' of shape {arr.shape}; only one class per image is "
                "supported, so convert it to single labels first."
            )
        if arr.size and (arr.min() < 0 or not np.all(np.equal(np.mod(arr, 1), 0))):
            raise MedPFLError(f"'{self.path}' '{split}_labels' must be non-negative integers; fix the file.")
        return arr.astype(np.int64)

    def _split_images(self, split: str) -> np.ndarray:
        """The whole image array of one split, read from the archive once and kept (npz cannot be memory-mapped)."""
        if split not in self._images:
            with np.load(self.path, allow_pickle=False) as data:
                self._images[split] = data[f"{split}_images"]
        return self._images[split]

    def load(self, item: Item) -> np.ndarray:
        """Decode one image (a view into the cached split array, converted to float)."""
        prov: dict[str, Any] = item.provenance
        try:
            return _to_unit(self._split_images(prov["split"])[prov["index"]])
        except Exception as exc:
            raise MedPFLError(
                f"'{self.path}' array '{prov['split']}_images' could not be read ({describe_error(exc)}); "
                "re-download or replace the file."
            ) from exc

    def verify(self, progress: Callable[[int, int], None] | None = None) -> list[Skipped]:
        """Read each used split once (the zip CRC catches corruption); drop the items of splits that fail."""
        splits = list(dict.fromkeys(it.provenance["split"] for it in self.items))
        failed: dict[str, str] = {}
        for i, s in enumerate(splits):
            try:
                self._split_images(s)
            except Exception as exc:
                failed[s] = describe_error(exc)
            if progress is not None:
                progress(i + 1, len(splits))
        new = [Skipped(f"{self.path}#{s}_images", reason) for s, reason in failed.items()]
        self.skipped.extend(new)
        self.items = [it for it in self.items if it.provenance["split"] not in failed]
        return new
