"""Where a file may go: inside the output root, never over anything already there, first
as ``<name>.partial`` and published under its name only when complete.

``OutputRoot`` turns an operator's name (OUTPUT_FILE, relative to the root or absolute)
into the target path, or refuses it (``OutputPathError``); it also places a group's
master file and gives the stem of its members' files. The rules of a single target,
which need no root, are functions: its ``.partial``, whether its name is taken,
publishing it, a safe file name made of any text.

How the file and its directories are created, and by whom they are owned, is
``ownership.Owner``'s: it walks the resolved path by descriptors without following
symbolic links, so that a link or a non-directory swapped in after ``resolve`` is
refused too.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePath


PARTIAL_SUFFIX = ".partial"


class OutputPathError(ValueError):
    """A name no file may be written under; the text is meant for the operator."""


class OutputRoot:
    """The directory every file is written below (resolved: free of symbolic links)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()

    def resolve(self, name: str, *, must_be_new: bool = True) -> Path:
        """The absolute, symbolic-link-free target for ``name``; refused when empty,
        outside the root (``..``, an absolute path elsewhere, a link leading out), the
        root itself, or (unless ``must_be_new`` is False) taken."""
        if not name.strip():
            raise OutputPathError("OUTPUT_FILE is empty")
        if "\0" in name:
            raise OutputPathError("OUTPUT_FILE contains a NUL character")
        try:
            # An absolute name replaces the root: it is checked like any other.
            target = (self.path / name).resolve()
        except (OSError, RuntimeError) as error:  # RuntimeError: a symbolic-link loop
            raise OutputPathError(f"{name!r} cannot be resolved: {error}") from error
        if not target.is_relative_to(self.path) or target == self.path:
            raise OutputPathError(f"{name!r} is outside the output root {self.path}")
        if must_be_new:
            refuse_taken(target)
        return target

    def master(self, name: str) -> tuple[Path, str]:
        """The group's master file for ``name`` and the stem of its members' files
        (relative to the root: members write ``<stem>/<member>.h5``)."""
        # Blanks around the group's OUTPUT_FILE are dropped (unlike a member's): kept so.
        target = self.resolve(name.strip(), must_be_new=False)
        if not target.suffix:
            raise OutputPathError(f"{name!r} needs a suffix such as .h5: members write "
                                  f"<name without it>/<member>.h5")
        refuse_taken(target)
        return target, PurePath(target.relative_to(self.path)).with_suffix("").as_posix()


def partial_path(target: Path) -> Path:
    """Where the file for ``target`` is written until it is complete."""
    return target.with_name(target.name + PARTIAL_SUFFIX)


def taken_by(target: Path) -> Path | None:
    """What takes ``target``'s name: the file itself or its ``.partial`` (anything
    there: a symbolic link, even a dangling one, a directory, a device); None if free."""
    for path in (target, partial_path(target)):
        if os.path.lexists(path):
            return path
    return None


def refuse_taken(target: Path) -> None:
    """Refuse (``OutputPathError``) a ``target`` whose name is taken."""
    taken = taken_by(target)
    if taken is None:
        return
    if taken != target:
        raise OutputPathError(f"{taken} exists already, a file that was not completed (its "
                              "acquisition was cut off, or is still being written); files "
                              "are never overwritten")
    raise OutputPathError(f"{taken} exists already; files are never overwritten")


def publish(partial: Path, target: Path) -> None:
    """Give the complete file ``partial`` its name ``target``, durably. Raises
    ``FileExistsError`` if ``target`` appeared meanwhile: ``partial`` stays then."""
    _fsync(partial)
    os.link(partial, target)  # unlike rename, fails if target exists
    partial.unlink()
    _fsync(target.parent)


def safe_name(text: str) -> str | None:
    """``text`` as one file name: every character but letters, digits, '.', '_' and
    '-' becomes '_' (no '/', nothing a shell must quote); None for a name of dots and
    underscores only (such as '..')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    return name if name.strip("._") else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
