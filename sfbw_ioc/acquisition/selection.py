"""Which channels an acquisition writes: names and shell-style patterns (``CHANNELS``).

The selection is fixed at START; a data header's matching channels are worked out once
per header (by its hash), so a steady stream pays nothing per message for it.
"""
from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Iterable

from ..bsread import DataHeader

_SEPARATORS = re.compile(r"[\s,]+")


class ChannelSelection:
    """The channels matching any of the patterns of ``text`` (whitespace or commas
    between them; case-sensitive, as channel names are)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.patterns = tuple(pattern for pattern in _SEPARATORS.split(text) if pattern)
        if not self.patterns:
            raise ValueError("a selection needs at least one pattern")
        self._indices: dict[str, tuple[int, ...]] = {}

    @classmethod
    def parse(cls, text: str) -> ChannelSelection | None:
        """The selection of ``text``; None when it names nothing: every channel."""
        return cls(text) if _SEPARATORS.sub("", text) else None

    def matches(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.patterns)

    def indices(self, header: DataHeader) -> tuple[int, ...]:
        """Indices of ``header``'s selected channels, in header order."""
        indices = self._indices.get(header.hash)
        if indices is None:
            if len(self._indices) > 64:  # a source that changes its header for ever
                self._indices.clear()
            indices = tuple(i for i, spec in enumerate(header.channels)
                            if self.matches(spec.name))
            self._indices[header.hash] = indices
        return indices

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The patterns that match none of ``names``."""
        names = list(names)
        return [pattern for pattern in self.patterns
                if not any(fnmatchcase(name, pattern) for name in names)]
