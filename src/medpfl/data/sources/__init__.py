"""Image sources and `open_source`, which picks the right one from a path."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from medpfl.data.base import ImageSource
from medpfl.data.sources._common import existing_path, visible_files
from medpfl.data.sources.dicom import DICOM_EXTENSIONS, DicomSource, has_dicm_preamble
from medpfl.data.sources.folder import FolderSource, is_image_file
from medpfl.data.sources.nifti import NiftiSource, is_nifti_file
from medpfl.data.sources.npz import NpzSource
from medpfl.errors import MedPFLError

__all__ = ["DicomSource", "FolderSource", "NiftiSource", "NpzSource", "open_source", "detect_kind"]

SUPPORTED = (
    "a folder with one sub-folder of PNG/JPEG/BMP/TIFF images per class, a MedMNIST .npz file, "
    "a DICOM file or folder, or a NIfTI (.nii/.nii.gz) file or folder"
)

# How many extension-less files to sniff for the DICM marker before giving up (keeps detection fast on big trees).
_MAX_SNIFF = 64


def detect_kind(path: str | os.PathLike[str]) -> str:
    """Which source reads `path`: 'folder', 'npz', 'dicom' or 'nifti'; MedPFLError if none does."""
    p = existing_path(path, "Data")
    if p.is_file():
        name = p.name.lower()
        if name.endswith(".npz"):
            return "npz"
        if is_nifti_file(p):
            return "nifti"
        if p.suffix.lower() in DICOM_EXTENSIONS or has_dicm_preamble(p):
            return "dicom"
        raise MedPFLError(f"'{p}' is not a supported data file; pass {SUPPORTED}.")
    files = visible_files(p)
    if not files:
        raise MedPFLError(f"Folder '{p}' is empty; put images in it or pass {SUPPORTED}.")
    if any(is_image_file(f) and len(f.relative_to(p).parts) > 1 for f in files):
        return "folder"
    if any(f.suffix.lower() in DICOM_EXTENSIONS for f in files):
        return "dicom"
    if any(is_nifti_file(f) for f in files):
        return "nifti"
    unknown = [f for f in files if not f.suffix][:_MAX_SNIFF]
    if any(has_dicm_preamble(f) for f in unknown):
        return "dicom"
    if any(is_image_file(f) for f in files):
        return "folder"  # images but no class sub-folders: FolderSource explains how to arrange them
    raise MedPFLError(f"Folder '{p}' holds no data MedPFL can read; pass {SUPPORTED}.")


def open_source(spec: str | os.PathLike[str] | None, **options: Any) -> ImageSource:
    """Open a data source from a path (None: the embedded real-image sample); options go to the source's constructor."""
    if spec is None or str(spec) == "":
        from medpfl.data.embedded import embedded_source  # lazy: builds the sample only when asked for

        return embedded_source(**options)
    kind = detect_kind(spec)
    cls: type[ImageSource] = {"folder": FolderSource, "npz": NpzSource, "dicom": DicomSource, "nifti": NiftiSource}[kind]
    allowed = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "path", "root")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise MedPFLError(
            f"Option(s) {', '.join(unknown)} do not apply to {kind} data '{spec}'; "
            f"valid options are: {', '.join(allowed) or 'none'}."
        )
    return cls(Path(spec), **options)
