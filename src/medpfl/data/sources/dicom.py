"""DICOM files (CR, CT, MR, US, ...): one item per frame, labelled by folder, CSV or Modality."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

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

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom", ".dic"})


def has_dicm_preamble(path: Path) -> bool:
    """True if the file carries the 'DICM' marker at byte 128 (DICOM Part 10), whatever its extension."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_candidate(path: Path) -> bool:
    """A file DicomSource tries: a DICOM extension, or any name with the DICM preamble (PACS exports often have none)."""
    return path.suffix.lower() in DICOM_EXTENSIONS or has_dicm_preamble(path)


def read_header(path: str | Path) -> tuple[Dataset, int]:
    """The data set up to the pixel data, and how many bytes follow it in the file (for a cheap truncation check)."""
    with open(path, "rb") as fp:
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
        except InvalidDicomError:
            # Old ACR-NEMA style files lack the preamble; force-reading garbage yields no Rows and is rejected later.
            fp.seek(0)
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        remaining = os.fstat(fp.fileno()).st_size - fp.tell()
    return ds, remaining


def first_value(value: Any) -> float | None:
    """First number of a possibly multi-valued DICOM element (WindowCenter may hold several presets)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2.1) mapped to [0,1] float32."""
    values = values.astype(np.float32)
    if width <= 1.0:
        return (values > center - 0.5).astype(np.float32)
    out = (values - np.float32(center - 0.5)) / np.float32(width - 1.0) + np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def dicom_to_unit(raw: np.ndarray, header: Dataset) -> np.ndarray:
    """One decoded frame to float32 [0,1]: palette/RGB by bit depth; grayscale by rescale, window, MONOCHROME1 flip."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, header)
        return rgb.astype(np.float32) / np.float32(np.iinfo(rgb.dtype).max)
    if raw.ndim == 3:
        # pydicom >= 3 already converts YBR_* to RGB in pixel_array (as_rgb=True).
        bits = int(header.get("BitsStored", 8 * raw.dtype.itemsize))
        return np.clip(raw.astype(np.float32) / np.float32(2**bits - 1), 0.0, 1.0)
    values = apply_modality_lut(raw, header) if "RescaleSlope" in header or "ModalityLUTSequence" in header else raw
    center = first_value(header.get("WindowCenter"))
    width = first_value(header.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        out = window_linear(values, center, width)
    else:
        out = scale_to_unit(values, *robust_window(np.asarray(values)))
    if photometric == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1 stores bright as low values (e.g. CR X-rays)
    return out.astype(np.float32, copy=False)


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    """Bytes of uncompressed pixel data the header promises, or None if compressed (no cheap check possible)."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or tsyntax.is_compressed:
        return None
    bits = int(ds.get("BitsAllocated", 8))
    n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * max(1, int(ds.get("NumberOfFrames", 1) or 1))
    return (n * bits + 7) // 8


def check_dicom_decodes(path: str) -> None:
    """Decode every frame of a file without keeping them, so truncated or undecodable files raise."""
    from pydicom.pixels import iter_pixels

    for _ in iter_pixels(path):
        pass


class DicomSource(ImageSource):
    """A .dcm file or a folder of them (recursive); each frame of a multi-frame file is one item."""

    name = "dicom"

    def __init__(self, path: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None) -> None:
        target = existing_path(path, "DICOM")
        self.root = target if target.is_dir() else target.parent
        files = [target] if target.is_file() else [p for p in visible_files(target) if is_dicom_candidate(p)]
        if not files:
            raise MedPFLError(
                f"'{target}' holds no DICOM files (.dcm or files with the DICM preamble); point to a DICOM file or folder."
            )
        mapping = self._read_labels_csv(labels_csv) if labels_csv is not None else None
        self.skipped: list[Skipped] = []
        listed: list[tuple[Path, str, dict[str, Any], int]] = []
        for file in files:
            rel = relative_id(file, self.root)
            try:
                ds, remaining = read_header(file)
            except Exception as exc:  # pydicom raises many types on garbage; all mean "unusable"
                self.skipped.append(Skipped(str(file), f"not a readable DICOM file ({describe_error(exc)})"))
                continue
            reason = self._unusable(ds, remaining)
            if reason:
                self.skipped.append(Skipped(str(file), reason))
                continue
            if mapping is not None:
                if rel not in mapping:
                    self.skipped.append(Skipped(str(file), f"not listed in labels CSV '{labels_csv}'"))
                    continue
                class_name = mapping[rel]
            elif file.parent != self.root:
                class_name = file.parent.name
            else:
                class_name = str(ds.get("Modality", "") or "unknown")
            n_frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
            info = {
                "path": str(file),
                "group": str(file),  # frames of one file are near-duplicates: keep them on one side of a split
                "size": (int(ds.Rows), int(ds.Columns)),
                "mode": f"{ds.get('PhotometricInterpretation', '?')} {ds.get('BitsStored', '?')}-bit",
                "modality": str(ds.get("Modality", "")),
                "patient_id": str(ds.get("PatientID", "")),
                "frames": n_frames,
            }
            listed.append((file, class_name, info, n_frames))
        self.classes, index = class_index(c for _, c, _, _ in listed)
        self.items: list[Item] = []
        for file, class_name, info, n_frames in listed:
            rel = relative_id(file, self.root)
            for frame in range(n_frames):
                multi = n_frames > 1
                self.items.append(
                    Item(
                        item_id=f"{rel}#frame={frame}" if multi else rel,
                        label=index[class_name],
                        class_name=class_name,
                        provenance={**info, "frame": frame if multi else None},
                    )
                )

    def _read_labels_csv(self, labels_csv: str | os.PathLike[str]) -> dict[str, str]:
        """file -> class name from a CSV with columns `file,label` (file relative to the DICOM root)."""
        csv_path = existing_path(labels_csv, "Labels CSV")
        with open(csv_path, newline="", encoding="utf-8-sig") as fp:
            reader = csv.DictReader(fp)
            if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
                raise MedPFLError(
                    f"Labels CSV '{csv_path}' must have the columns 'file,label' (it has {reader.fieldnames}); "
                    "rename its header row."
                )
            return {Path(row["file"].strip()).as_posix(): str(row["label"]).strip() for row in reader}

    @staticmethod
    def _unusable(ds: Dataset, remaining: int) -> str | None:
        """Why a header cannot give an image (no pixel data, truncated), or None if it looks fine."""
        if "Rows" not in ds or "Columns" not in ds:
            sop = ds.get("SOPClassUID")
            kind = f" ({sop.name})" if sop is not None and hasattr(sop, "name") else ""
            return f"no image pixel data{kind}"
        if remaining <= 0:
            return "no pixel data element in the file"
        expected = _expected_pixel_bytes(ds)
        if expected is not None and remaining < expected:
            return f"truncated: {remaining} bytes left for {expected} bytes of pixel data"
        return None

    def load(self, item: Item) -> np.ndarray:
        """Decode one frame into float32 [0,1] (rescaled, windowed, MONOCHROME1 inverted, colour to RGB)."""
        from pydicom.pixels import pixel_array

        path = item.provenance["path"]
        frame = item.provenance.get("frame")
        try:
            header, _ = read_header(path)
            raw = pixel_array(path, index=frame) if frame is not None else pixel_array(path)
            if frame is None and int(header.get("NumberOfFrames", 1) or 1) > 1:
                raw = raw[0]
            return dicom_to_unit(raw, header)
        except Exception as exc:
            where = f"'{path}' frame {frame}" if frame is not None else f"'{path}'"
            raise MedPFLError(
                f"DICOM file {where} could not be decoded ({describe_error(exc)}); remove or replace the file "
                "(compressed transfer syntaxes may need pylibjpeg or GDCM installed)."
            ) from exc

    def verify(self, progress: Callable[[int, int], None] | None = None) -> list[Skipped]:
        """Decode every file's frames once; drop the items of files that fail and return them (also in `skipped`)."""
        self.items, new = verify_by_file(self.items, self.skipped, check_dicom_decodes, progress)
        return new
