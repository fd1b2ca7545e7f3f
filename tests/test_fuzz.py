"""Fuzzing the bsread decoder and the receiver with hypothesis.

Every generated message starts as a VALID message (``encode_message`` over random
channels: every type, shapes, compressions, encodings, data-header compressions) and is
then mutated: byte flips, truncated / dropped / duplicated / reordered / replaced parts,
lying size prefixes in lz4 and bitshuffle_lz4 headers (2**62, 0, ...), data headers whose
shapes disagree with the value bytes, deeply nested and huge JSON, non-UTF-8 bytes, wrong
htype and hash. Pure random-bytes messages are mixed in.

Level 1 (pure): the receiver's parse path (``parse_main_header``, ``HeaderCache.get``,
``check_structure``: only ``MalformedMessage`` may come out) and the writer's
``decode_values`` (never raises), under tracemalloc and a clock.

Level 2 (real ZeroMQ sockets): a ``Receiver`` thread fed good messages interleaved with
fuzzed ones; the ring must hold exactly what the pure parse path accepts, MALFORMED must
count exactly what it rejects, and the thread must survive.

Normal run: ~200 pure cases and 30 socket batches, well under 30 s.
Long, opt-in run (10,000 pure cases and 200 socket batches):

    SFBW_FUZZ_EXAMPLES=10000 python -m pytest tests/test_fuzz.py -q

(add ``-s`` to see the summary line: cases, slowest case, largest peak allocation).
Hypothesis prints the failing example and its seed; no example database is written.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import struct
import sys
import time
import tracemalloc
from typing import Any

import bitshuffle
import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sfbw_ioc.testing.ioc import poll
from sfbw_ioc.testing.sources import CHANNELS, BsreadSource, timestamp_for, value_for
from receiving import RECEIVE_WAYS, receive_way
from sfbw_ioc.bsread import BSREAD_TYPES, COMPRESSIONS, ENCODINGS, ChannelSpec, DataHeader, HeaderCache, MalformedMessage, check_structure, corrupt_chunks, decode_values, encode_message, parse_data_header, parse_main_header
from sfbw_ioc.stream.malformed import MalformedCounter
from sfbw_ioc.stream.receiver import Receiver
from sfbw_ioc.stream.ring import RingBuffer

N_EXAMPLES = int(os.environ.get("SFBW_FUZZ_EXAMPLES") or 0)
PURE_EXAMPLES = N_EXAMPLES or 200
SOCKET_BATCHES = max(30, N_EXAMPLES // 50)
LONG = N_EXAMPLES > 0

MiB = 1 << 20
# What one case may allocate at its peak: the parsed JSON of a data header costs up to
# ~25 times its text (a text that bsread.MAX_DATA_HEADER_BYTES bounds), every value is
# held a few times (wire, decompressed, native order). A lying size must not add to it.
MEMORY_BASE = 128 * MiB
MEMORY_PER_MESSAGE_BYTE = 4
# A stall guard, not a speed target: the largest valid data header (4 MiB, ~120 000
# channels) takes ~0.6 s to parse here, and a case parses it three times; on a busy
# CI machine that reached 2.4 s.
MAX_CASE_SECONDS = 5.0

KINDS = {"main_header", "data_header", "data_header_hash", "part_count", "timestamp_size",
         "value_size", "compression", "string"}

pytestmark = pytest.mark.timeout(max(120, PURE_EXAMPLES // 10 + SOCKET_BATCHES * 2))

SETTINGS = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.filter_too_much],
)

STATS = {"pure_cases": 0, "socket_batches": 0, "socket_messages": 0, "max_peak": 0,
         "max_seconds": 0.0, "rejected": collections.Counter()}


@pytest.fixture(scope="module", autouse=True)
def summary():
    start = time.monotonic()
    yield
    sys.__stderr__.write(
        f"\nfuzz summary: {STATS['pure_cases']} pure cases, {STATS['socket_batches']} socket "
        f"batches ({STATS['socket_messages']} messages), slowest pure case "
        f"{STATS['max_seconds']:.3f} s, largest peak {STATS['max_peak'] / MiB:.1f} MiB, "
        f"wall {time.monotonic() - start:.1f} s, rejected by kind "
        f"{dict(STATS['rejected'])}\n")


# --- generated messages ------------------------------------------------------------------

TYPES = sorted(BSREAD_TYPES)
LIES = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


class Case:
    """A message under construction; its repr stays short (parts can be megabytes)."""

    def __init__(self, parts: list[bytes], channels: list[tuple[ChannelSpec, Any, int]],
                 pulse_id: int, dh_compression: str, mutations: list[str] | None = None):
        self.parts = parts
        self.channels = channels
        self.pulse_id = pulse_id
        self.dh_compression = dh_compression
        self.mutations = mutations or []

    def __repr__(self) -> str:
        sizes = [len(part) for part in self.parts]
        heads = [bytes(part[:48]) for part in self.parts[:2]]
        specs = [(spec.name, spec.type, spec.shape, spec.encoding, spec.compression,
                  value is None) for spec, value, _ in self.channels]
        return (f"Case(mutations={self.mutations}, part_sizes={sizes}, heads={heads}, "
                f"dh_compression={self.dh_compression!r}, channels={specs})")

    @property
    def nbytes(self) -> int:
        return sum(map(len, self.parts))


def compress(raw: bytes, compression: str, itemsize: int = 1, big: bool = False) -> bytes:
    """Our own copy of the wire's compressions (so that mutations can re-compress)."""
    if compression == "lz4":
        return len(raw).to_bytes(4, "big" if big else "little") + lz4.block.compress(
            raw, store_size=False)
    if compression == "bitshuffle_lz4":
        block = 8192 // itemsize
        body = bitshuffle.compress_lz4(np.frombuffer(raw, f"u{itemsize}"), block)
        return struct.pack(">QI", len(raw), block * itemsize) + body.tobytes()
    return raw


def channel_json(spec: ChannelSpec, present: bool) -> dict[str, Any]:
    type_, shape = (spec.type, spec.shape) if present else ("float64", ())
    entry = {"name": spec.name, "type": type_, "shape": list(reversed(shape)) or [1],
             "encoding": spec.encoding}
    if spec.compression != "none":
        entry["compression"] = spec.compression
    return entry


def random_value(spec: ChannelSpec, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(BSREAD_TYPES[spec.type])
    count = int(np.prod(spec.shape, dtype=np.int64))
    if spec.type == "bool":
        return rng.integers(0, 2, count).astype(bool).reshape(spec.shape)
    # Any bit pattern, NaN payloads included.
    return np.frombuffer(rng.bytes(count * dtype.itemsize), dtype).reshape(spec.shape).copy()


SHAPES = st.one_of(
    st.just(()),
    st.tuples(st.integers(2, 300)),
    st.tuples(st.integers(2, 20), st.integers(2, 20)),
    st.tuples(st.integers(2, 5), st.integers(2, 5), st.integers(2, 5)),
    st.sampled_from([(5003,), (33, 260)]),  # several bitshuffle blocks plus a remainder
)


@st.composite
def channels(draw, index: int) -> tuple[ChannelSpec, Any, int]:
    type_ = draw(st.sampled_from(TYPES))
    # Unicode and unique; NUL and lone surrogates (not UTF-8) are left out: they cannot
    # name an HDF5 group, so a message with them is malformed (the name_escape mutation).
    name = draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                        max_size=10)) + f"#{index}"
    shape = () if type_ == "string" else draw(SHAPES)
    spec = ChannelSpec(name, type_, shape, draw(st.sampled_from(ENCODINGS)),
                       draw(st.sampled_from(COMPRESSIONS)))
    timestamp = draw(st.integers(0, 2**63 - 1))
    if draw(st.integers(0, 6)) == 0:
        return spec, None, timestamp
    if type_ == "string":
        value = draw(st.text(max_size=40)) * draw(st.sampled_from([1, 1, 3, 500]))
    else:
        value = random_value(spec, draw(st.integers(0, 2**32 - 1)))
    return spec, value, timestamp


@st.composite
def valid_messages(draw) -> Case:
    count = draw(st.integers(0, 5))
    chans = [draw(channels(index)) for index in range(count)]
    pulse_id = draw(st.one_of(st.integers(0, 2**63 - 1), st.integers(10**10, 10**10 + 10**6)))
    dh_compression = draw(st.sampled_from(COMPRESSIONS))
    stamp = draw(st.integers(0, 2**63 - 1))
    parts = encode_message(pulse_id, stamp, chans, dh_compression)
    return Case(parts, chans, pulse_id, dh_compression)


# --- mutations -----------------------------------------------------------------------------


def main_json(case: Case) -> dict[str, Any] | None:
    try:
        obj = json.loads(case.parts[0])
    except (ValueError, IndexError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def set_main(case: Case, obj: dict[str, Any] | bytes) -> None:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    if case.parts:
        case.parts[0] = raw
    else:
        case.parts.append(raw)


def rehash(case: Case) -> None:
    """Make the main header's hash match the (changed) data header part."""
    obj = main_json(case)
    if obj is not None and len(case.parts) > 1:
        obj["hash"] = hashlib.md5(case.parts[1]).hexdigest()
        set_main(case, obj)


def set_data_header(draw, case: Case, text: bytes | dict) -> None:
    raw = text if isinstance(text, bytes) else json.dumps(text).encode()
    part = compress(raw, case.dh_compression)
    if len(case.parts) < 2:
        case.parts[len(case.parts):] = [b""] * (2 - len(case.parts))
    case.parts[1] = part
    if draw(st.integers(0, 9)):  # mostly: the hash is right, so the header gets parsed
        rehash(case)


def header_channels(case: Case) -> list[dict[str, Any]]:
    return [channel_json(spec, value is not None) for spec, value, _ in case.channels]


def value_index(draw, case: Case, compression: str | None = None) -> int | None:
    """Part index of a present channel value (of the given compression), if any."""
    indices = [2 + 2 * i for i, (spec, value, _) in enumerate(case.channels)
               if value is not None and (compression is None or spec.compression == compression)
               and 2 + 2 * i < len(case.parts)]
    return draw(st.sampled_from(indices)) if indices else None


def m_flip(draw, case: Case) -> None:
    index = draw(st.integers(0, len(case.parts) - 1))
    part = bytearray(case.parts[index])
    if part:
        for _ in range(draw(st.integers(1, 8))):
            part[draw(st.integers(0, len(part) - 1))] ^= draw(st.integers(1, 255))
    case.parts[index] = bytes(part)


def m_truncate(draw, case: Case) -> None:
    index = draw(st.integers(0, len(case.parts) - 1))
    part = case.parts[index]
    case.parts[index] = part[: draw(st.integers(0, max(len(part) - 1, 0)))]


def m_drop(draw, case: Case) -> None:
    del case.parts[draw(st.integers(0, len(case.parts) - 1))]


def m_duplicate(draw, case: Case) -> None:
    index = draw(st.integers(0, len(case.parts) - 1))
    case.parts.insert(draw(st.integers(0, len(case.parts))), case.parts[index])


def m_reorder(draw, case: Case) -> None:
    if draw(st.booleans()):
        i, j = draw(st.integers(0, len(case.parts) - 1)), draw(st.integers(0, len(case.parts) - 1))
        case.parts[i], case.parts[j] = case.parts[j], case.parts[i]
    else:
        case.parts[:] = draw(st.permutations(case.parts))


def m_replace(draw, case: Case) -> None:
    index = draw(st.integers(0, len(case.parts) - 1))
    if draw(st.booleans()):
        case.parts[index] = draw(st.binary(max_size=64))
    else:
        size = draw(st.sampled_from([12, 16, 100, 4096, 65536, 1 << 20]))
        case.parts[index] = np.random.default_rng(draw(st.integers(0, 2**32))).bytes(size)


def m_part_count(draw, case: Case) -> None:
    if draw(st.booleans()):
        case.parts.extend([b""] * draw(st.integers(1, 4)))
    else:
        del case.parts[max(2, len(case.parts) - 2 * draw(st.integers(1, 3))):]


def m_timestamp(draw, case: Case) -> None:
    stamps = [3 + 2 * i for i in range(len(case.channels)) if 3 + 2 * i < len(case.parts)]
    if stamps:
        index = draw(st.sampled_from(stamps))
        case.parts[index] = b"\1" * draw(st.sampled_from([0, 1, 8, 15, 17, 32]))


def lie(draw, honest: int, bits: int) -> int:
    size = draw(st.sampled_from(LIES + [honest - 1, honest + 1, honest * 2, honest * 255,
                                        honest * 256, honest // 2]))
    return max(0, size) % (1 << bits)


def m_lz4_size(draw, case: Case) -> None:
    """A lying 4-byte lz4 size prefix, in either byte order (value or data header)."""
    index = value_index(draw, case, "lz4")
    if index is None and case.dh_compression == "lz4" and len(case.parts) > 1:
        index = 1
    if index is None or len(case.parts[index]) < 4:
        return
    part = case.parts[index]
    order = draw(st.sampled_from(["little", "big"]))
    size = lie(draw, int.from_bytes(part[:4], order), 32)
    case.parts[index] = size.to_bytes(4, order) + part[4:]
    if index == 1 and draw(st.booleans()):
        rehash(case)


def m_bslz4_header(draw, case: Case) -> None:
    """A lying bitshuffle_lz4 header: 8-byte size, 4-byte block size or a block prefix."""
    index = value_index(draw, case, "bitshuffle_lz4")
    if index is None and case.dh_compression == "bitshuffle_lz4" and len(case.parts) > 1:
        index = 1
    if index is None or len(case.parts[index]) < 12:
        return
    part = case.parts[index]
    nbytes, block = struct.unpack_from(">QI", part)
    what = draw(st.sampled_from(["size", "block", "both", "prefix"]))
    if what in ("size", "both"):
        nbytes = lie(draw, nbytes, 64)
    if what in ("block", "both"):
        block = draw(st.sampled_from([0, 1, 7, 8, 16, 24, 64, 8192, 2**31, 0xFFFFFFC0,
                                      0xFFFFFFFF])) if draw(st.booleans()) else lie(draw, block, 32)
    part = struct.pack(">QI", nbytes, block) + part[12:]
    if what == "prefix" and len(part) >= 16:
        (length,) = struct.unpack_from(">I", part, 12)
        part = part[:12] + struct.pack(">I", lie(draw, length, 32)) + part[16:]
    case.parts[index] = part
    if index == 1 and draw(st.booleans()):
        rehash(case)


def m_shape(draw, case: Case) -> None:
    """Declare a channel with a shape (or type/encoding/compression) its bytes do not have."""
    if not case.channels:
        return
    entries = header_channels(case)
    index = draw(st.integers(0, len(entries) - 1))
    entry = entries[index]
    change = draw(st.sampled_from(["shape", "shape", "huge", "huge", "dims", "type", "encoding",
                                   "compression", "bad"]))
    if change == "shape":
        entry["shape"] = draw(st.lists(st.integers(1, 300), min_size=1, max_size=3))
    elif change == "huge":  # byte counts up to (and beyond) the 1 GiB value bound
        entry["shape"] = draw(st.sampled_from(
            [[2**30], [2**27], [2**30 // 8], [1 << 15, 1 << 15], [2**40], [2**62, 2**62],
             [2**31 - 1, 3]]))
    elif change == "dims":
        entry["shape"] = [1] * draw(st.sampled_from([2, 31, 32, 33, 63, 64, 65, 100, 10_000]))
    elif change == "type":
        entry["type"] = draw(st.sampled_from(TYPES + ["FLOAT32", "int128", "", 5, None]))
    elif change == "encoding":
        entry["encoding"] = draw(st.sampled_from(["little", "big", "BIG", "middle", 1]))
    elif change == "compression":
        entry["compression"] = draw(st.sampled_from(list(COMPRESSIONS) + ["zstd", None, 0]))
    else:
        entry["shape"] = draw(st.sampled_from([[0], [-1], [2.5], [True], 3, "3", [], {}, None]))
    set_data_header(draw, case, {"htype": "bsr_d-1.1", "channels": entries})
    if change == "huge" and draw(st.booleans()):
        lie_to_match(draw, case, index, entry)


def lie_to_match(draw, case: Case, index: int, entry: dict[str, Any]) -> None:
    """Make a compressed value's size header agree with its (huge) declared shape."""
    part_index = 2 + 2 * index
    spec = case.channels[index][0]
    if part_index >= len(case.parts) or spec.compression == "none":
        return
    itemsize = np.dtype(BSREAD_TYPES.get(entry.get("type"), "f8")).itemsize
    nbytes = int(np.prod(entry["shape"], dtype=object)) * itemsize
    part = case.parts[part_index]
    if spec.compression == "lz4":
        order = "big" if spec.encoding == "big" else "little"
        case.parts[part_index] = (nbytes % 2**32).to_bytes(4, order) + part[4:]
    else:
        block = draw(st.sampled_from([8192, 0xFFFFFFF8, 8 * itemsize]))
        rest = part[12:] if len(part) > 12 else struct.pack(">I", 4) + b"\0" * 4
        case.parts[part_index] = struct.pack(">QI", nbytes % 2**64, block) + rest


def nested(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "0" + "}" * depth)


def m_deep_json(draw, case: Case) -> None:
    depth = draw(st.one_of(st.integers(1, 1100), st.sampled_from([5000, 100_000])))
    text = nested(depth, draw(st.sampled_from(["list", "dict"])))
    where = draw(st.sampled_from(["main", "main_field", "data", "data_field", "shape"]))
    if where == "main":
        set_main(case, text.encode())
    elif where == "main_field":
        obj = main_json(case) or {"htype": "bsr_m-1.1", "hash": "x", "pulse_id": 1}
        key = draw(st.sampled_from(["htype", "hash", "pulse_id", "global_timestamp", "extra"]))
        set_main(case, json.dumps(obj)[:-1].encode() + f', "{key}": {text}}}'.encode())
    elif where == "data":
        set_data_header(draw, case, text.encode())
    else:
        entries = header_channels(case) or [{"name": "X"}]
        if where == "shape":
            entries[0]["shape"] = "@"
        head = json.dumps({"htype": "bsr_d-1.1", "channels": entries})
        head = head.replace('"@"', text) if where == "shape" else head[:-1] + f', "x": {text}}}'
        set_data_header(draw, case, head.encode())


def junk(size: int, pattern: str) -> str:
    """JSON of about ``size`` bytes that costs a lot to parse."""
    if pattern == "dicts":
        return "[" + "{}," * (size // 3) + "{}]"
    if pattern == "lists":
        return "[" + "[0]," * (size // 4) + "[0]]"
    if pattern == "floats":
        return "[" + "1.5," * (size // 4) + "1.5]"
    return json.dumps("x" * size)


def m_huge_json(draw, case: Case) -> None:
    size = draw(st.sampled_from([1 << 10, 1 << 16, 60 << 10, 1 << 20, 3 << 20, 8 << 20]
                                + [20 << 20] * LONG))
    pattern = draw(st.sampled_from(["dicts", "lists", "floats", "string"]))
    where = draw(st.sampled_from(["main", "data", "channels"]))
    if where == "main":
        obj = main_json(case) or {"htype": "bsr_m-1.1", "hash": "x", "pulse_id": 1}
        set_main(case, json.dumps(obj)[:-1].encode() + f', "x": {junk(size, pattern)}}}'.encode())
    elif where == "data":
        head = json.dumps({"htype": "bsr_d-1.1", "channels": header_channels(case)})
        set_data_header(draw, case, (head[:-1] + f', "x": {junk(size, pattern)}}}').encode())
    else:  # many (valid) channels: the part count cannot match
        count = min(size // 20, 200_000)
        entries = [{"name": f"c{i}", "shape": [1]} for i in range(count)]
        set_data_header(draw, case, {"htype": "bsr_d-1.1", "channels": entries})


BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]


def m_not_utf8(draw, case: Case) -> None:
    bad = draw(st.sampled_from(BAD_UTF8))
    where = draw(st.sampled_from(["string", "main", "data", "name_escape"]))
    strings = [(i, spec) for i, (spec, value, _) in enumerate(case.channels)
               if spec.type == "string" and value is not None and 2 + 2 * i < len(case.parts)]
    if where == "string" and strings:
        i, spec = draw(st.sampled_from(strings))
        raw = draw(st.binary(max_size=8)) + bad + draw(st.binary(max_size=8))
        case.parts[2 + 2 * i] = compress(raw, spec.compression, 1, spec.encoding == "big")
    elif where == "main" and case.parts:
        part = case.parts[0]
        at = part.find(b'"hash": "')
        at = at + 9 if at >= 0 else draw(st.integers(0, len(part)))
        case.parts[0] = part[:at] + bad + part[at:]
    elif where in ("data", "name_escape"):
        entries = header_channels(case) or [{"name": "X"}]
        entries[0]["name"] = "@"
        text = json.dumps({"htype": "bsr_d-1.1", "channels": entries}).encode()
        name = bad if where == "data" else draw(st.sampled_from([b"\\ud800", b"\\udfff", b"a\\ud83d"]))
        set_data_header(draw, case, text.replace(b'"@"', b'"' + name + b'"'))


def m_htype(draw, case: Case) -> None:
    htype = draw(st.sampled_from(["bsr_d-1.1", "bsr_m-1.1", "", "BSR_M", None, 5, ["bsr_m"]]))
    if draw(st.booleans()):
        obj = main_json(case)
        if obj is not None:
            obj["htype"] = htype
            set_main(case, obj)
    else:
        set_data_header(draw, case, {"htype": htype, "channels": header_channels(case)})


def m_hash(draw, case: Case) -> None:
    obj = main_json(case)
    if obj is None:
        return
    obj["hash"] = draw(st.sampled_from([
        "", 5, None, "0" * 32, hashlib.md5(b"other").hexdigest(),
        hashlib.md5(encode_message(1, 0, [(CHANNELS[0], 1.0, 0)])[1]).hexdigest()]))
    set_main(case, obj)


def m_main_fields(draw, case: Case) -> None:
    obj = main_json(case)
    if obj is None:
        return
    key = draw(st.sampled_from(["pulse_id", "global_timestamp", "dh_compression"]))
    obj[key] = draw(st.sampled_from([
        -1, 2**63, 2**64, 1.5, True, "7", None, {"sec": -1}, {"sec": 1.5, "ns": 0},
        {"sec": 2**80, "ns": 2**80}, "lz4", "bitshuffle_lz4", "none", "zip", 2**200]))
    set_main(case, obj)


MUTATIONS = {f.__name__[2:]: f for f in [
    m_flip, m_truncate, m_drop, m_duplicate, m_reorder, m_replace, m_part_count, m_timestamp,
    m_lz4_size, m_bslz4_header, m_shape, m_deep_json, m_huge_json, m_not_utf8, m_htype, m_hash,
    m_main_fields]}


@st.composite
def fuzzed_messages(draw, min_mutations: int = 1) -> Case:
    case = draw(valid_messages())
    for _ in range(draw(st.integers(min_mutations, 3))):
        name = draw(st.sampled_from(sorted(MUTATIONS)))
        if not case.parts:
            case.parts.append(b"")
        MUTATIONS[name](draw, case)
        case.mutations.append(name)
    return case


@st.composite
def random_messages(draw) -> Case:
    parts = draw(st.lists(st.binary(max_size=200), min_size=1, max_size=8))
    if draw(st.booleans()):  # a plausible main header in front of random parts
        digest = hashlib.md5(parts[0]).hexdigest() if draw(st.booleans()) else "x"
        parts.insert(0, json.dumps({"htype": "bsr_m-1.1", "pulse_id": 1, "hash": digest}).encode())
    return Case(parts, [], 0, "none", ["random"])


def messages(min_mutations: int = 0):
    return st.one_of(fuzzed_messages(min_mutations), random_messages())


# --- the checks ----------------------------------------------------------------------------


def receiver_verdict(parts: list[bytes], cache: HeaderCache) -> MalformedMessage | DataHeader:
    """What the receiver does with a message: the header it accepts it with, or the error.

    Anything but MalformedMessage propagates (and fails the test)."""
    try:
        if len(parts) < 2:
            raise MalformedMessage("part_count", f"{len(parts)} parts, need at least 2")
        main = parse_main_header(parts[0])
        header = cache.get(main, parts[1])
        check_structure(header, parts)
    except MalformedMessage as error:
        assert error.kind in KINDS, error
        return error
    return header


def check_decoded(header: DataHeader, parts: list[bytes]):
    values, errors = decode_values(header, parts)  # must never raise
    assert len(values) == len(header.channels)
    assert all(isinstance(error, MalformedMessage) and error.kind in KINDS for error in errors)
    for value, spec in zip(values, header.channels):
        assert value.spec == spec
        if value.value is None:
            assert value.timestamp_ns == 0
        elif spec.type == "string":
            assert isinstance(value.value, str)
        else:
            assert isinstance(value.value, np.ndarray), value
            assert value.value.shape == spec.shape and value.value.dtype.isnative
            assert value.value.dtype.itemsize == np.dtype(BSREAD_TYPES[spec.type]).itemsize
    return values, errors


def assert_round_trip(case: Case, header, values, errors) -> None:
    assert isinstance(header, DataHeader), header
    assert errors == []
    for (spec, sent, stamp), value in zip(case.channels, values):
        if sent is None:
            assert value.value is None
        elif spec.type == "string":
            assert value.value == sent and value.timestamp_ns == stamp
        else:
            native = np.asarray(sent).astype(np.asarray(sent).dtype.newbyteorder("="))
            assert value.value.tobytes() == native.tobytes() and value.timestamp_ns == stamp


def pure_case(case: Case) -> MalformedMessage | DataHeader:
    parts = case.parts
    verdict = receiver_verdict(parts, HeaderCache())
    if isinstance(verdict, DataHeader):
        values, errors = check_decoded(verdict, parts)
        corrupt = corrupt_chunks(verdict, parts)  # never raises
        assert all(error.kind in KINDS for _, error in corrupt)
        if not case.mutations:
            assert_round_trip(case, verdict, values, errors)
    else:
        assert case.mutations, f"a valid message was rejected: {verdict}"
    # Go deeper than the receiver: the data header even when the hash does not match,
    # and the original header against the mutated values (what a stale cache would do).
    try:
        main = parse_main_header(parts[0]) if parts else None
        if main is not None and len(parts) > 1:
            check_decoded(parse_data_header(parts[1], main.dh_compression), parts)
    except MalformedMessage:
        pass
    if case.channels:
        original = encode_message(case.pulse_id, 0, case.channels, case.dh_compression)
        check_decoded(parse_data_header(original[1], case.dh_compression), parts)
    return verdict


def handmade(channel: dict[str, Any], value: bytes, dh_compression: str = "none",
             main_extra: bytes = b"", dh_extra: bytes = b"") -> Case:
    """A message with one channel declared as given: the bugs the fuzzing found first."""
    text = json.dumps({"htype": "bsr_d-1.1", "channels": [channel]}).encode()[:-1]
    data_header = compress(text + dh_extra + b"}", dh_compression)
    main = json.dumps({"htype": "bsr_m-1.1", "pulse_id": 1, "dh_compression": dh_compression,
                       "hash": hashlib.md5(data_header).hexdigest()}).encode()[:-1]
    return Case([main + main_extra + b"}", data_header, value, struct.pack("<qq", 1, 2)],
                [], 1, dh_compression, [f"handmade {channel}"])


GIB_U8 = {"name": "A", "type": "uint8", "shape": [2**30]}
REGRESSIONS = [
    # A shape of more dimensions than numpy has: decode_values raised ValueError.
    handmade({"name": "A", "type": "uint8", "shape": [1] * 65}, b"\1"),
    # Sizes that agree with a 1 GiB declared shape, in a few bytes: 1-2 GiB allocated.
    handmade({**GIB_U8, "compression": "lz4"}, struct.pack("<I", 2**30) + bytes(8)),
    handmade({**GIB_U8, "compression": "bitshuffle_lz4"},
             struct.pack(">QII", 2**30, 0xFFFFFFF8, 4) + bytes(4)),
    # 20 MiB of "{}," in an 80 KiB lz4 data header: ~0.5 GiB and seconds of parsing.
    handmade({"name": "A"}, bytes(8), "lz4", dh_extra=b', "x": [' + b"{}," * (7 << 20) + b"0]"),
    # An 8 MiB main header of "{},": ~0.2 GiB (no bound on main headers).
    handmade({"name": "A"}, bytes(8), main_extra=b', "x": [' + b"{}," * (8 << 20) + b"0]"),
]


@settings(max_examples=PURE_EXAMPLES, **SETTINGS)
@given(case=messages())
@example(case=REGRESSIONS[0])
@example(case=REGRESSIONS[1])
@example(case=REGRESSIONS[2])
@example(case=REGRESSIONS[3])
@example(case=REGRESSIONS[4])
def test_decoder_survives_fuzzed_messages(case: Case) -> None:
    """Only MalformedMessage from the parse path, decode_values never raises, valid
    messages round-trip, and no case allocates much or runs long."""
    # Timed without tracemalloc (which slows allocations a lot). A real stall repeats;
    # a busy machine does not: a slow case gets one more try.
    elapsed = float("inf")
    for _ in range(2):
        start = time.monotonic()
        verdict = pure_case(case)
        elapsed = min(elapsed, time.monotonic() - start)
        if elapsed <= MAX_CASE_SECONDS:
            break
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        pure_case(case)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    STATS["pure_cases"] += 1
    STATS["max_peak"] = max(STATS["max_peak"], peak)
    STATS["max_seconds"] = max(STATS["max_seconds"], elapsed)
    if isinstance(verdict, MalformedMessage):
        STATS["rejected"][verdict.kind] += 1
    bound = MEMORY_BASE + MEMORY_PER_MESSAGE_BYTE * case.nbytes
    assert peak <= bound, f"peak {peak / MiB:.1f} MiB > {bound / MiB:.1f} MiB"
    assert elapsed <= MAX_CASE_SECONDS, f"{elapsed:.2f} s"


# --- real sockets -------------------------------------------------------------------------

GOOD_FIRST_PULSE = 50_000_000_000


def good_message(pulse_id: int) -> list[bytes]:
    parts = [(spec, value_for(spec, pulse_id), timestamp_for(pulse_id)) for spec in CHANNELS]
    return encode_message(pulse_id, timestamp_for(pulse_id), parts)


def ring_frames(ring: RingBuffer) -> list[tuple[int, DataHeader, list[bytes]]]:
    return [(message.pulse_id, message.header, [bytes(frame) for frame in message.frames])
            for message in ring.read(0, ring.max_messages).messages]


def as_stored(pulse_id: int, header: DataHeader, parts: list[bytes]):
    """How the ring gives a message back: the data-header part is not kept."""
    return pulse_id, header, [bytes(parts[0]), b"", *map(bytes, parts[2:])]


@pytest.mark.parametrize("receive", RECEIVE_WAYS)
@settings(max_examples=SOCKET_BATCHES, **SETTINGS)
@given(batch=st.lists(messages(min_mutations=1), min_size=1, max_size=10))
def test_receiver_survives_fuzzed_stream(receive, batch: list[Case]) -> None:
    """Good messages around fuzzed ones all reach the ring in order; the ring holds
    exactly what the pure parse path accepts and MALFORMED counts exactly what it
    rejects; the thread stays alive and keeps receiving. Both ways of taking a message
    off the socket (sfbw_ioc.stream.zmqparts) give the same."""
    stream: list[tuple[list[bytes], bool]] = []
    pulse_id = GOOD_FIRST_PULSE
    for case in batch:
        stream.append((good_message(pulse_id), True))
        pulse_id += 1
        if case.parts:  # ZeroMQ has no message of zero parts
            stream.append((case.parts, False))
    stream.append((good_message(pulse_id), True))
    # The receiver keeps one HeaderCache for the stream: so does the model.
    model = HeaderCache()
    accepted: list[tuple[int, DataHeader, list[bytes]]] = []
    rejected: collections.Counter = collections.Counter()
    for parts, good in stream:
        verdict = receiver_verdict(parts, model)
        if isinstance(verdict, MalformedMessage):
            assert not good, verdict
            rejected[verdict.kind] += 1
        else:
            # Images that do not decompress are counted, and stored absent.
            for index, error in corrupt_chunks(verdict, parts):
                rejected[error.kind] += 1
                parts = [*parts[:2 + 2 * index], b"", b"", *parts[4 + 2 * index:]]
            accepted.append(as_stored(parse_main_header(parts[0]).pulse_id, verdict, parts))
    last = accepted[-1]

    source = BsreadSource()
    ring = RingBuffer(10_000, 4 << 30)
    malformed = MalformedCounter()
    receiver = Receiver(source.address, ring, malformed, receive=receive_way(receive))
    receiver.start()
    try:
        start = time.monotonic()
        for parts, _ in stream:
            source.send_frames(parts)
        poll(lambda: ring.next_seq and ring_frames(ring)[-1] == last, timeout=20,
             what="the last good message in the ring")
        elapsed = time.monotonic() - start
        got = ring_frames(ring)
        goods = [pulse for pulse, header, parts in got if GOOD_FIRST_PULSE <= pulse <= pulse_id
                 and (pulse, header, parts) == as_stored(pulse, header, good_message(pulse))]
        assert goods == list(range(GOOD_FIRST_PULSE, pulse_id + 1))
        assert got == accepted
        assert malformed.total == sum(rejected.values())
        assert malformed.by_kind() == dict(rejected)
        assert receiver.is_alive()
        assert receiver.stats().received == len(accepted)
        # No stall: a batch of at most ~20 messages is through in well under the budget.
        assert elapsed < MAX_CASE_SECONDS * len(stream), f"{elapsed:.2f} s"
        after = good_message(pulse_id + 1)
        source.send_frames(after)
        poll(lambda: ring_frames(ring)[-1] == as_stored(pulse_id + 1, last[1], after), timeout=10,
             what="a good message after the fuzzed ones")
        assert receiver.is_alive()
    finally:
        receiver.stop()
        source.close()
    assert not receiver.is_alive()
    STATS["socket_batches"] += 1
    STATS["socket_messages"] += len(stream) + 1
