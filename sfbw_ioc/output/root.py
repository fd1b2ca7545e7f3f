"""The rules for where a file is written: inside the output root, never over an existing
file, first as ``<name>.partial`` and published under its name only when complete."""
from __future__ import annotations

import os
from pathlib import Path


def partial_path(target: Path) -> Path:
    """Where the file for ``target`` is written until it is complete."""
    return target.with_name(target.name + ".partial")


def fsync_path(path: Path) -> None:
    """Make ``path`` (a file or a directory) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
