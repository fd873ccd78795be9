"""Helpers shared by the file-based sources: path checks, class naming, verification bookkeeping."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from medpfl.data.base import Item, Skipped
from medpfl.errors import MedPFLError


def existing_path(path: str | os.PathLike[str], what: str) -> Path:
    """Return `path` as a Path, or raise a MedPFLError saying it does not exist."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MedPFLError(f"{what} path '{p}' does not exist; check the spelling or pass an existing file or folder.")
    return p


def visible_files(root: Path) -> list[Path]:
    """All regular files under `root`, recursively, sorted, skipping hidden files and folders."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders (.git, .ipynb_checkpoints) and macOS metadata never hold user images.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out)


def relative_id(path: Path, root: Path) -> str:
    """A stable, platform-independent id for a file: its path relative to `root` with forward slashes."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def robust_window(values: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> tuple[float, float]:
    """Percentile window (low, high) of finite values; high > low is guaranteed so division is safe."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [low_pct, high_pct])
    if hi <= lo:
        # Flat images: fall back to the full range so they do not become all-zero by accident.
        lo, hi = float(finite.min()), float(finite.max())
        if hi <= lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def scale_to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto [0, 1], clipping, as float32."""
    out = (values.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def verify_by_file(
    items: list[Item],
    skipped: list[Skipped],
    check: Callable[[str], None],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Item], list[Skipped]]:
    """Run `check(path)` once per distinct file; drop the items of files that fail, recording why.

    Returns the kept items and the newly skipped files (also appended to `skipped`).
    """
    paths = list(dict.fromkeys(str(it.provenance["path"]) for it in items))
    failed: dict[str, str] = {}
    for i, path in enumerate(paths):
        try:
            check(path)
        except Exception as exc:  # any decoder error means the file is unusable; report its message
            failed[path] = describe_error(exc)
        if progress is not None:
            progress(i + 1, len(paths))
    new = [Skipped(path, reason) for path, reason in failed.items()]
    skipped.extend(new)
    kept = [it for it in items if str(it.provenance["path"]) not in failed]
    return kept, new


def describe_error(exc: BaseException, limit: int = 200) -> str:
    """A one-line reason from an exception, for the skipped list (decoder messages often span lines)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def class_index(names: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Sorted distinct class names and their label numbers 0..K-1."""
    classes = sorted(set(names))
    return classes, {c: i for i, c in enumerate(classes)}
