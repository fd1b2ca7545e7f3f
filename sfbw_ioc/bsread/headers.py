"""The two headers of a bsread message: the main header (JSON, parsed for every
message) and the data header (JSON, possibly compressed, declaring the channels),
which ``HeaderCache`` parses only when its hash changes.

Both are checked as hostile input: bounded in size, of the right ``htype``, every
field of the right type; a data header's channels are usable as HDF5 group names and
their values bounded in size.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, Collection

from .compression import decompress
from .types import (BSREAD_TYPES, COMPRESSIONS, ENCODINGS, MAX_DATA_HEADER_BYTES,
                    MAX_MAIN_HEADER_BYTES, MAX_SHAPE_DIMS, MAX_VALUE_BYTES, NS_PER_SECOND, Buffer,
                    ChannelSpec, DataHeader, MainHeader, MalformedMessage, value_nbytes)

_MAX_PULSE_ID = 1 << 63


def header_hash(part: Buffer) -> str:
    """The main header's ``hash`` of a data header part: the hex md5 of its bytes."""
    return hashlib.md5(part, usedforsecurity=False).hexdigest()


def parse_main_header(part: Buffer) -> MainHeader:
    """Parse the first part of a message; raises MalformedMessage("main_header", ...)."""
    obj = _load_header(part, "main_header", MAX_MAIN_HEADER_BYTES, "bsr_m")
    pulse_id = obj.get("pulse_id")
    # type(), not isinstance(): JSON true would otherwise pass as pulse id 1.
    if type(pulse_id) is not int or not 0 <= pulse_id < _MAX_PULSE_ID:
        raise MalformedMessage("main_header", f"pulse_id {pulse_id!r} is not a 64-bit id")
    digest = obj.get("hash")
    if not isinstance(digest, str) or not digest:
        raise MalformedMessage("main_header", f"hash {digest!r} is not a string")
    compression = _compression(obj.get("dh_compression"), "main_header")
    timestamp_ns = _global_timestamp_ns(obj.get("global_timestamp"))
    return MainHeader(pulse_id, timestamp_ns, digest, compression)


def _load_header(part: Buffer, kind: str, limit: int, htype: str) -> dict[str, Any]:
    """A header's JSON object, bounded in size and checked to be of its ``htype``."""
    if len(part) > limit:
        raise MalformedMessage(kind, f"{len(part)} bytes, limit {limit}")
    obj = _load_json(part, kind)
    found = obj.get("htype")
    if not isinstance(found, str) or not found.startswith(htype):
        raise MalformedMessage(kind, f"htype {found!r} is not {htype}")
    return obj


def _load_json(part: Buffer, kind: str) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(part))
    # UnicodeDecodeError is a ValueError; absurd nesting exhausts the recursion limit.
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(kind, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(kind, "not a JSON object")
    return obj


def _global_timestamp_ns(stamp: Any) -> int:
    if stamp is None:
        return 0  # unknown; the pulse id still orders the message
    if not isinstance(stamp, dict):
        raise MalformedMessage("main_header", f"global_timestamp {stamp!r} is not an object")
    sec, ns = stamp.get("sec", 0), stamp.get("ns", 0)
    if type(sec) is not int or type(ns) is not int or sec < 0 or ns < 0:
        raise MalformedMessage("main_header", f"global_timestamp {stamp!r} is not sec/ns")
    return sec * NS_PER_SECOND + ns


def _compression(value: Any, kind: str) -> str:
    if value is None:
        return "none"
    if not isinstance(value, str) or value not in COMPRESSIONS:
        raise MalformedMessage(kind, f"unknown compression {value!r}")
    return value


def parse_data_header(part: Buffer, compression: str) -> DataHeader:
    """Parse the second part of a message (``compression`` from the main header)."""
    return _parse_data_header(part, compression, header_hash(part))


def _parse_data_header(part: Buffer, compression: str, digest: str) -> DataHeader:
    try:
        raw = decompress(part, compression, 1, None, MAX_DATA_HEADER_BYTES, False)
    except MalformedMessage as exc:
        raise MalformedMessage("data_header", exc.detail) from None
    obj = _load_header(raw, "data_header", MAX_DATA_HEADER_BYTES, "bsr_d")
    channels = obj.get("channels")
    if not isinstance(channels, list):
        raise MalformedMessage("data_header", "channels is not a list")
    specs = tuple(map(_parse_channel, channels))
    if len({spec.name for spec in specs}) != len(specs):
        raise MalformedMessage("data_header", "duplicate channel names")
    return DataHeader(digest, specs)


def _parse_channel(obj: Any) -> ChannelSpec:
    if not isinstance(obj, dict):
        raise MalformedMessage("data_header", f"channel {obj!r} is not an object")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedMessage("data_header", f"channel name {name!r} is not a string")
    if not _usable_name(name):
        raise MalformedMessage("data_header", f"channel name {name!r} cannot name an HDF5 group")
    try:
        spec = ChannelSpec(
            name,
            _channel_type(obj.get("type")),
            _channel_shape(obj.get("shape")),
            _channel_encoding(obj.get("encoding")),
            _compression(obj.get("compression"), "data_header"),
        )
    except MalformedMessage as exc:
        raise MalformedMessage("data_header", f"channel {name!r}: {exc.detail}") from None
    if (value_nbytes(spec) or 0) > MAX_VALUE_BYTES:
        raise MalformedMessage(
            "data_header", f"channel {name!r}: value of over {MAX_VALUE_BYTES} bytes"
        )
    return spec


def _usable_name(name: str) -> bool:
    """Names become HDF5 group names (with '/' escaped): UTF-8, no NUL, not '.'/'..'."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, which json.loads lets through
        return False
    return "\0" not in name and name not in (".", "..")


def _channel_type(value: Any) -> str:
    return _one_of(value, BSREAD_TYPES, "float64", "type")


def _channel_shape(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(type(d) is int and d > 0 for d in value):
        raise MalformedMessage("data_header", f"shape {value!r} is not a list of sizes")
    if len(value) > MAX_SHAPE_DIMS:
        raise MalformedMessage("data_header", f"shape of {len(value)} dimensions")
    shape = tuple(reversed(value))  # the wire lists the fastest dimension first
    return () if shape == (1,) else shape


def _channel_encoding(value: Any) -> str:
    return _one_of(value, ENCODINGS, "little", "encoding")


def _one_of(value: Any, allowed: Collection[str], default: str, what: str) -> str:
    """A declared name, compared case-insensitively; ``default`` when not declared."""
    if value is None:
        return default
    name = value.lower() if isinstance(value, str) else None
    if name not in allowed:
        raise MalformedMessage("data_header", f"unknown {what} {value!r}")
    return name


class HeaderCache:
    """Data headers by hash: the sender repeats the header with every message, so it is
    parsed (and its hash checked) only when the hash was not seen recently.

    A few headers are kept, not one, because a stream can alternate between headers (a
    channel that has no value in every other pulse changes the declared type).
    """

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._headers: OrderedDict[tuple[str, str], DataHeader] = OrderedDict()
        self.parses = 0  # data headers actually parsed, for tests and statistics

    def get(self, main: MainHeader, part: Buffer) -> DataHeader:
        key = (main.hash, main.dh_compression)
        header = self._headers.get(key)
        if header is not None:
            self._headers.move_to_end(key)
            return header
        digest = header_hash(part)
        if digest != main.hash:
            raise MalformedMessage(
                "data_header_hash", f"md5 {digest} != main header hash {main.hash!r}"
            )
        self.parses += 1
        header = _parse_data_header(part, main.dh_compression, digest)
        self._headers[key] = header
        if len(self._headers) > self._size:
            self._headers.popitem(last=False)
        return header
