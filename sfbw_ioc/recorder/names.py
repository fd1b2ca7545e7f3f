"""The list of PVs to record: ``--record-pvs FILE`` and a writer's ``RECORD_PVS``.

The file has one PV a line, ``#`` starts a comment, and a line may give an alias
(``NAME ALIAS``): the name of the PV's group in the file. ``RECORD_PVS`` holds names
separated by spaces or newlines; there ``NAME=ALIAS`` gives an alias, which is also how
the list is shown in it. A name is a Channel Access PV's, or, with the prefix ``pva://``,
a PV Access PV's; its group in the file is named without the prefix.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# The characters of EPICS record names, '.' for a field, and what CA gateways add.
_PV_NAME = re.compile(r"[A-Za-z0-9_\-+:\[\]<>;.{}$()]+")
_MAX_NAME = 256
PVA_PREFIX = "pva://"


class PvListError(ValueError):
    """The list names something that is not a recordable PV; the text says why."""


@dataclass(frozen=True, slots=True)
class RecordedPv:
    """A PV to record and the name of its group under ``/epics`` in the file."""

    name: str
    alias: str | None = None

    @property
    def is_pva(self) -> bool:
        return self.name.startswith(PVA_PREFIX)

    @property
    def channel(self) -> str:
        """The name its protocol knows it by (without ``pva://``)."""
        return self.name.removeprefix(PVA_PREFIX)

    @property
    def label(self) -> str:
        return self.alias or self.channel

    def __str__(self) -> str:
        return self.name if self.alias is None else f"{self.name}={self.alias}"


def check_name(name: str) -> None:
    """``PvListError`` unless ``name`` is a Channel Access PV name, or one with the prefix
    ``pva://`` (PV Access: the same characters, as the IOCs' record names are)."""
    channel = name.removeprefix(PVA_PREFIX)
    if len(channel) > _MAX_NAME:
        raise PvListError(f"{name[:40]!r}...: a PV name has at most {_MAX_NAME} characters")
    if not _PV_NAME.fullmatch(channel) or channel.startswith("."):
        raise PvListError(f"{name!r} is not a valid PV name")


def _check_alias(alias: str) -> None:
    # An alias names an HDF5 group: no '/' (it would nest), not '.' or '..'.
    if not alias or "/" in alias or alias.strip(".") == "":
        raise PvListError(f"{alias!r} cannot name a group in the file")


def _checked(pvs: Iterable[RecordedPv]) -> tuple[RecordedPv, ...]:
    seen: dict[str, RecordedPv] = {}
    for pv in pvs:
        check_name(pv.name)
        if pv.alias is not None:
            _check_alias(pv.alias)
        if pv.label in seen:
            raise PvListError(f"{pv.label!r} is listed twice")
        seen[pv.label] = pv
    return tuple(seen.values())


def parse_file(text: str) -> tuple[RecordedPv, ...]:
    """The PVs of a ``--record-pvs`` file's ``text``."""
    pvs = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if len(words) > 2:
            raise PvListError(f"line {number}: give a PV name and at most an alias, "
                              f"not {line.strip()!r}")
        if words:
            pvs.append(RecordedPv(words[0], words[1] if len(words) == 2 else None))
    return _checked(pvs)


def parse_pv_text(text: str) -> tuple[RecordedPv, ...]:
    """The PVs of a ``RECORD_PVS`` value."""
    pvs = []
    for word in text.split():
        name, _, alias = word.partition("=")
        pvs.append(RecordedPv(name, alias if "=" in word else None))
    return _checked(pvs)


def pv_text(pvs: Iterable[RecordedPv]) -> str:
    """``pvs`` as ``RECORD_PVS`` shows them (``parse_pv_text`` reads it back)."""
    return "\n".join(str(pv) for pv in pvs)
