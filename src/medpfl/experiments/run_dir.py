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
from medpfl.jsonl import append_jsonl, drop_cut_off_tail, read_jsonl

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
            drop_cut_off_tail(path / "results.jsonl")
    write_json(config_file, record)
    return path


def read_results(path: Path, name: str = "results.jsonl") -> Iterator[dict[str, Any]]:
    """Finished results of a run (in `name`), by medpfl.jsonl's rule: a last line cut short by a kill is left
    out; any other unreadable line is damage and raises a MedPFLError naming the file and line."""
    return iter(read_jsonl(path / name))


def append_result(path: Path, result: dict[str, Any], name: str = "results.jsonl") -> None:
    """Append one finished result (to `name`) and flush it to disk at once."""
    append_jsonl(path / name, result)
