"""What the report's sections draw on: the runs a directory holds, and the attacked images themselves read
back from the data sources the runs name (run directories keep reconstructions only)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from medpfl.report.runs import AttackRun, ImageResult, Run, SweepRun, TrainRun


class Originals:
    """The attacked images themselves, read back from the data source a run names, as PNG bytes.

    Run directories store reconstructions, not the source images; when the source cannot be opened here
    (another machine, data moved), pictures show reconstructions only and the report says why."""

    def __init__(self) -> None:
        self._datasets: dict[tuple, Any] = {}
        self._cache: dict[tuple, bytes | None] = {}
        self.problems: dict[str, str] = {}

    def _dataset(self, run: Run):
        key = (run.config.get("data"), run.config.get("image_size", 32), run.config.get("channels", 3))
        if key not in self._datasets:
            try:
                from medpfl.data import ImageDataset, open_source

                source = open_source(key[0])
                self._datasets[key] = (ImageDataset(source, size=key[1], channels=key[2]),
                                       {it.item_id: i for i, it in enumerate(source.items)})
            except Exception as exc:  # noqa: BLE001 - any failure means: show reconstructions only
                self.problems[str(key[0] or "embedded")] = str(exc) or type(exc).__name__
                self._datasets[key] = None
        return self._datasets[key]

    def png(self, run: Run, item_id: str) -> bytes | None:
        key = (run.config.get("data"), run.config.get("image_size"), run.config.get("channels"), item_id)
        if key not in self._cache:
            self._cache[key] = self._load(run, item_id)
        return self._cache[key]

    def _load(self, run: Run, item_id: str) -> bytes | None:
        from medpfl.report.images import to_uint8

        loaded = self._dataset(run)
        if loaded is None or item_id not in loaded[1]:
            return None
        try:
            array = to_uint8(loaded[0].image(loaded[1][item_id]))
        except Exception:  # noqa: BLE001
            return None
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    def class_names(self, run: Run) -> list[str] | None:
        loaded = self._dataset(run)
        return list(loaded[0].classes) if loaded else None


@dataclass
class Context:
    """Everything a section may draw on."""

    root: Path
    runs: list[Run]
    originals: Originals = field(default_factory=Originals)

    @property
    def train_runs(self) -> list[TrainRun]:
        return [r for r in self.runs if isinstance(r, TrainRun)]

    @property
    def sweeps(self) -> list[SweepRun]:
        return [r for r in self.runs if isinstance(r, SweepRun)]

    @property
    def attacked(self) -> list[AttackRun | TrainRun]:
        """Runs with attacked images."""
        return [r for r in self.runs if isinstance(r, (AttackRun, TrainRun)) and r.images()]

    def images(self) -> list[ImageResult]:
        return [row for run in self.attacked for row in run.images()]

