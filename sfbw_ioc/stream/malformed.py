"""Counting the messages that were rejected, by kind, for MALFORMED."""
from __future__ import annotations

import logging
import threading

from ..bsread import MalformedMessage

log = logging.getLogger(__name__)


class MalformedCounter:
    """Counts rejected messages and logs the first of each kind (the rest only count).

    Shared by the receiver (structure) and the acquisition (values), so MALFORMED tells
    the operator about both.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_kind: dict[str, int] = {}

    def report(self, error: MalformedMessage, pulse_id: int | None = None) -> None:
        with self._lock:
            first = error.kind not in self._by_kind
            self._by_kind[error.kind] = self._by_kind.get(error.kind, 0) + 1
        if first:
            log.warning("malformed bsread message (pulse id %s): %s; further ones of kind "
                        "%r are only counted", pulse_id, error, error.kind)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._by_kind.values())

    def by_kind(self) -> dict[str, int]:
        with self._lock:
            return dict(self._by_kind)
