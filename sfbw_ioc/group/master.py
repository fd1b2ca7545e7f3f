"""The master file of a group acquisition: one HDF5 file that reads every member's data.

    /general/created, user, process, instrument    as in a member's file
    /general/members       one row per member: prefix, file, status, written, missing,
                           lost, message (status: written, failed or absent)
    /members/<name>        external link to the root of that member's file
    /data/<channel>        external link to /data/<channel> of the member file that has it

The links hold the member files' absolute paths (their LAST_FILE): a master is read
where the member files are visible under the same paths (a shared file system).
A channel that two members both send is linked from the first member (``--member``
order); the others' copies stay reachable under /members/<name>/data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

# The same /general layout, timestamps and durability as a member's file, by the same code.
from ..hdf5.general import now, write_general
from ..output.root import partial_path, publish

log = logging.getLogger(__name__)

WRITTEN, FAILED, ABSENT = "written", "failed", "absent"
_STR = h5py.string_dtype("utf-8")
_MEMBERS_DTYPE = np.dtype([("prefix", _STR), ("file", _STR), ("status", _STR),
                           ("written", np.int64), ("missing", np.int64), ("lost", np.int64),
                           ("message", _STR)])


@dataclass(frozen=True, slots=True)
class MemberOutcome:
    """What one member contributed to a group acquisition."""

    prefix: str
    name: str  # its file-name form, also its name under /members
    status: str  # WRITTEN, FAILED or ABSENT
    file: str = ""  # the member's completed file (its LAST_FILE), "" if none
    written: int = 0
    missing: int = 0
    lost: int = 0
    message: str = ""


@dataclass(frozen=True, slots=True)
class MasterSummary:
    path: Path
    channels: int
    duplicates: list[str]  # "channel (member)" not linked under /data: taken already


def write_master(path: Path, general: Mapping[str, str],
                 outcomes: Sequence[MemberOutcome]) -> MasterSummary:
    """Write the master file at ``path`` (never over an existing file; written as
    ``.partial`` first). Blocking: call it from an executor."""
    partial = partial_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(partial, "x") as h5:
        write_general(h5, general, created=now())
        h5["general"].create_dataset("members", data=_members_table(outcomes))
        channels, duplicates = _link_members(h5, outcomes)
    publish(partial, path)
    log.info("master %s: %d channels of %d members", path, channels, len(outcomes))
    return MasterSummary(path, channels, duplicates)


def _members_table(outcomes: Sequence[MemberOutcome]) -> np.ndarray:
    return np.array([(o.prefix, o.file, o.status, o.written, o.missing, o.lost, o.message)
                     for o in outcomes], dtype=_MEMBERS_DTYPE)


def _link_members(h5: h5py.File, outcomes: Sequence[MemberOutcome]) -> tuple[int, list[str]]:
    data, members = h5.create_group("data"), h5.create_group("members")
    duplicates: list[str] = []
    for outcome in outcomes:
        if not outcome.file:
            continue
        members[outcome.name] = h5py.ExternalLink(outcome.file, "/")
        for channel in _channels_of(outcome):
            if channel in data:
                duplicates.append(f"{channel} ({outcome.prefix})")
                continue
            data[channel] = h5py.ExternalLink(outcome.file, f"/data/{channel}")
    return len(data), duplicates


def _channels_of(outcome: MemberOutcome) -> list[str]:
    try:
        with h5py.File(outcome.file, "r") as member:
            return list(member["data"].keys()) if "data" in member else []
    except OSError as error:
        # The member reported a file the group cannot read: linked under /members only.
        log.error("cannot read %s of %s: %s", outcome.file, outcome.prefix, error)
        return []

