"""Medical image data: sources (class folders, MedMNIST .npz, DICOM, NIfTI), datasets, sampling and inspection."""

from medpfl.data.base import ImageSource, Item, Skipped
from medpfl.data.dataset import ImageDataset
from medpfl.data.inspect import InspectReport, format_report, inspect_source, open_verified, verify_source
from medpfl.data.sources import DicomSource, FolderSource, NiftiSource, NpzSource, open_source
from medpfl.data.split import sample_items, train_test_split
from medpfl.data.transforms import to_tensor

__all__ = [
    "DicomSource",
    "FolderSource",
    "ImageDataset",
    "ImageSource",
    "InspectReport",
    "Item",
    "NiftiSource",
    "NpzSource",
    "Skipped",
    "format_report",
    "inspect_source",
    "open_source",
    "open_verified",
    "sample_items",
    "to_tensor",
    "train_test_split",
    "verify_source",
]
