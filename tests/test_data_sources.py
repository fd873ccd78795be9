"""Data sources on real images: class folders, MedMNIST npz, DICOM, NIfTI, dispatch, transforms, inspection."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile
from pydicom.data import get_testdata_file
from skimage import data as skdata

from medpfl.data import (
    DicomSource,
    FolderSource,
    ImageDataset,
    NiftiSource,
    NpzSource,
    format_report,
    inspect_source,
    open_source,
    to_tensor,
)
from medpfl.data.sources.dicom import window_linear
from medpfl.data.sources.folder import check_decodes
from medpfl.errors import MedPFLError

NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def _u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def _windowed_rg1() -> np.ndarray:
    """The chest X-ray of RG1_UNCR.dcm, windowed by hand as its header says and inverted (MONOCHROME1)."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    x = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    return 1.0 - np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of real images in every supported format and mode, plus broken files."""
    root = tmp_path_factory.mktemp("images")
    fundus, xray = root / "fundus", root / "xray"
    fundus.mkdir()
    (xray / "nested").mkdir(parents=True)
    retina = skdata.retina()[::4, ::4]  # 353 x 353 RGB keeps the test fast
    camera = skdata.camera()  # 512 x 512 gray
    Image.fromarray(retina).save(fundus / "retina.png")
    Image.fromarray(retina).save(fundus / "retina.jpg", quality=95)
    rgba = np.dstack([retina, np.full(retina.shape[:2], 77, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(fundus / "retina_rgba.png")
    Image.fromarray(retina).quantize(64).save(fundus / "retina_palette.png")
    Image.fromarray(camera).save(xray / "camera.bmp")
    Image.fromarray(camera).save(xray / "camera.tif")
    Image.fromarray(camera).save(xray / "nested" / "camera_gray.png")
    # 16-bit with a max of 4095 (12-bit detector): must come out dark, not stretched to 1.
    Image.fromarray((camera.astype(np.uint16) * 16 + 15)).save(xray / "camera16.png")
    Image.fromarray((camera.astype(np.uint16) * 16 + 15)).save(xray / "camera16.tif")
    # Broken and irrelevant files.
    jpeg = (fundus / "retina.jpg").read_bytes()
    (fundus / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (xray / "empty.png").write_bytes(b"")
    (xray / "notes.png").write_text("this is a text file, not a PNG\n")
    (xray / "readme.txt").write_text("ignored")
    (root / "labels.csv").write_text("ignored too")
    return root


def test_folder_lists_classes_items_and_skips_broken_files(image_tree: Path) -> None:
    src = FolderSource(image_tree)
    assert src.classes == ["fundus", "xray"]
    ids = {it.item_id: it for it in src.items}
    assert "xray/nested/camera_gray.png" in ids and ids["xray/nested/camera_gray.png"].label == 1
    assert ids["fundus/retina.png"].label == 0 and ids["fundus/retina.png"].class_name == "fundus"
    # The truncated JPEG has a valid header, so listing keeps it; the two non-images are skipped with reasons.
    assert "fundus/truncated.jpg" in ids
    reasons = {Path(s.path).name: s.reason for s in src.skipped}
    assert set(reasons) == {"empty.png", "notes.png"}
    assert "empty" in reasons["empty.png"]
    assert "not a readable image" in reasons["notes.png"]
    assert not any(it.item_id.endswith((".txt", ".csv")) for it in src.items)
    new = src.verify()
    assert [Path(s.path).name for s in new] == ["truncated.jpg"]
    assert "truncated" in new[0].reason
    assert "fundus/truncated.jpg" not in {it.item_id for it in src.items}
    assert len(src.items) == 9


def test_folder_decodes_every_mode_to_unit_float(image_tree: Path) -> None:
    src = FolderSource(image_tree)
    by_id = {it.item_id: it for it in src.items}
    retina = skdata.retina()[::4, ::4].astype(np.float32) / 255
    camera = skdata.camera().astype(np.float32) / 255

    png = src.load(by_id["fundus/retina.png"])
    assert png.dtype == np.float32 and png.shape == retina.shape
    np.testing.assert_allclose(png, retina, atol=1e-6)
    np.testing.assert_allclose(src.load(by_id["fundus/retina_rgba.png"]), retina, atol=1e-6)  # alpha dropped
    pal = src.load(by_id["fundus/retina_palette.png"])
    assert pal.shape == retina.shape and np.abs(pal - retina).mean() < 0.03
    assert np.abs(src.load(by_id["fundus/retina.jpg"]) - retina).mean() < 0.02
    for name in ("xray/camera.bmp", "xray/camera.tif", "xray/nested/camera_gray.png"):
        gray = src.load(by_id[name])
        assert gray.shape == (512, 512)
        np.testing.assert_allclose(gray, camera, atol=1e-6)
    for name in ("xray/camera16.png", "xray/camera16.tif"):
        deep = src.load(by_id[name])
        expected = (skdata.camera().astype(np.float32) * 16 + 15) / 65535
        np.testing.assert_allclose(deep, expected, atol=1e-6)
        assert deep.max() < 0.07  # scaled by the 16-bit range, not stretched per image
    assert by_id["xray/camera16.png"].provenance["mode"].startswith("I;16")


def test_jpeg_draft_check_is_fast_and_fails_on_truncation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xray = _u8(_windowed_rg1())
    full = tmp_path / "chest.jpg"
    Image.fromarray(xray).save(full, quality=90)
    blob = full.read_bytes()
    cut = tmp_path / "chest_cut.jpg"
    cut.write_bytes(blob[: int(len(blob) * 0.8)])
    with Image.open(full) as im:
        im.draft("L", (im.width // 8, im.height // 8))
        assert max(im.size) <= 1955 // 8 + 1  # draft mode really decodes at reduced scale
    calls: list[tuple[str, tuple[int, int]]] = []
    original = JpegImageFile.draft

    def spy(self: JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        calls.append((mode, size))
        return original(self, mode, size)

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    start = time.perf_counter()
    check_decodes(str(full))
    assert time.perf_counter() - start < 1.0
    assert calls == [("L", (1841 // 8, 1955 // 8))]  # the check decodes at 1/8 scale
    with pytest.raises(OSError, match="truncated"):
        check_decodes(str(cut))


def test_inspect_full_size_chest_xray_folder(tmp_path: Path) -> None:
    (tmp_path / "normal").mkdir()
    (tmp_path / "pneumonia").mkdir()
    xray = _u8(_windowed_rg1())
    Image.fromarray(xray).save(tmp_path / "normal" / "rg1.jpg", quality=90)
    Image.fromarray(xray[:1500, :1400]).save(tmp_path / "pneumonia" / "rg1_crop.jpg", quality=90)
    blob = (tmp_path / "normal" / "rg1.jpg").read_bytes()
    (tmp_path / "pneumonia" / "cut.jpg").write_bytes(blob[: len(blob) // 3])
    (tmp_path / "pneumonia" / "empty.jpeg").write_bytes(b"")

    report = inspect_source(str(tmp_path))
    assert report.kind == "folder" and report.verified
    assert report.n_items == 2
    assert report.class_counts == {"normal": 1, "pneumonia": 1}
    assert report.sizes == {"1955x1841": 1, "1500x1400": 1}
    assert report.modes == {"L": 2}
    assert {Path(s.path).name for s in report.skipped} == {"cut.jpg", "empty.jpeg"}
    assert all(s.reason for s in report.skipped)

    quick = inspect_source(str(tmp_path), verify=False)
    assert quick.n_items == 3 and not quick.verified  # header-only listing cannot see the truncation

    with pytest.raises(MedPFLError) as err:
        inspect_source(str(tmp_path), strict=True)
    assert "cut.jpg" in str(err.value) and "empty.jpeg" in str(err.value)

    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(format_report(report))
    text = console.export_text()
    assert "pneumonia" in text and "cut.jpg" in text and "1955x1841" in text

    ds = ImageDataset(open_source(str(tmp_path)), size=64, channels=1)
    x, y = ds.load_batch([0])
    assert x.shape == (1, 1, 64, 64) and y.tolist() == [0]
    # The X-ray survives resizing: its mean brightness is that of the original.
    assert abs(float(x.mean()) - float(xray.mean() / 255)) < 0.03


def test_dataset_names_undecodable_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    Image.fromarray(skdata.camera()).save(tmp_path / "a" / "ok.jpg")
    blob = (tmp_path / "a" / "ok.jpg").read_bytes()
    (tmp_path / "a" / "bad.jpg").write_bytes(blob[:2000])
    src = FolderSource(tmp_path)
    ds = ImageDataset(src, size=16)
    bad = [i for i, it in enumerate(ds.items) if it.item_id.endswith("bad.jpg")][0]
    with pytest.raises(MedPFLError, match=r"bad\.jpg.*remove or replace"):
        ds[bad]


def test_dataset_items_batches_and_cache(image_tree: Path) -> None:
    src = FolderSource(image_tree)
    src.verify()
    ds = ImageDataset(src, items=src.items[:4], size=24, channels=3)
    assert len(ds) == 4 and ds.classes == ["fundus", "xray"]
    x, label = ds[1]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and isinstance(label, int)
    assert ds[1][0] is x  # cached, not decoded again
    xb, yb = ds.load_batch([0, 1, 3])
    assert xb.shape == (3, 3, 24, 24) and yb.dtype == torch.long
    assert yb.tolist() == [ds.items[i].label for i in (0, 1, 3)]
    assert 0.0 <= float(xb.min()) and float(xb.max()) <= 1.0
    with pytest.raises(IndexError):
        ds[4]


# --- DICOM ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dicom")
    (root / "chest").mkdir()
    (root / "ultrasound").mkdir()
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), root / "chest" / "RG1_UNCR.dcm")
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), root / "chest" / "IM000001")  # PACS export: no extension
    shutil.copy(get_testdata_file("MR_small.dcm"), root / "MR_small.dcm")  # in the root: class from Modality
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "CT_small.dcm")
    shutil.copy(get_testdata_file("US1_UNCR.dcm"), root / "ultrasound" / "US1_UNCR.dcm")
    shutil.copy(get_testdata_file("examples_ybr_color.dcm"), root / "ultrasound" / "ybr.dcm")
    (root / "garbage.dcm").write_bytes(b"\x00garbage, not DICOM" * 20)
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (root / "truncated_ct.dcm").write_bytes(ct[:-5000])
    (root / "notes.txt").write_text("not an image")
    return root


def test_dicom_folder_lists_frames_labels_and_skips(dicom_tree: Path) -> None:
    src = DicomSource(dicom_tree)
    assert src.classes == ["CT", "MR", "chest", "ultrasound"]
    assert len(src.items) == 1 + 1 + 2 + 1 + 30
    frames = [it for it in src.items if it.item_id.startswith("ultrasound/ybr.dcm#frame=")]
    assert len(frames) == 30 and frames[7].item_id == "ultrasound/ybr.dcm#frame=7"
    assert {it.provenance["group"] for it in frames} == {str(dicom_tree / "ultrasound" / "ybr.dcm")}
    reasons = {Path(s.path).name: s.reason for s in src.skipped}
    assert set(reasons) == {"garbage.dcm", "truncated_ct.dcm"}
    assert "truncated" in reasons["truncated_ct.dcm"]
    by_id = {it.item_id: it for it in src.items}
    assert by_id["CT_small.dcm"].class_name == "CT" and by_id["chest/IM000001"].class_name == "chest"
    assert by_id["chest/RG1_UNCR.dcm"].provenance["size"] == (1955, 1841)

    frame = src.load(frames[7])
    assert frame.shape == (240, 320, 3) and frame.dtype == np.float32
    expected = pydicom.dcmread(dicom_tree / "ultrasound" / "ybr.dcm").pixel_array[7].astype(np.float32) / 255
    np.testing.assert_allclose(frame, expected, atol=1e-6)  # RGB, not raw YBR
    us = src.load(by_id["ultrasound/US1_UNCR.dcm"])
    assert us.shape == (480, 640, 3) and 0.0 <= us.min() and us.max() <= 1.0
    assert src.verify() == []  # every listed file decodes


def test_dicom_monochrome1_window_and_inversion() -> None:
    path = get_testdata_file("RG1_UNCR.dcm")
    src = open_source(path)
    assert isinstance(src, DicomSource) and src.classes == ["CR"]
    start = time.perf_counter()
    img = src.load(src.items[0])
    assert time.perf_counter() - start < 2.0
    assert img.shape == (1955, 1841) and img.dtype == np.float32
    np.testing.assert_allclose(img, _windowed_rg1(), atol=1e-5)
    # Inversion is visible: MONOCHROME1 raw lows (dense bone, bright) must come out bright.
    raw = pydicom.dcmread(path).pixel_array
    assert img[raw < np.percentile(raw, 5)].mean() > img[raw > np.percentile(raw, 95)].mean()


def test_dicom_without_window_uses_robust_percentiles_after_rescale(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "nowindow.dcm")
    img = open_source(str(tmp_path / "nowindow.dcm")).load(DicomSource(tmp_path / "nowindow.dcm").items[0])
    x = ds.pixel_array.astype(np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5])
    np.testing.assert_allclose(img, 1.0 - np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-5)

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ct.pixel_array.astype(np.float64) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    lo, hi = np.percentile(hu, [0.5, 99.5])
    src = DicomSource(get_testdata_file("CT_small.dcm"))
    np.testing.assert_allclose(src.load(src.items[0]), np.clip((hu - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_window_linear_matches_dicom_standard() -> None:
    x = np.array([0.0, 49.5, 50.0, 99.5, 200.0])
    out = window_linear(x, center=50.0, width=100.0)
    np.testing.assert_allclose(out, np.clip((x - 49.5) / 99 + 0.5, 0, 1), atol=1e-6)
    assert out[0] == 0.0 and out[-1] == 1.0


def test_dicom_palette_and_labels_csv(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("examples_palette.dcm"), tmp_path / "pal.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "unlisted.dcm")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,label\npal.dcm,doppler\nmr.dcm,brain\n")
    src = DicomSource(tmp_path, labels_csv=csv_path)
    assert src.classes == ["brain", "doppler"]
    assert {it.item_id: it.class_name for it in src.items} == {"mr.dcm": "brain", "pal.dcm": "doppler"}
    assert [Path(s.path).name for s in src.skipped] == ["unlisted.dcm"]
    pal = src.load([it for it in src.items if it.item_id == "pal.dcm"][0])
    assert pal.shape == (350, 800, 3) and pal.max() <= 1.0 and pal.std() > 0.05
    bad = tmp_path / "bad.csv"
    bad.write_text("name,class\nmr.dcm,brain\n")
    with pytest.raises(MedPFLError, match="file,label"):
        DicomSource(tmp_path, labels_csv=bad)


# --- NIfTI ---------------------------------------------------------------------------------------------------


def test_nifti_4d_items_per_volume_and_slice() -> None:
    path = os.path.join(NIB_DATA, "example4d.nii.gz")
    src = NiftiSource(path, min_foreground=0.0)
    assert len(src.items) == 2 * 24
    assert src.items[0].item_id == "example4d.nii.gz#t=0,z=0"
    item = [it for it in src.items if it.item_id == "example4d.nii.gz#t=1,z=12"][0]
    img = src.load(item)
    vol = np.asarray(nib.load(path).dataobj[..., 1], dtype=np.float32)
    lo, hi = np.percentile(vol, [0.5, 99.5])
    expected = np.rot90(np.clip((vol[:, :, 12] - lo) / (hi - lo), 0, 1))
    assert img.shape == (96, 128) == item.provenance["size"]
    np.testing.assert_allclose(img, expected, atol=1e-5)
    assert (path, 1) in src._windows  # the volume's window is computed once and kept


def test_nifti_axes_labels_and_empty_slice_filter(tmp_path: Path) -> None:
    anat = nib.load(os.path.join(NIB_DATA, "anatomical.nii"))
    for axis, n in ((0, 33), (1, 41), (2, 25)):
        assert len(NiftiSource(anat.get_filename(), axis=axis, min_foreground=0.0).items) == n
    # A volume padded with 5 blank slices on each side: the filter drops exactly those.
    data = np.asarray(anat.dataobj, dtype=np.float32)
    padded = np.zeros(data.shape[:2] + (data.shape[2] + 10,), np.float32)
    padded[:, :, 5:-5] = data
    (tmp_path / "t1").mkdir()
    nib.save(nib.Nifti1Image(padded, anat.affine), tmp_path / "t1" / "padded.nii.gz")
    nib.save(nib.Nifti1Image(data, anat.affine), tmp_path / "t1" / "plain.nii")
    src = NiftiSource(tmp_path)
    assert src.classes == ["t1"]
    padded_ids = [it.provenance["slice"] for it in src.items if it.item_id.startswith("t1/padded")]
    assert min(padded_ids) >= 5 and max(padded_ids) <= 29 and len(padded_ids) >= 20
    assert len(NiftiSource(tmp_path, min_foreground=0.0).items) == 35 + 25
    assert NiftiSource(tmp_path, label="brain").classes == ["brain"]
    img = src.load(src.items[3])
    assert img.dtype == np.float32 and img.shape == (41, 33) and 0.0 <= img.min() and img.max() <= 1.0
    with pytest.raises(MedPFLError, match="axis"):
        NiftiSource(tmp_path, axis=3)


# --- MedMNIST npz --------------------------------------------------------------------------------------------


def _medmnist(path: Path, rgb: bool = False, names: bool = False) -> dict[str, np.ndarray]:
    """A small MedMNIST-format file made of 28x28 crops of real images."""
    base = skdata.retina()[200:1096:4, 200:1096:4] if rgb else skdata.camera()
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", 12), ("val", 4), ("test", 6)):
        ys, xs = rng.integers(0, base.shape[0] - 28, n), rng.integers(0, base.shape[1] - 28, n)
        arrays[f"{split}_images"] = np.stack([base[y : y + 28, x : x + 28] for y, x in zip(ys, xs)])
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1).astype(np.uint8)
    if names:
        arrays["classes"] = np.array(["adipose", "background", "debris"])
    np.savez(path, **arrays)
    return arrays


def test_npz_splits_labels_and_images(tmp_path: Path) -> None:
    arrays = _medmnist(tmp_path / "pathmnist.npz")
    src = NpzSource(tmp_path / "pathmnist.npz", split="test")
    assert len(src) == 6 and src.classes == ["0", "1", "2"]
    assert [it.label for it in src.items] == [0, 1, 2, 0, 1, 2]
    img = src.load(src.items[4])
    np.testing.assert_allclose(img, arrays["test_images"][4] / 255.0, atol=1e-6)
    assert img.shape == (28, 28) and img.dtype == np.float32
    all_src = NpzSource(tmp_path / "pathmnist.npz", split="all")
    assert len(all_src) == 22 and all_src.items[12].item_id == "val/0"
    np.testing.assert_allclose(all_src.load(all_src.items[12]), arrays["val_images"][0] / 255.0)
    assert all_src.verify() == []

    _medmnist(tmp_path / "rgb.npz", rgb=True, names=True)
    rgb = open_source(str(tmp_path / "rgb.npz"), split="val")
    assert isinstance(rgb, NpzSource) and rgb.classes == ["adipose", "background", "debris"]
    assert rgb.load(rgb.items[0]).shape == (28, 28, 3)
    assert rgb.items[1].class_name == "background"


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "multi.npz", train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.eye(4, dtype=np.uint8))
    with pytest.raises(MedPFLError, match="multi-label"):
        NpzSource(tmp_path / "multi.npz")
    with pytest.raises(MedPFLError, match="val_images"):
        NpzSource(tmp_path / "multi.npz", split="val")
    with pytest.raises(MedPFLError, match="split"):
        NpzSource(tmp_path / "multi.npz", split="holdout")
    (tmp_path / "fake.npz").write_text("not a zip")
    with pytest.raises(MedPFLError, match="fake.npz"):
        NpzSource(tmp_path / "fake.npz")


# --- dispatch ------------------------------------------------------------------------------------------------


def test_open_source_dispatch(image_tree: Path, dicom_tree: Path, tmp_path: Path) -> None:
    assert isinstance(open_source(str(image_tree)), FolderSource)
    assert isinstance(open_source(dicom_tree), DicomSource)
    assert isinstance(open_source(os.path.join(NIB_DATA, "anatomical.nii")), NiftiSource)
    (tmp_path / "vols").mkdir()
    shutil.copy(os.path.join(NIB_DATA, "anatomical.nii"), tmp_path / "vols" / "a.nii")
    assert isinstance(open_source(tmp_path / "vols"), NiftiSource)
    (tmp_path / "pacs" / "series1").mkdir(parents=True)
    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "pacs" / "series1" / "IM0001")
    pacs = open_source(tmp_path / "pacs")
    assert isinstance(pacs, DicomSource) and pacs.classes == ["series1"]


def test_open_source_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(MedPFLError, match=r"nowhere.*does not exist"):
        open_source(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedPFLError, match=r"empty.*is empty"):
        open_source(tmp_path / "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(skdata.camera()).save(flat / "a.png")
    with pytest.raises(MedPFLError, match=r"flat.*no class sub-folders"):
        open_source(flat)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MedPFLError, match=r"notes\.txt.*MedMNIST \.npz"):
        open_source(tmp_path / "notes.txt")
    with pytest.raises(MedPFLError, match="axis"):
        open_source(os.path.join(NIB_DATA, "anatomical.nii"), axis=7)
    with pytest.raises(MedPFLError, match="split.*do not apply"):
        open_source(os.path.join(NIB_DATA, "anatomical.nii"), split="val")
    only_text = tmp_path / "docs"
    (only_text / "sub").mkdir(parents=True)
    (only_text / "sub" / "a.txt").write_text("x")
    with pytest.raises(MedPFLError, match="holds no data"):
        open_source(only_text)


# --- transforms ----------------------------------------------------------------------------------------------


def test_to_tensor_shapes_range_and_channels() -> None:
    retina = skdata.retina()[::4, ::4].astype(np.float32) / 255
    t = to_tensor(retina, 32, 3)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    gray = to_tensor(retina, 32, 1)
    luma = 0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]
    torch.testing.assert_close(gray[0], luma, atol=1e-5, rtol=0)
    # Non-square: the shorter side becomes `size`, the centre is kept.
    wide = np.zeros((100, 300), np.float32)
    wide[:, 100:200] = 1.0
    out = to_tensor(wide, 10, 3)
    assert out.shape == (3, 10, 10)
    # Only the bright centre third survives (the antialiasing kernel blurs in a little at the crop edges).
    assert float(out[:, :, 1:-1].min()) > 0.99 and float(out.min()) > 0.8
    assert torch.equal(out[0], out[2])  # gray repeated
    # Upsampling a tiny image, and values outside [0,1] are clamped.
    small = to_tensor(np.array([[-1.0, 2.0], [0.5, 0.5]], np.float32), 8, 1)
    assert small.shape == (1, 8, 8) and float(small.min()) >= 0.0 and float(small.max()) <= 1.0
    # Antialiasing: a fine checkerboard downsampled averages to gray instead of aliasing.
    checker = (np.indices((256, 256)).sum(0) % 2).astype(np.float32)
    assert abs(float(to_tensor(checker, 16, 1).std())) < 0.02
    with pytest.raises(MedPFLError):
        to_tensor(retina, 32, 2)
