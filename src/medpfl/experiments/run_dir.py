"""A run directory: its config, seed and library versions, and results written as they finish."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch

from medpfl.errors import MedPFLError

_LIBRARIES = ("medpfl", "torch", "numpy", "scipy", "pillow", "pydicom", "nibabel", "scikit-image")


def library_versions() -> dict[str, str]:
    """Versions of Python, the libraries results depend on, and the device used."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    versions["torch_threads"] = str(torch.get_num_threads())
    return versions


SKIPPED = "skipped.json"  # the source's files a run could not use, and why


def write_skipped(path: Path, skipped: list) -> None:
    """The files of the source a run left out (data.Skipped: path, reason), in its directory's skipped.json."""
    write_json(path / SKIPPED, [asdict(s) for s in skipped])


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically, so an interrupted run never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def open_run_dir(out: str | os.PathLike[str], config: dict[str, Any], resume: bool = True) -> Path:
    """Create `out` and record the config there; an existing run resumes only with the same config."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedPFLError(f"Cannot create the output folder '{path}' ({exc.strerror}); pass a writable --out.") from exc
    config_file = path / "config.json"
    record = {"config": config, "seed": config.get("seed"), "versions": library_versions(), "argv": sys.argv}
    if config_file.exists() and (path / "results.jsonl").exists():
        previous = json.loads(config_file.read_text()).get("config")
        if previous != config:
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            raise MedPFLError(
                f"'{path}' holds a run with other settings ({', '.join(changed)}); pass a new --out "
                "or the same settings to resume it."
            )
        if not resume:
            (path / "results.jsonl").unlink()
        else:
            _drop_cut_off_tail(path / "results.jsonl")
    write_json(config_file, record)
    return path


def read_results(path: Path, name: str = "results.jsonl") -> Iterator[dict[str, Any]]:
    """Finished results of a run (in `name`). A last line cut short by a kill is left out; any other
    unreadable line is damage and raises a MedPFLError naming the file and line."""
    results = path / name
    if not results.exists():
        return iter(())
    return iter(_parse_results(results)[0])


def _parse_results(file: Path) -> tuple[list[dict[str, Any]], int | None]:
    """The results in `file`, and the byte offset where a cut-off last line begins (None if there is none)."""
    data = file.read_bytes()
    whole = data.rfind(b"\n") + 1  # everything up to the last newline was written in full
    results = []
    for number, line in enumerate(data[:whole].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            results.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MedPFLError(
                f"'{file}' line {number} is not a readable result ({exc}); it was damaged after it was "
                "written: repair or delete that line, or start over with a new --out (nothing was changed)."
            ) from exc
    tail = data[whole:]
    if not tail.strip():
        return results, None
    try:
        results.append(json.loads(tail))  # a whole result whose newline was never written
        return results, None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return results, whole  # the normal trace of a kill during a write: that result is redone


def _drop_cut_off_tail(file: Path) -> None:
    """Before appending again: cut a last line left half-written by a kill, or end a whole one with its
    newline. Finished results are never rewritten, only the bytes after them touched."""
    _, cut_at = _parse_results(file)  # raises on damage before anything is changed
    if cut_at is not None:
        os.truncate(file, cut_at)
    elif file.stat().st_size and not file.read_bytes().endswith(b"\n"):
        with open(file, "ab") as f:
            f.write(b"\n")
    else:
        return
    with open(file, "rb+") as f:
        os.fsync(f.fileno())


def append_result(path: Path, result: dict[str, Any], name: str = "results.jsonl") -> None:
    """Append one finished result (to `name`) and flush it to disk at once."""
    with open(path / name, "a") as f:
        f.write(json.dumps(result) + "\n")
        f.flush()
        os.fsync(f.fileno())
