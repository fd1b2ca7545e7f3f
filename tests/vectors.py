"""The bsread test vectors captured from the reference implementation (read-only).

See bsread_reference/README.md beside this file (the protocol and how the vectors were
captured, kept with them so that a clone tests with nothing beside it): per case
``CASE.bsr`` (raw messages), ``CASE.json`` (what the reference sender was asked to send)
and, for large arrays, ``CASE.npz``. ``SFBW_VECTORS`` may name another directory.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

VECTORS_DIR = Path(
    os.environ.get(
        "SFBW_VECTORS",
        Path(__file__).resolve().parent / "bsread_reference" / "vectors",
    )
)

CASES = [
    "scalars",
    "arrays",
    "arrays_lz4",
    "arrays_bslz4",
    "dh_lz4",
    "dh_bslz4",
    "camera_bslz4",
    "missing_values",
    "header_change",
    "big_endian",
]

_UINT32 = struct.Struct("<I")


def read_bsr(path: str | os.PathLike[str]) -> list[list[bytes]]:
    """Messages of a .bsr file: per message a uint32 part count, then per part a uint32
    length and the bytes (all little-endian)."""
    data = Path(path).read_bytes()
    messages, pos = [], 0
    while pos < len(data):
        (count,) = _UINT32.unpack_from(data, pos)
        pos += _UINT32.size
        parts = []
        for _ in range(count):
            (length,) = _UINT32.unpack_from(data, pos)
            pos += _UINT32.size
            parts.append(data[pos : pos + length])
            pos += length
        if pos > len(data):
            raise ValueError(f"{path}: truncated")
        messages.append(parts)
    return messages


def load_case(
    name: str,
) -> tuple[list[list[bytes]], dict[str, Any], dict[str, np.ndarray] | None]:
    """(messages' frames, the case's JSON, the npz arrays by key or None)."""
    messages = read_bsr(VECTORS_DIR / f"{name}.bsr")
    expected = json.loads((VECTORS_DIR / f"{name}.json").read_text())
    npz_path = VECTORS_DIR / f"{name}.npz"
    npz = None
    if npz_path.exists():
        with np.load(npz_path) as archive:
            npz = {key: archive[key] for key in archive.files}
    return messages, expected, npz


def expected_value(
    channel: dict[str, Any] | None, npz: dict[str, np.ndarray] | None = None
) -> np.ndarray | str | None:
    """What a channel entry of a case's JSON says was sent: None (no value), a str, or a
    numpy array of the given dtype and numpy shape (``()`` for scalars)."""
    if channel is None:
        return None
    if channel["dtype"] == "str":
        return channel["values"]
    if "npz" in channel:
        if npz is None:
            raise ValueError(f"channel refers to {channel['npz']!r} but the case has no npz")
        array = npz[channel["npz"]]
    else:
        array = np.array(channel["values"], dtype=channel["dtype"])
    return array.reshape(channel["shape"]).astype(channel["dtype"], copy=False)
