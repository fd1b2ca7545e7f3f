"""The two ways of checking a bitshuffle_lz4 chunk's blocks (sfbw_ioc.bsread.compression):
the C extension in one call and the walk from Python give the same verdict, error kind
and text, on good chunks and on damaged ones."""
from __future__ import annotations

import os
import struct

import bitshuffle
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfbw_ioc.bsread import HeaderCache, MalformedMessage, compression, parse_main_header, value_nbytes, wire_dtype
from vectors import CASES, load_case

BUILT = pytest.mark.skipif(compression._bslz4 is None, reason="_bslz4 is not built")
EXAMPLES = int(os.environ.get("SFBW_FUZZ_EXAMPLES") or 0) or 300


def verdict(check, chunk: bytes, itemsize: int, expected: int | None):
    view = memoryview(chunk)
    try:
        _, count, block = compression._bslz4_layout(view, itemsize, expected, 1 << 30)
        check(view, count, block, itemsize)
    except MalformedMessage as error:
        return error.kind, error.detail
    return None


@st.composite
def chunks(draw):
    """A chunk as the reference sender makes one, then perhaps damaged."""
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    count = draw(st.integers(0, 9000 // itemsize))
    smooth = draw(st.booleans())  # compressible (long matches) or noise (literals)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = (np.arange(count) // 7 if smooth else rng.integers(0, 256, count * itemsize))
    raw = np.asarray(values, np.uint8 if not smooth else f"u{itemsize}").tobytes()
    raw = raw[:count * itemsize].ljust(count * itemsize, b"\0")
    chunk = bytearray(compression.compress(raw, "bitshuffle_lz4", itemsize, False))
    damage = draw(st.sampled_from(["none", "flip", "truncate", "extend", "prefix"]))
    if damage == "flip" and len(chunk) > 12:
        for _ in range(draw(st.integers(1, 4))):
            chunk[draw(st.integers(12, len(chunk) - 1))] ^= draw(st.integers(1, 255))
    elif damage == "truncate":
        chunk = chunk[:draw(st.integers(0, len(chunk)))]
    elif damage == "extend":
        chunk += draw(st.binary(min_size=1, max_size=20))
    elif damage == "prefix" and len(chunk) >= 16:
        at = draw(st.integers(12, len(chunk) - 4))
        chunk[at:at + 4] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
    return bytes(chunk), itemsize, count * itemsize


@BUILT
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=chunks())
def test_both_ways_give_the_same_verdict(case):
    chunk, itemsize, expected = case
    walked = verdict(compression.check_bslz4_blocks_walk, chunk, itemsize, expected)
    assert verdict(compression.check_bslz4_blocks_at_once, chunk, itemsize, expected) == walked


@BUILT
@pytest.mark.parametrize("case", CASES)
def test_every_bitshuffle_value_of_the_vectors_passes_both_ways(case):
    messages, _, _ = load_case(case)
    headers = HeaderCache()
    checked = 0
    for frames in messages:
        header = headers.get(parse_main_header(frames[0]), frames[1])
        for index, spec in enumerate(header.channels):
            part = frames[2 + 2 * index]
            if spec.compression == "bitshuffle_lz4" and part:
                args = (part, wire_dtype(spec).itemsize, value_nbytes(spec))
                assert verdict(compression.check_bslz4_blocks_walk, *args) is None
                assert verdict(compression.check_bslz4_blocks_at_once, *args) is None
                checked += 1
    assert checked > 0 or case not in ("arrays_bslz4", "camera_bslz4")


@BUILT
def test_the_c_way_is_used_where_it_is_built():
    assert compression.check_bslz4_blocks is compression.check_bslz4_blocks_at_once


@pytest.mark.parametrize("itemsize, count", [(1, 100_000), (2, 30_000), (4, 5), (8, 3000)])
def test_areadetector_blocks_are_the_chunk_without_its_header(itemsize, count):
    """areaDetector's "bslz4" is bshuf_compress_lz4's output with the default block: the
    reference sender's chunk minus its 12-byte header (pva.frames serves it so)."""
    raw = (np.arange(count * itemsize) // 5).astype(np.uint8).tobytes()
    chunk = compression.compress(raw, "bitshuffle_lz4", itemsize, False)
    blocks = compression.bitshuffle_lz4_blocks(chunk, itemsize, len(raw))
    default = bitshuffle.compress_lz4(np.frombuffer(raw, f"u{itemsize}"), 0)
    assert bytes(blocks) == default.tobytes()


def test_chunks_of_other_blocks_or_sizes_are_not_areadetectors():
    raw = (np.arange(100_000) // 5).astype(np.uint8)
    body = bitshuffle.compress_lz4(raw, 1024).tobytes()
    other_block = struct.pack(">QI", raw.nbytes, 1024) + body
    assert compression.bitshuffle_lz4_blocks(other_block, 1, raw.nbytes) is None
    chunk = compression.compress(raw.tobytes(), "bitshuffle_lz4", 1, False)
    assert compression.bitshuffle_lz4_blocks(chunk, 1, raw.nbytes - 8) is None
    assert compression.bitshuffle_lz4_blocks(chunk[:5], 1, raw.nbytes) is None
