"""JSON-lines files of a run directory (results, rounds, attacks, cells, an audit's ledger): one record a line,
appended and flushed as each finishes, read back by the runs that resume and by the report, all by one rule.

The rule: everything up to the file's last newline was written in full, so a line there that does not parse
was damaged afterwards; that is an error naming the file and the line, and nothing is changed. After the last
newline a kill during a write can leave part of a record: that part is left out (and cut off before the next
append, so the record is redone); a whole record whose newline was never written counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medpfl.errors import MedPFLError


def read_jsonl(file: Path) -> list[dict[str, Any]]:
    """The records of `file` ([] if there is none), by the module's rule."""
    return _parse(file)[0] if file.exists() else []


def append_jsonl(file: Path, record: dict[str, Any]) -> None:
    """Append one finished record to `file` and flush it to disk at once (first cutting off what a kill left of
    the record before, so that the two never run together into one damaged line)."""
    if not _ends_a_line(file):
        drop_cut_off_tail(file)
    with open(file, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_cut_off_tail(file: Path) -> None:
    """Before appending to `file` again: cut a last line left half-written by a kill, or end a whole one with its
    newline. Finished records are never rewritten, only the bytes after them touched; damage raises first."""
    if not file.exists():
        return
    _, cut_at = _parse(file)
    if cut_at is not None:
        os.truncate(file, cut_at)
    elif file.stat().st_size and not file.read_bytes().endswith(b"\n"):
        with open(file, "ab") as f:
            f.write(b"\n")
    else:
        return
    with open(file, "rb+") as f:
        os.fsync(f.fileno())


def _ends_a_line(file: Path) -> bool:
    """Whether `file` is missing, empty or ends with a newline (the state every finished append leaves)."""
    try:
        with open(file, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True


def rewrite_jsonl(file: Path, records: list[dict[str, Any]]) -> None:
    """Replace `file` by `records` at once (a kill leaves the old file or the new one, never a mix)."""
    tmp = file.with_suffix(file.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(tmp, file)


def _parse(file: Path) -> tuple[list[dict[str, Any]], int | None]:
    """The records in `file`, and the byte offset where a cut-off last line begins (None if there is none)."""
    data = file.read_bytes()
    whole = data.rfind(b"\n") + 1  # everything up to the last newline was written in full
    records = []
    for number, line in enumerate(data[:whole].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MedPFLError(
                f"'{file}' line {number} is not a readable record ({exc}); it was damaged after it was written: "
                "repair or delete that line, or start over with a new --out (nothing was changed)."
            ) from exc
    tail = data[whole:]
    if not tail.strip():
        return records, None
    try:
        records.append(json.loads(tail))  # a whole record whose newline was never written
        return records, None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return records, whole  # the normal trace of a kill during a write: that record is redone
