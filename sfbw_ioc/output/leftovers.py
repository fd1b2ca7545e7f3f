"""``.partial`` files left in an output root: files whose acquisition never completed
(the IOC killed, the power lost, a disk that filled). Found once, at start-up, to be
reported; never opened, moved or removed here (the writer never overwrites one either:
``root.taken_by`` counts it as taking its name).

``find_partials`` walks the whole tree below the root without following symbolic links,
visiting at most ``max_entries`` directory entries so that a huge tree (a beamline's
years of data, over a network file system) costs a bounded amount of work. It blocks on
the disk: call it from a thread.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .root import PARTIAL_SUFFIX

MAX_ENTRIES = 100_000  # directory entries looked at, at most
NAMED = 5  # left-overs named in the report


@dataclass(frozen=True, slots=True)
class Leftovers:
    """What a scan of ``root`` found: how many ``.partial`` files, the first ``NAMED``
    of them (in the order met), the newest (by modification time), and the limit of
    entries the scan stopped at (None: it saw the whole tree)."""

    root: Path
    count: int = 0
    first: tuple[Path, ...] = ()
    newest: Path | None = None
    stopped_at: int | None = None

    def report(self) -> str:
        """One line for the log, naming the files relative to the root."""
        if not self.count:
            found = f"no {PARTIAL_SUFFIX} file left in {self.root}"
        else:
            names = ", ".join(str(path.relative_to(self.root)) for path in self.first)
            unnamed = self.count - len(self.first)
            more = f" and {unnamed} more" if unnamed else ""
            files, acquisitions = (("files", "acquisitions") if self.count > 1
                                   else ("file", "an acquisition"))
            found = (f"{self.count} {PARTIAL_SUFFIX} {files} left in {self.root} by "
                     f"{acquisitions} that did not complete (kept: never overwritten nor "
                     f"removed): {names}{more}")
        if self.stopped_at is not None:
            found += f" (the scan stopped after {self.stopped_at} entries: there may be more)"
        return found


def find_partials(root: Path, before: float, max_entries: int = MAX_ENTRIES) -> Leftovers:
    """The ``.partial`` files below ``root`` (resolved) last modified before ``before``
    (a ``time.time()``: one changed since is being written by this IOC, not left over).
    Anything but a directory counts (a link too, not followed)."""
    root = Path(root).resolve()
    entries = _entries(root)
    found: list[tuple[Path, float]] = []
    for entry in itertools.islice(entries, max_entries):
        mtime = _partial_mtime(entry)
        if mtime is not None and mtime < before:
            found.append((Path(entry.path), mtime))
    stopped = next(entries, None) is not None
    entries.close()
    newest = max(found, key=lambda item: item[1])[0] if found else None
    return Leftovers(root, len(found), tuple(path for path, _ in found[:NAMED]), newest,
                     max_entries if stopped else None)


def _entries(root: Path) -> Iterator[os.DirEntry]:
    """Every entry of the tree below ``root``, symbolic links not followed; a directory
    that cannot be read is passed over."""
    pending = [root]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    yield entry
        except OSError:
            continue


def _partial_mtime(entry: os.DirEntry) -> float | None:
    """The modification time of a ``.partial`` that is no directory; None for any
    other entry, or one that vanished meanwhile."""
    if not entry.name.endswith(PARTIAL_SUFFIX) or entry.is_dir(follow_symlinks=False):
        return None
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return None
