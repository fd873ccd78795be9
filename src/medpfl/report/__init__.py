"""Reports for people: images, plots and a self-contained HTML page of what a run directory holds."""

from __future__ import annotations

import os
from pathlib import Path


def build_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write report.html (and results.csv) for the runs in `run_dir`; see medpfl.report.build."""
    from medpfl.report.build import build_report as build  # lazy: keeps `import medpfl.report.images` light

    return build(run_dir, out)
