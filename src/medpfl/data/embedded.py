"""The embedded default dataset: a small MedNIST-style modality set cut from real images shipped in pip packages.

Built deterministically on first use (a few seconds) into the cache, then reused. Every image carries its
provenance (package, version, file, frame/slice, crop box, licence) and a `group` so that crops of one image or
runs of neighbouring slices stay on one side of a train/test split.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from medpfl.data.base import ImageSource, Item
from medpfl.errors import MedPFLError

BUILDER_VERSION = "1.0"  # bump whenever the recipe changes: cached builds with another version are rebuilt
PREFIX = "embedded-v1"
SEED = 20240611
SIZE = 64
CLASSES = ("CT", "MR", "XRay", "Ultrasound", "Fundus", "Histology")
SPLITS = ("all", "train", "test")
CSV_FIELDS = (
    "item_id", "index", "class", "label", "package", "version", "file", "origin", "frame",
    "region", "crop_box", "licence", "group", "split",
)

_LIC_PYDICOM = "MIT (pydicom test data)"
_LIC_PYDICOM_DATA = "MIT (pydicom-data)"
_LIC_GDCM = "BSD-3-Clause (GDCM test data, shipped in pydicom-data)"
_LIC_NIBABEL = "MIT (nibabel test data)"
_LIC_SKIMAGE_CC0 = "CC0-1.0 (scikit-image data)"
_LIC_SKIMAGE_FREE = "no known copyright restrictions (scikit-image data)"


@dataclass(frozen=True)
class _View:
    """One 2-D picture of a source (a frame, slice or the whole image), already windowed to uint8."""

    pixels: np.ndarray  # H x W or H x W x 3, uint8
    frame: str  # "" for single images, else e.g. "frame=3" or "z=12,t=0"
    group_suffix: str  # neighbourhood within the file, e.g. "#frames0-4"; "" when the file is one group


@dataclass(frozen=True)
class _Spec:
    """How to cut one source file into labelled crops."""

    cls: str
    package: str  # distribution whose version is recorded
    file: str
    origin: str
    licence: str
    views: Callable[[], list[_View]]
    crops: int  # per view and region
    scales: tuple[float, ...]  # crop side as a fraction of the region's shorter side
    roi: tuple[int, int, int, int] | None = None  # y0, y1, x0, x1: keeps burned-in text and UI out
    grid: tuple[int, int] = (1, 1)  # disjoint regions, each its own group, so big images can feed both splits
    test_groups: tuple[str, ...] = ()
    min_std: float = 14.0  # content check: grey-level spread a crop needs to count as more than background


# ---------------------------------------------------------------- locating and reading the shipped files


def _pydicom_file(name: str) -> Path:
    # Resolved by hand: pydicom.data.get_testdata_file would try the network for a missing file.
    import pydicom.data

    return _existing(Path(pydicom.data.__file__).parent / "test_files" / name, "pydicom")


def _pydicom_data_file(name: str) -> Path:
    try:
        import data_store
    except ImportError as exc:
        raise MedPFLError(
            f"The embedded dataset needs {name} from the pydicom-data package; run `pip install pydicom-data`."
        ) from exc
    return _existing(Path(data_store.__file__).parent / "data" / name, "pydicom-data")


def _nibabel_file(name: str) -> Path:
    # Located by hand: nibabel.testing (its `data_path`) imports pytest, which users need not have.
    from importlib.resources import files

    return _existing(Path(str(files("nibabel"))) / "tests" / "data" / name, "nibabel")


def _skimage_file(name: str) -> Path:
    import skimage.data

    return _existing(Path(skimage.data.__file__).parent / name, "scikit-image")


def _existing(path: Path, package: str) -> Path:
    if not path.is_file():
        raise MedPFLError(
            f"The embedded dataset needs {path.name}, which is missing from {path.parent}; "
            f"reinstall {package} with `pip install --force-reinstall {package}`."
        )
    return path


def _window(values: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Robust percentile window to uint8, ignoring the volume's minimum (padding or air outside the body)."""
    values = values.astype(np.float64)
    inside = values[values > values.min()]
    ref = inside if inside.size > values.size // 20 else values.ravel()
    lo, hi = np.percentile(ref, [lo_pct, hi_pct])
    scaled = np.clip((values - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def _dicom_gray(path: Path) -> np.ndarray:
    """Frames of a grayscale DICOM, rescaled (slope/intercept), windowed, MONOCHROME1 inverted.

    CT uses the file's own VOI window, else soft tissue (W400 L40): a percentile window spanning air to bone
    leaves brain and organs flat grey. Other modalities use the robust percentile window.
    """
    import pydicom
    from pydicom.multival import MultiValue
    from pydicom.pixels import apply_rescale

    ds = pydicom.dcmread(path)
    values = apply_rescale(ds.pixel_array, ds)
    if ds.get("Modality") == "CT":
        center, width = ds.get("WindowCenter", 40), ds.get("WindowWidth", 400)
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = float(width[0] if isinstance(width, MultiValue) else width)
        scaled = np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
        out = np.round(scaled * 255.0).astype(np.uint8)
    else:
        out = _window(values)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 255 - out
    return out


def _dicom_rgb(path: Path) -> np.ndarray:
    """Frames of a colour DICOM as RGB uint8 (YBR is converted, palettes are applied)."""
    import pydicom
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        if pixels.dtype != np.uint8:  # 16-bit palette entries
            pixels = (pixels >> 8).astype(np.uint8)
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def _single(pixels: np.ndarray) -> list[_View]:
    return [_View(pixels, "", "")]


def _frames(volume: np.ndarray, run: int, prefix: str = "frame") -> list[_View]:
    """Split a stack into views, grouping runs of `run` neighbouring frames."""
    n = volume.shape[0]
    views = []
    for i in range(n):
        start = (i // run) * run
        views.append(_View(volume[i], f"{prefix}={i}", f"#{prefix}s{start}-{min(start + run, n) - 1}"))
    return views


def _nifti_slices(name: str, z_range: range, run: int) -> list[_View]:
    """Axial slices of a (4-D) NIfTI, both time points of a slice in one group, rotated to display upright."""
    import nibabel as nib

    data = np.asarray(nib.load(_nibabel_file(name)).dataobj)
    if data.ndim == 3:
        data = data[..., None]
    data = _window(data)
    views = []
    for z in z_range:
        start = z_range.start + ((z - z_range.start) // run) * run
        end = min(start + run, z_range.stop) - 1
        for t in range(data.shape[3]):
            views.append(_View(np.ascontiguousarray(np.rot90(data[:, :, z, t])), f"z={z},t={t}", f"#z{start}-{end}"))
    return views


def _skimage_rgb(name: str) -> np.ndarray:
    with Image.open(_skimage_file(name)) as im:
        return np.asarray(im.convert("RGB"))


def _skimage_gray(name: str) -> np.ndarray:
    with Image.open(_skimage_file(name)) as im:
        return np.asarray(im.convert("L"))


# ---------------------------------------------------------------- the recipe

_SPECS: tuple[_Spec, ...] = (
    # CT: a thorax, an abdomen, a head; the thorax (another scanner and patient) is the test group.
    _Spec("CT", "pydicom-data", "693_UNCR.dcm", "pydicom issue #693 regression CT, head", _LIC_PYDICOM_DATA,
          lambda: _single(_dicom_gray(_pydicom_data_file("693_UNCR.dcm"))), 48, (0.25, 0.4, 0.6, 0.85),
          roi=(40, 472, 40, 472)),
    _Spec("CT", "pydicom-data", "explicit_VR-UN.dcm", "TCIA de-identified pancreas CT (via pydicom-data)",
          _LIC_PYDICOM_DATA, lambda: _single(_dicom_gray(_pydicom_data_file("explicit_VR-UN.dcm"))), 46,
          (0.25, 0.4, 0.6, 0.85), roi=(150, 512, 0, 512)),
    _Spec("CT", "pydicom", "CT_small.dcm", "NEMA WG04 CT1, downsized to 128x128", _LIC_PYDICOM,
          lambda: _single(_dicom_gray(_pydicom_file("CT_small.dcm"))), 26, (0.45, 0.6, 0.8, 1.0),
          test_groups=("CT_small.dcm",)),
    # MR: shoulder, head slices, EPI brain volume, a small head image.
    _Spec("MR", "pydicom-data", "MR2_UNCR.dcm", "NEMA WG04 MR2, shoulder", _LIC_PYDICOM_DATA,
          lambda: _single(_dicom_gray(_pydicom_data_file("MR2_UNCR.dcm"))), 40, (0.2, 0.3, 0.45, 0.65),
          roi=(100, 924, 0, 1024)),
    _Spec("MR", "pydicom-data", "emri_small.dcm", "MR head, 10 T1 frames (pydicom-data)", _LIC_PYDICOM_DATA,
          lambda: _frames(_dicom_gray(_pydicom_data_file("emri_small.dcm")), 5), 4, (0.6, 0.75, 0.9, 1.0),
          test_groups=("emri_small.dcm#frames5-9",)),
    _Spec("MR", "nibabel", "example4d.nii.gz", "nibabel example 4-D EPI brain", _LIC_NIBABEL,
          lambda: _nifti_slices("example4d.nii.gz", range(4, 20), 8), 1, (0.7, 0.85, 1.0)),
    _Spec("MR", "pydicom", "MR_small.dcm", "NEMA WG04 MR1, downsized to 64x64", _LIC_PYDICOM,
          lambda: _single(_dicom_gray(_pydicom_file("MR_small.dcm"))), 14, (0.6, 0.75, 0.9, 1.0),
          test_groups=("MR_small.dcm",)),
    # X-ray: only two radiographs ship, so each is cut into disjoint regions; one region of each is test.
    _Spec("XRay", "pydicom-data", "RG1_UNCR.dcm", "NEMA WG04 RG1, adult chest CR", _LIC_PYDICOM_DATA,
          lambda: _single(_dicom_gray(_pydicom_data_file("RG1_UNCR.dcm"))), 20, (0.25, 0.4, 0.6, 0.85),
          roi=(60, 1895, 60, 1781), grid=(2, 2), test_groups=("RG1_UNCR.dcm#region=r1c1",)),
    _Spec("XRay", "pydicom-data", "RG3_UNCR.dcm", "NEMA WG04 RG3, extremity CR", _LIC_PYDICOM_DATA,
          lambda: _single(_dicom_gray(_pydicom_data_file("RG3_UNCR.dcm"))), 20, (0.3, 0.45, 0.65, 0.9),
          roi=(40, 1720, 400, 1360), grid=(2, 1), test_groups=("RG3_UNCR.dcm#region=r1c0",)),
    # Ultrasound: a cardiac cine clip, a Doppler lymph node, a two-pane pelvis (test).
    _Spec("Ultrasound", "pydicom", "examples_ybr_color.dcm", "cardiac cine, color3d_jpeg_baseline.dcm reduced",
          _LIC_PYDICOM, lambda: _frames(_dicom_rgb(_pydicom_file("examples_ybr_color.dcm")), 30), 2,
          (0.45, 0.65, 0.85), roi=(25, 195, 60, 260)),
    _Spec("Ultrasound", "pydicom-data", "US1_UNCR.dcm", "NEMA WG04 US1, Doppler lymph node", _LIC_PYDICOM_DATA,
          lambda: _single(_dicom_rgb(_pydicom_data_file("US1_UNCR.dcm"))), 30, (0.35, 0.5, 0.7, 0.95),
          roi=(108, 328, 45, 590)),
    _Spec("Ultrasound", "pydicom-data", "gdcm-US-ALOKA-16.dcm", "GDCM test data, Aloka pelvis ultrasound",
          _LIC_GDCM, lambda: _single(_dicom_rgb(_pydicom_data_file("gdcm-US-ALOKA-16.dcm"))), 30,
          (0.3, 0.45, 0.65, 0.9), roi=(105, 405, 35, 610), test_groups=("gdcm-US-ALOKA-16.dcm",)),
    # Fundus: a colour fundus photograph in quadrants (one is test) and a grey detail of another eye.
    _Spec("Fundus", "scikit-image", "retina.jpg", "Wikimedia fundus photograph of a normal left eye",
          _LIC_SKIMAGE_CC0, lambda: _single(_skimage_rgb("retina.jpg")), 25, (0.3, 0.45, 0.65, 0.9),
          roi=(60, 1351, 60, 1351), grid=(2, 2), test_groups=("retina.jpg#region=r1c0",)),
    _Spec("Fundus", "scikit-image", "microaneurysms.png", "HRF fundus database image 07_dr, green channel",
          _LIC_SKIMAGE_CC0, lambda: _single(_skimage_gray("microaneurysms.png")), 20, (0.55, 0.7, 0.85),
          min_std=5.0),  # a low-contrast green channel by nature
    # Histology: one IHC slide image in quadrants; one quadrant is test.
    _Spec("Histology", "scikit-image", "ihc.png", "CMMI colon IHC (FHL2/DAB, hematoxylin)", _LIC_SKIMAGE_FREE,
          lambda: _single(_skimage_rgb("ihc.png")), 30, (0.3, 0.45, 0.65, 0.9), grid=(2, 2),
          test_groups=("ihc.png#region=r0c1",)),
)

# Left out on purpose: OBXXXX1A.dcm / examples_palette.dcm (mostly blank screen and text, origin only "a GitHub
# issue"), examples_rgb_color.dcm (a crop of US1_UNCR.dcm), eCT_Supplemental.dcm (a perfusion map, not a CT
# picture), SC_jpeg_no_color_transform*.dcm (blank slide background), skimage.data.brain() (downloads).


# ---------------------------------------------------------------- building


def _content_ok(img: np.ndarray, min_std: float) -> bool:
    """Reject crops that are mostly flat background: too little contrast or too many saturated pixels."""
    gray = img.mean(axis=2) if img.ndim == 3 else img.astype(np.float64)
    saturated = np.mean((gray <= 8) | (gray >= 247))
    return float(gray.std()) >= min_std and saturated <= 0.4


def _resize(crop: np.ndarray) -> np.ndarray:
    im = Image.fromarray(crop).resize((SIZE, SIZE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = np.asarray(im)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)  # grey modalities stored as RGB so all items share a shape
    return np.ascontiguousarray(out, dtype=np.uint8)


def _regions(spec: _Spec, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, int, int, int]]]:
    y0, y1, x0, x1 = spec.roi if spec.roi is not None else (0, shape[0], 0, shape[1])
    rows, cols = spec.grid
    out = []
    for r in range(rows):
        for c in range(cols):
            box = (y0 + (y1 - y0) * r // rows, y0 + (y1 - y0) * (r + 1) // rows,
                   x0 + (x1 - x0) * c // cols, x0 + (x1 - x0) * (c + 1) // cols)
            out.append(("" if rows * cols == 1 else f"#region=r{r}c{c}", box))
    return out


def _package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _cut(spec: _Spec, seen: set[bytes]) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """All accepted crops of one source, with provenance; `seen` drops exact duplicates across sources."""
    rng = np.random.default_rng([SEED, zlib.crc32(spec.file.encode())])
    version = _package_version(spec.package)
    out = []
    for view in spec.views():
        for region_suffix, (ry0, ry1, rx0, rx1) in _regions(spec, view.pixels.shape):
            short = min(ry1 - ry0, rx1 - rx0)
            boxes: set[tuple[int, int, int]] = set()
            # Cycle through the scales until enough crops pass; a scale with no room left (a full-image crop
            # already taken) just yields its turn to the next one.
            for i in range(spec.crops * 4):
                if len(boxes) == spec.crops:
                    break
                side = int(np.clip(round(spec.scales[i % len(spec.scales)] * short), 16, short))
                for _attempt in range(40):
                    y = int(rng.integers(ry0, ry1 - side + 1))
                    x = int(rng.integers(rx0, rx1 - side + 1))
                    if (y, x, side) in boxes:
                        continue
                    crop = view.pixels[y:y + side, x:x + side]
                    step = max(1, side // SIZE)
                    if not _content_ok(crop[::step, ::step], spec.min_std):  # cheap pre-check before resizing
                        continue
                    img = _resize(crop)
                    key = hashlib.sha1(img.tobytes()).digest()
                    if key in seen or not _content_ok(img, spec.min_std):
                        continue
                    boxes.add((y, x, side))
                    seen.add(key)
                    group = spec.file + view.group_suffix + region_suffix
                    frame = f"{view.frame}#" if view.frame else ""
                    out.append((img, {
                        "item_id": f"{spec.cls}/{spec.file}#{frame}crop={x},{y},{side}",
                        "class": spec.cls,
                        "label": CLASSES.index(spec.cls),
                        "package": spec.package,
                        "version": version,
                        "file": spec.file,
                        "origin": spec.origin,
                        "frame": view.frame,
                        "region": f"{rx0},{ry0},{rx1},{ry1}",
                        "crop_box": f"{x},{y},{x + side},{y + side}",
                        "licence": spec.licence,
                        "group": group,
                        "split": "test" if group in spec.test_groups else "train",
                    }))
                    break
    return out


def build_arrays() -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Cut every source into 64x64 RGB uint8 crops: (images N x 64 x 64 x 3, labels N, provenance rows)."""
    seen: set[bytes] = set()
    images: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    for spec in _SPECS:
        cut = _cut(spec, seen)
        missing = set(spec.test_groups) - {row["group"] for _, row in cut}
        if missing:  # a recipe error, not a user error: the split would silently lose a class
            raise RuntimeError(f"embedded recipe names test groups that yield no crops: {sorted(missing)}")
        for img, row in cut:
            row["index"] = len(rows)
            images.append(img)
            rows.append(row)
    labels = np.array([row["label"] for row in rows], dtype=np.int64)
    return np.stack(images), labels, rows


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def content_hash(images: np.ndarray, labels: np.ndarray, csv_text: str) -> str:
    """SHA-256 over pixels, labels and provenance: equal hashes mean byte-identical builds."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(csv_text.encode("utf-8"))
    return h.hexdigest()


def _readme(rows: list[dict[str, Any]], digest: str) -> str:
    by_file: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_file.setdefault(row["file"], {**row, "n": 0})["n"] += 1
    lines = [
        f"medpfl embedded dataset {PREFIX} (builder {BUILDER_VERSION}, sha256 {digest})",
        "",
        f"{len(rows)} real medical images, {SIZE}x{SIZE} RGB uint8 (grey modalities replicated), classes:",
        "  " + ", ".join(f"{c} {n}" for c, n in Counter(r["class"] for r in rows).items()),
        "Cut (seeded crops at several scales, frames, slices) from images shipped inside pip packages;",
        "DICOM rescaled by slope/intercept; CT shown in the file's VOI window (else W400 L40), MR and CR in a",
        "0.5-99.5 percentile window; MONOCHROME1 inverted. Same package versions give byte-identical builds.",
        f"Per-image provenance and the recommended grouped train/test split: {PREFIX}-provenance.csv.",
        "Groups: one source image, a run of neighbouring frames/slices, or a disjoint region of a large image.",
        "Caveat: for X-ray, fundus and histology some test regions come from the same image (patient) as",
        "training regions; they share no pixels, but this is weaker than a patient-level split.",
        "",
        "Sources (file, package, origin, licence, images):",
    ]
    for file, row in by_file.items():
        lines.append(f"  {file} [{row['package']} {row['version']}] {row['origin']}; {row['licence']}; {row['n']}")
    lines += ["", "Licences: pydicom, pydicom-data and nibabel are MIT; GDCM data BSD-3-Clause; scikit-image data",
              "CC0 or 'no known copyright restrictions' as stated in skimage.data docstrings. Nothing GPL.",
              "693_UNCR.dcm (a pydicom bug-report file) and explicit_VR-UN.dcm (TCIA) are documented only by the",
              "pydicom test-data README and ship under pydicom-data's MIT licence; the rest come from NEMA WG04,",
              "GDCM, nibabel and scikit-image with stated terms.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- cache


def embedded_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding the embedded build: <cache_dir or $MEDPFL_CACHE or ~/.cache/medpfl>/embedded."""
    root = cache_dir if cache_dir is not None else os.environ.get("MEDPFL_CACHE") or Path.home() / ".cache" / "medpfl"
    return Path(root).expanduser() / "embedded"


def _paths(folder: Path) -> dict[str, Path]:
    return {
        "npz": folder / f"{PREFIX}.npz",
        "csv": folder / f"{PREFIX}-provenance.csv",
        "readme": folder / f"{PREFIX}-README.txt",
        "marker": folder / f"{PREFIX}.json",
    }


def _write_atomic(path: Path, write: Callable[[Any], None], binary: bool) -> None:
    """Write via a temp file in the same folder and rename, so readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _marker_ok(paths: dict[str, Path]) -> bool:
    try:
        marker = json.loads(paths["marker"].read_text(encoding="utf-8"))
        if marker.get("builder_version") != BUILDER_VERSION:
            return False
        with np.load(paths["npz"]) as z:
            images, labels = z["images"], z["labels"]
        csv_text = paths["csv"].read_text(encoding="utf-8")
    except (OSError, ValueError, KeyError):  # missing or corrupt pieces: rebuild
        return False
    return marker.get("sha256") == content_hash(images, labels, csv_text)


def ensure_embedded(cache_dir: str | os.PathLike[str] | None = None, rebuild: bool = False) -> Path:
    """Return the embedded build's folder, building it first if missing, stale (other builder version) or corrupt."""
    folder = embedded_dir(cache_dir)
    paths = _paths(folder)
    if not rebuild and _marker_ok(paths):
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedPFLError(
            f"Cannot create the cache folder {folder}; set MEDPFL_CACHE to a writable folder."
        ) from exc
    images, labels, rows = build_arrays()
    csv_text = _csv_text(rows)
    digest = content_hash(images, labels, csv_text)
    arrays = {
        "images": images,
        "labels": labels,
        "class_names": np.array(CLASSES),
        "item_ids": np.array([row["item_id"] for row in rows]),
    }
    _write_atomic(paths["npz"], lambda fh: np.savez_compressed(fh, **arrays), binary=True)
    _write_atomic(paths["csv"], lambda fh: fh.write(csv_text), binary=False)
    _write_atomic(paths["readme"], lambda fh: fh.write(_readme(rows, digest)), binary=False)
    marker = {"builder_version": BUILDER_VERSION, "sha256": digest, "n_images": len(rows)}
    # The marker goes last: an interrupted build leaves no valid marker and is redone next time.
    _write_atomic(paths["marker"], lambda fh: fh.write(json.dumps(marker, indent=1)), binary=False)
    return folder


# ---------------------------------------------------------------- reading


class EmbeddedSource(ImageSource):
    """The embedded images as an ImageSource; `load` gives float32 64x64x3 in [0,1]."""

    name = "embedded"

    def __init__(self, folder: Path, split: str = "all") -> None:
        if split not in SPLITS:
            raise MedPFLError(f"Unknown split {split!r} for the embedded dataset; use one of {', '.join(SPLITS)}.")
        paths = _paths(folder)
        with np.load(paths["npz"]) as z:
            self._images = z["images"]
            self.classes = [str(c) for c in z["class_names"]]
        with paths["csv"].open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        self.split = split
        self.items = [
            Item(row["item_id"], int(row["label"]), row["class"], provenance=dict(row))
            for row in rows
            if split == "all" or row["split"] == split
        ]
        self._row = {item.item_id: int(item.provenance["index"]) for item in self.items}
        self.skipped = []

    def load(self, item: Item) -> np.ndarray:
        """Pixels of one item as float32 H x W x 3 in [0,1]."""
        try:
            row = self._row[item.item_id]
        except KeyError as exc:
            raise MedPFLError(
                f"Item {item.item_id!r} is not in the embedded {self.split} split; list items from this source."
            ) from exc
        return self._images[row].astype(np.float32) / 255.0


def embedded_source(cache_dir: str | os.PathLike[str] | None = None, split: str = "all") -> EmbeddedSource:
    """The embedded dataset (built on first use) as an ImageSource; split is all, train or test."""
    if split not in SPLITS:
        raise MedPFLError(f"Unknown split {split!r} for the embedded dataset; use one of {', '.join(SPLITS)}.")
    return EmbeddedSource(ensure_embedded(cache_dir), split)


def describe_embedded(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Summary for `medpfl data sample`: path, image count, count per class and split, size, licences."""
    folder = ensure_embedded(cache_dir)
    paths = _paths(folder)
    with paths["csv"].open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    marker = json.loads(paths["marker"].read_text(encoding="utf-8"))
    return {
        "path": str(folder),
        "files": {k: str(p) for k, p in paths.items()},
        "n_images": len(rows),
        "classes": list(CLASSES),
        "per_class": {c: sum(r["class"] == c for r in rows) for c in CLASSES},
        "per_split": dict(Counter(r["split"] for r in rows)),
        "size": [SIZE, SIZE, 3],
        "licences": dict(Counter(r["licence"] for r in rows)),
        "sources": sorted({r["file"] for r in rows}),
        "builder_version": marker["builder_version"],
        "sha256": marker["sha256"],
    }
