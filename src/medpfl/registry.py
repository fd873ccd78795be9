"""A registry: entries by name (attacks, models), in the order they were registered, read like a dict."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, Protocol, TypeVar

from medpfl.errors import MedPFLError


class Named(Protocol):
    name: str


E = TypeVar("E", bound=Named)


class Registry(Mapping[str, E], Generic[E]):
    """Entries of one kind, each under its own name; `option` is the command-line option that picks one."""

    def __init__(self, option: str) -> None:
        self.option = option
        self._entries: dict[str, E] = {}

    def register(self, entry: E) -> E:
        """Add `entry`; its name must be new."""
        if entry.name in self._entries:
            raise ValueError(f"{self.option} {entry.name!r} is registered already")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Take `name` out again (a test's own entry, after the test)."""
        del self._entries[name]

    def entry(self, name: str) -> E:
        """The entry `name`; an unknown name is one sentence listing the known ones."""
        if name not in self._entries:
            raise MedPFLError(f"Unknown {self.option} '{name}'; choose one of: {', '.join(self._entries)}.")
        return self._entries[name]

    def __getitem__(self, name: str) -> E:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
