"""``/general``: who and what an acquisition was for, in every file of the package
(the IOC's files and the group's master file)."""
from __future__ import annotations

from datetime import datetime
from typing import Mapping

import h5py

from ..vocabulary import NOT_GIVEN

GENERAL_KEYS = ("user", "process", "instrument")
_STRING_DTYPE = h5py.string_dtype("utf-8")


def write_general(h5: h5py.File, general: Mapping[str, str], created: str) -> None:
    group = h5.create_group("general")
    group.create_dataset("created", data=created, dtype=_STRING_DTYPE)
    for key in GENERAL_KEYS:
        group.create_dataset(key, data=general.get(key) or NOT_GIVEN, dtype=_STRING_DTYPE)
    if "channels" in general:  # the selection as given; empty: every channel
        group.create_dataset("channels", data=general["channels"], dtype=_STRING_DTYPE)


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
