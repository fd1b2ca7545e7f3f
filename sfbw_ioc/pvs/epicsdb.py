"""The IOC's PVs as an EPICS database file (db/sfbw.db), generated from the PVGroup.

Archiver and alarm-handler configurations are written against record names and
fields; generating the file from the PV definitions keeps it from drifting.
"""
from __future__ import annotations

from caproto import ChannelType
from caproto.server import PVGroup

from .access import CONTROL
from .kinds import TextData

# mbbi state-string fields, in EPICS order.
_MBB_FIELDS = ("ZRST", "ONST", "TWST", "THST", "FRST", "FVST", "SXST", "SVST",
               "EIST", "NIST", "TEST", "ELST", "TVST", "TTST", "FTST", "FFST")
# A waveform's element type, from the pvproperty's dtype.
_FTVL = {ChannelType.CHAR: "CHAR", TextData: "CHAR", float: "DOUBLE",
         ChannelType.FLOAT: "FLOAT"}
DESC_LENGTH = 40  # DESC is a 41-byte string field in EPICS base


def record_fields(pv) -> dict[str, str]:
    """The EPICS fields of one pvproperty (a class attribute of a PVGroup)."""
    spec = pv.pvspec
    options = spec.cls_kwargs
    fields = {"DESC": spec.doc or ""}
    if not spec.read_only:  # as access.apply puts it: softIoc -a then enforces the same
        fields["ASG"] = CONTROL
    if spec.record in ("ai", "ao"):
        fields["PREC"] = str(options.get("precision", 0))
        if options.get("units"):
            fields["EGU"] = options["units"]
    elif spec.record == "bo":
        fields["ZNAM"], fields["ONAM"] = options["enum_strings"]
    elif spec.record in ("mbbi", "mbbo"):
        fields.update(zip(_MBB_FIELDS, options["enum_strings"]))
    elif spec.record == "waveform":
        fields["FTVL"] = _FTVL[spec.dtype]
        fields["NELM"] = str(spec.max_length)
    return fields


def pv_name(group: type[PVGroup], attr: str) -> str:
    """The PV name of attribute ``attr`` of ``group`` without the IOC's prefix;
    ``attr`` of a PV in a SubGroup is dotted ("LIVE1.NAME": "LIVE1:NAME")."""
    *path, last = attr.split(".")
    prefixes = ""
    for depth in range(1, len(path) + 1):
        subgroup = group._subgroups_[".".join(path[:depth])]
        prefixes += subgroup.prefix if subgroup.prefix is not None else subgroup.attr_name
    return prefixes + (group._pvs_[attr].pvspec.name or last)


def render(group: type[PVGroup], prefix_macro: str = "$(P)",
           aliased: str | None = None,
           command: str = "python -m sfbw_ioc.cli --write-db db/sfbw.db") -> str:
    """The database text for every PV of ``group``, in definition order; the PVs of its
    SubGroup ``aliased`` also get an alias without that SubGroup's prefix. The header
    names the ``command`` that writes the file."""
    lines = [f"# Generated from {group.__module__}.{group.__qualname__}: {command}", ""]
    for attr, pv in group._pvs_.items():
        name = pv_name(group, attr)
        lines.append(f'record({pv.pvspec.record}, "{prefix_macro}{name}") {{')
        for field, value in record_fields(pv).items():
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'    field({field}, "{escaped}")')
        lines.append("}")
        if aliased is not None and attr.startswith(aliased + "."):
            alias = name[len(group._subgroups_[aliased].prefix):]
            lines.append(f'alias("{prefix_macro}{name}", "{prefix_macro}{alias}")')
    return "\n".join(lines) + "\n"
