"""Building messages in the reference sender's format (the Python bsread sender):
``Encoder`` for a stream (each distinct data header serialised and hashed once),
``encode_message`` for one message.
"""
from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from .compression import compress
from .headers import header_hash
from .types import (COMPRESSIONS, NS_PER_SECOND, TIMESTAMP_STRUCTS, ChannelSpec,
                    wire_dtype)


class Encoder:
    """Builds messages in the reference sender's format.

    The data header is serialised, compressed and hashed once per distinct declaration
    and reused, so a steady stream pays per message only for its main header and values.
    """

    def __init__(self, dh_compression: str = "none", cache_size: int = 16) -> None:
        if dh_compression not in COMPRESSIONS:
            raise ValueError(f"unknown data header compression {dh_compression!r}")
        self.dh_compression = dh_compression
        self._cache_size = cache_size
        self._headers: OrderedDict[tuple[ChannelSpec, ...], tuple[bytes, str]] = OrderedDict()

    def encode(
        self,
        pulse_id: int,
        global_timestamp_ns: int,
        channels: Sequence[tuple[ChannelSpec, Any, int]],
    ) -> list[bytes]:
        """``channels``: (spec, value or None, timestamp_ns) in data-header order."""
        declared = tuple(
            spec if value is not None else _absent_spec(spec) for spec, value, _ in channels
        )
        data_header, digest = self._data_header(declared)
        parts = [self._main_header(pulse_id, global_timestamp_ns, digest), data_header]
        for spec, value, timestamp_ns in channels:
            parts.extend(_encode_channel(spec, value, timestamp_ns))
        return parts

    def _main_header(self, pulse_id: int, global_timestamp_ns: int, digest: str) -> bytes:
        header: dict[str, Any] = {"htype": "bsr_m-1.1"}
        if self.dh_compression != "none":
            header["dh_compression"] = self.dh_compression
        sec, ns = divmod(global_timestamp_ns, NS_PER_SECOND)
        header.update(hash=digest, pulse_id=pulse_id, global_timestamp={"sec": sec, "ns": ns})
        return json.dumps(header).encode()

    def _data_header(self, specs: tuple[ChannelSpec, ...]) -> tuple[bytes, str]:
        cached = self._headers.get(specs)
        if cached is None:
            text = json.dumps({"htype": "bsr_d-1.1", "channels": list(map(_channel_json, specs))})
            part = compress(text.encode(), self.dh_compression, 1, False)
            cached = self._headers[specs] = (part, header_hash(part))
            if len(self._headers) > self._cache_size:
                self._headers.popitem(last=False)
        return cached


def encode_message(
    pulse_id: int,
    global_timestamp_ns: int,
    channels: Sequence[tuple[ChannelSpec, Any, int]],
    dh_compression: str = "none",
) -> list[bytes]:
    """One message in the reference sender's format; see Encoder for a stream."""
    return Encoder(dh_compression).encode(pulse_id, global_timestamp_ns, channels)


def _absent_spec(spec: ChannelSpec) -> ChannelSpec:
    # What the reference sender declares for a channel without a value.
    return dataclasses.replace(spec, type="float64", shape=())


def _channel_json(spec: ChannelSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": spec.name,
        "type": spec.type,
        "shape": list(reversed(spec.shape)) or [1],
        "encoding": spec.encoding,
    }
    if spec.compression != "none":
        entry["compression"] = spec.compression
    return entry


def _encode_channel(spec: ChannelSpec, value: Any, timestamp_ns: int) -> tuple[bytes, bytes]:
    if value is None:
        return b"", b""
    itemsize = wire_dtype(spec).itemsize
    raw = compress(_value_bytes(spec, value), spec.compression, itemsize, spec.encoding == "big")
    sec, ns = divmod(timestamp_ns, NS_PER_SECOND)
    return raw, TIMESTAMP_STRUCTS[spec.encoding].pack(sec, ns)


def _value_bytes(spec: ChannelSpec, value: Any) -> bytes:
    if spec.type == "string":
        if not isinstance(value, str):
            raise TypeError(f"{spec.name}: string channel given {type(value).__name__}")
        return value.encode()
    array = np.asarray(value, dtype=wire_dtype(spec))
    if array.shape != spec.shape:
        raise ValueError(f"{spec.name}: value of shape {array.shape}, declared {spec.shape}")
    return array.tobytes()
