"""What a writer asks of each file beyond its rows: the PVs to record, SWMR, and where
the file being written can be seen (``ACTIVE_FILE``, ``SWMR_ACTIVE``)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..recorder.history import PvHistory
from ..recorder.names import RecordedPv

if TYPE_CHECKING:
    from ..recorder.monitor import Recorder


class ActiveFile:
    """The path of the file a writer has open and whether readers may open it now
    (SWMR on); set by the writer thread, read by the IOC's loop. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._path = ""
        self._swmr = False

    def set(self, path: str, swmr: bool) -> None:
        with self._lock:
            self._path, self._swmr = path, swmr

    def get(self) -> tuple[str, bool]:
        """(path, SWMR on); ("", False) when no file is open."""
        with self._lock:
            return self._path, self._swmr


@dataclass(frozen=True)
class OutputOptions:
    """``swmr``: let readers follow the file (HDF5 SWMR); ``epics``: the PVs recorded
    under /epics, with their histories; ``active``: told the file open now;
    ``recorder``: watches the PVs a writer is told to record (None: none may be)."""

    swmr: bool = False
    epics: tuple[tuple[RecordedPv, PvHistory], ...] = ()
    active: ActiveFile = field(default_factory=ActiveFile)
    recorder: Recorder | None = None
