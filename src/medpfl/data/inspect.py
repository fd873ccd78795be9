"""What a data source holds: counts per class, image sizes and modes, and which files were skipped and why."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from medpfl.data.base import ImageSource, Skipped
from medpfl.errors import MedPFLError

# Above this many distinct sizes the report gives the range instead of listing them.
MAX_LISTED_SIZES = 8


@dataclass
class InspectReport:
    """Summary of one source, built from headers (and a cheap decode of every file when verified)."""

    kind: str
    root: str
    n_items: int
    class_counts: dict[str, int]
    sizes: dict[str, int]  # "HxW" -> items; empty when there are more than MAX_LISTED_SIZES distinct sizes
    size_range: tuple[tuple[int, int], tuple[int, int]] | None  # ((min H, min W), (max H, max W))
    modes: dict[str, int]
    skipped: list[Skipped] = field(default_factory=list)
    verified: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return asdict(self)


def _item_size(source: ImageSource, item: Any) -> tuple[int, int]:
    """Item size from its listing header, or by decoding it when the source recorded none (small sources)."""
    size = item.provenance.get("size")
    if size is not None:
        return int(size[0]), int(size[1])
    shape = source.load(item).shape
    return int(shape[0]), int(shape[1])


def verify_source(source: ImageSource, strict: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> list[Skipped]:
    """Decode every file of `source` cheaply and drop the broken ones from its items, before any work uses
    them; returns every file skipped (unreadable headers too), or refuses them all with `strict`."""
    if hasattr(source, "verify"):
        source.verify(progress=progress)  # drops failing items, records them in source.skipped
    return _skipped(source, strict)


def open_verified(spec: str | os.PathLike[str] | None, strict: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  on_skipped: Callable[[list[Skipped]], None] | None = None) -> tuple[ImageSource, list[Skipped]]:
    """The policy of every command that reads images: open `spec`, decode every file, leave the broken ones
    out of the source and hand them to `on_skipped` before any work (with `strict`, refuse them all)."""
    from medpfl.data.sources import open_source

    source = open_source(spec)
    skipped = verify_source(source, strict=strict, progress=progress)
    if skipped and on_skipped:
        on_skipped(skipped)
    present = sorted({it.class_name for it in source.items})
    if len(present) < 2:
        # A one-class model's cross-entropy is zero whatever its weights, so every update it shares is zero: an
        # audit would find nothing where the same images in a real task leak.
        raise MedPFLError(f"'{spec}' holds images of one class only ({', '.join(present) or 'none'}), so its model's "
                          "updates would be zero and no attack could find anything; give the images 2 or more "
                          "classes (one sub-folder per class).")
    return source, skipped


def _skipped(source: ImageSource, strict: bool) -> list[Skipped]:
    skipped = list(getattr(source, "skipped", []))
    if strict and skipped:
        listing = "; ".join(f"{s.path} ({s.reason})" for s in skipped)
        raise MedPFLError(
            f"{len(skipped)} file(s) could not be used: {listing}; fix or remove them, or run without --strict."
        )
    return skipped


def inspect_source(
    spec: str | os.PathLike[str] | ImageSource | None,
    strict: bool = False,
    verify: bool = True,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> InspectReport:
    """Open (or take) a source and summarise it; `verify` decodes every file cheaply, `strict` fails on any skip."""
    from medpfl.data.sources import open_source

    source = spec if isinstance(spec, ImageSource) else open_source(spec, **options)
    verified = verify and hasattr(source, "verify")
    skipped = verify_source(source, strict=strict, progress=progress) if verify else _skipped(source, strict)
    counts = Counter(it.class_name for it in source.items)
    class_counts = {c: counts.get(c, 0) for c in source.classes}
    sizes = Counter(_item_size(source, it) for it in source.items)
    size_range = None
    if sizes:
        hs, ws = [s[0] for s in sizes], [s[1] for s in sizes]
        size_range = ((min(hs), min(ws)), (max(hs), max(ws)))
    listed = (
        {f"{h}x{w}": n for (h, w), n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))}
        if len(sizes) <= MAX_LISTED_SIZES
        else {}
    )
    modes = Counter(str(it.provenance.get("mode", "unknown")) for it in source.items)
    root = getattr(source, "root", None) or getattr(source, "path", None) or spec or "embedded default"
    return InspectReport(
        kind=getattr(source, "name", type(source).__name__),
        root=str(root),
        n_items=len(source.items),
        class_counts=class_counts,
        sizes=listed,
        size_range=size_range,
        modes=dict(modes.most_common()),
        skipped=skipped,
        verified=verified,
    )


def format_report(report: InspectReport) -> Any:
    """A rich renderable (tables) of the report, for printing with a rich Console."""
    from rich.console import Group
    from rich.table import Table

    summary = Table(title=f"{report.kind} source", show_header=False, title_justify="left")
    summary.add_column()
    summary.add_column(overflow="fold")  # a long path folds in a narrow terminal, never cut
    summary.add_row("path", report.root)
    summary.add_row("images", str(report.n_items))
    summary.add_row("classes", str(len(report.class_counts)))
    if report.sizes:
        summary.add_row("sizes (HxW)", ", ".join(f"{s} ({n})" for s, n in report.sizes.items()))
    elif report.size_range is not None:
        (h0, w0), (h1, w1) = report.size_range
        summary.add_row("sizes (HxW)", f"{h0}x{w0} .. {h1}x{w1} (many distinct)")
    summary.add_row("modes", ", ".join(f"{m} ({n})" for m, n in report.modes.items()) or "-")
    summary.add_row("verified", "every file decoded" if report.verified else "headers only")
    summary.add_row("skipped", str(len(report.skipped)))
    classes = Table("label", "class", "images", title="Classes", title_justify="left")
    for i, (name, n) in enumerate(report.class_counts.items()):
        classes.add_row(str(i), name, str(n))
    parts: list[Any] = [summary, classes]
    if report.skipped:
        skipped = Table(title="Skipped files", title_justify="left")
        # Fold, never cut: the file's name is the point of this table, however narrow the output.
        skipped.add_column("file", overflow="fold")
        skipped.add_column("reason", overflow="fold")
        for s in report.skipped:
            skipped.add_row(s.path, s.reason)
        parts.append(skipped)
    return Group(*parts)
