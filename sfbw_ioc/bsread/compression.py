"""Value compression as bsread sends it: "lz4" (a size prefix and one LZ4 block) and
"bitshuffle_lz4" (the HDF5 bitshuffle filter's chunk format), with the checks that make
a hostile value fail cleanly instead of allocating or reading what it claims.

``compress`` and ``decompress`` work on the bytes of one value; ``check_bitshuffle_lz4``
checks a chunk without keeping what it decodes.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import struct
from typing import Callable, Iterator

import bitshuffle
import lz4.block
import numpy as np

from .types import BSLZ4_HEADER_SIZE, LZ4_HEADER_SIZE, Buffer, MalformedMessage

try:
    from . import _bslz4
except ImportError:  # built only where a C compiler was at hand
    _bslz4 = None

log = logging.getLogger(__name__)

# An LZ4 block spends at least one byte per 255 bytes of output, and the LZ4 encoder never
# grows its input by more than its compressBound; a size outside both cannot be genuine.
_LZ4_MAX_RATIO = 255
# The reference sender's bitshuffle block, bitshuffle's own default (its
# bshuf_default_block_size for 1- to 8-byte elements): 8 KiB.
BSLZ4_DEFAULT_BLOCK_BYTES = 8192
_BSLZ4_HEADER = struct.Struct(">QI")
_BSLZ4_BLOCK_PREFIX = struct.Struct(">I")
# bitshuffle only cares about element size; unsigned views keep byte order out of it.
_UINT = {1: np.dtype("u1"), 2: np.dtype("u2"), 4: np.dtype("u4"), 8: np.dtype("u8")}


def compress(raw: bytes, compression: str, itemsize: int, big_endian: bool) -> bytes:
    """``raw`` as the reference sender compresses a value (or a data header: itemsize 1)."""
    if compression == "lz4":
        prefix = len(raw).to_bytes(LZ4_HEADER_SIZE, "big" if big_endian else "little")
        return prefix + lz4.block.compress(raw, store_size=False)
    if compression == "bitshuffle_lz4":
        block = BSLZ4_DEFAULT_BLOCK_BYTES // itemsize
        body = bitshuffle.compress_lz4(np.frombuffer(raw, _UINT[itemsize]), block)
        return _BSLZ4_HEADER.pack(len(raw), block * itemsize) + body.tobytes()
    return raw


def decompress(
    part: Buffer,
    compression: str,
    itemsize: int,
    expected: int | None,
    limit: int,
    big_endian: bool,
) -> Buffer:
    """Uncompressed bytes of ``part``: exactly ``expected`` bytes when that is known,
    else at most ``limit``."""
    if compression == "none":
        return part
    if compression == "lz4":
        return _lz4_decompress(memoryview(part), expected, limit, big_endian)
    if compression == "bitshuffle_lz4":
        return _bslz4_decompress(memoryview(part), itemsize, expected, limit)
    raise MalformedMessage("compression", f"unknown compression {compression!r}")


def _lz4_decompress(
    view: memoryview, expected: int | None, limit: int, big_endian: bool
) -> bytes:
    if len(view) < LZ4_HEADER_SIZE:
        raise MalformedMessage("value_size", f"{len(view)}-byte lz4 value has no size prefix")
    payload = view[LZ4_HEADER_SIZE:]
    # lz4.block.decompress allocates the whole output first: no more than LZ4 can give.
    if expected is not None and expected > _LZ4_MAX_RATIO * len(payload):
        raise MalformedMessage(
            "value_size", f"{len(payload)} bytes of lz4 cannot hold {expected} bytes"
        )
    sizes = _lz4_sizes(view[:LZ4_HEADER_SIZE], len(payload), expected, limit, big_endian)
    if not sizes:
        raise MalformedMessage(
            "value_size",
            f"lz4 size prefix {view[:LZ4_HEADER_SIZE].hex()} does not give "
            + (f"the expected {expected} bytes" if expected is not None else "a plausible size"),
        )
    failure = ""
    for size in sizes:
        try:
            raw = lz4.block.decompress(payload, uncompressed_size=size)
        except (lz4.block.LZ4BlockError, ValueError, OverflowError) as exc:
            failure = str(exc)
            continue
        # python-lz4 takes uncompressed_size as a capacity, not as a promise.
        if len(raw) == size:
            return raw
        failure = f"decompressed to {len(raw)} bytes, prefix says {size}"
    raise MalformedMessage("compression", f"lz4: {failure}")


def _lz4_sizes(
    prefix: memoryview, payload_len: int, expected: int | None, limit: int, big_endian: bool
) -> list[int]:
    """Readings of the lz4 size prefix worth trying, most likely first.

    The reference Python sender writes the prefix in the channel's byte order, PSI's C++
    sender always big-endian; the wrong reading almost always gives an impossible size.
    """
    orders = ("big", "little") if big_endian else ("little", "big")
    readings = dict.fromkeys(int.from_bytes(prefix, order) for order in orders)
    if expected is not None:
        return [size for size in readings if size == expected]
    return [
        size
        for size in readings
        if size <= limit
        and size <= _LZ4_MAX_RATIO * payload_len
        and payload_len <= size + size // 255 + 16
    ]


def _bslz4_decompress(
    view: memoryview, itemsize: int, expected: int | None, limit: int
) -> memoryview:
    """bitshuffle_lz4, i.e. the HDF5 bitshuffle filter's chunk format.

    Decoded block by block with the bounds-checked LZ4 decoder: bitshuffle's own
    decompress_lz4 trusts the block sizes in the data and crashes the process on a
    corrupt one.
    """
    nbytes, count, block = _bslz4_layout(view, itemsize, expected, limit)
    blocks = _bslz4_blocks(view, count, block, itemsize)  # checks the layout: before allocating
    shuffled = bytearray(nbytes)
    start = 0
    for raw in blocks:
        shuffled[start : start + len(raw)] = raw
        start += len(raw)
    # Elements past the last multiple of 8 are stored as they are, after the blocks.
    shuffled[start:] = view[len(view) - (nbytes - start) :]
    unshuffled = bitshuffle.bitunshuffle(np.frombuffer(shuffled, _UINT[itemsize]), block)
    return memoryview(unshuffled).cast("B")


def bitshuffle_lz4_blocks(part: Buffer, itemsize: int, nbytes: int) -> memoryview | None:
    """The LZ4 blocks of a bitshuffle_lz4 chunk of ``nbytes`` bytes without its 12-byte
    header, when they are what bitshuffle's ``bshuf_compress_lz4`` makes with its default
    block size (what areaDetector's "bslz4" codec carries); None when the header tells
    another size or layout."""
    view = memoryview(part).cast("B")
    try:
        _, count, block = _bslz4_layout(view, itemsize, nbytes, nbytes)
    except MalformedMessage:
        return None
    default = min(BSLZ4_DEFAULT_BLOCK_BYTES // itemsize, max(8, count - count % 8))
    return view[BSLZ4_HEADER_SIZE:] if block == default else None


def _bslz4_layout(
    view: memoryview, itemsize: int, expected: int | None, limit: int
) -> tuple[int, int, int]:
    """(uncompressed bytes, elements, block size in elements) from a checked header."""
    if len(view) < BSLZ4_HEADER_SIZE:
        raise MalformedMessage("value_size", f"{len(view)}-byte bitshuffle_lz4 value has no header")
    nbytes, block_bytes = _BSLZ4_HEADER.unpack_from(view)
    if expected is not None and nbytes != expected:
        raise MalformedMessage(
            "value_size", f"bitshuffle_lz4 declares {nbytes} bytes, expected {expected}"
        )
    if expected is None and nbytes > limit:
        raise MalformedMessage(
            "value_size", f"bitshuffle_lz4 declares {nbytes} bytes, limit {limit}"
        )
    if nbytes % itemsize or not block_bytes or block_bytes % (8 * itemsize):
        raise MalformedMessage(
            "compression", f"bitshuffle_lz4: {nbytes} bytes in blocks of {block_bytes} bytes "
            f"do not fit {itemsize}-byte elements"
        )
    count = nbytes // itemsize
    # A block longer than the value is the same layout as one block of the value's
    # whole multiple of 8 (and bitunshuffle wants the block size to fit a C int).
    block = min(block_bytes // itemsize, max(8, count - count % 8))
    return nbytes, count, block


def _bslz4_blocks(view: memoryview, count: int, block: int, itemsize: int) -> Iterator[bytes]:
    """Every LZ4 block decompressed with the bounds-checked decoder. The layout is checked
    right here (raising MalformedMessage), before the caller allocates anything; the
    blocks are decompressed one by one as the result is iterated."""
    for _ in _bslz4_spans(view, count, block, itemsize):  # a walk that keeps nothing
        pass
    return _bslz4_decompressed_blocks(view, _bslz4_spans(view, count, block, itemsize))


def _bslz4_decompressed_blocks(
    view: memoryview, spans: Iterator[tuple[int, int, int]]
) -> Iterator[bytes]:
    try:
        for begin, end, size in spans:
            raw = lz4.block.decompress(view[begin:end], uncompressed_size=size)
            if len(raw) != size:
                raise _block_error(_SHORT)
            yield raw
    except lz4.block.LZ4BlockError:
        raise _block_error(_CORRUPT, begin) from None


# What can be wrong with the blocks of a chunk, by the codes the C extension _bslz4
# returns: (kind, text with the two figures it names as {a} and {b}).
_TRUNCATED, _TOO_SMALL, _CORRUPT, _SHORT, _TILING = range(1, 6)
_BLOCK_ERRORS = {
    _TRUNCATED: ("value_size", "bitshuffle_lz4 value truncated"),
    _TOO_SMALL: ("value_size", "bitshuffle_lz4 block of {a} bytes cannot hold {b}"),
    _CORRUPT: ("compression", "bitshuffle_lz4: the LZ4 block at byte {a} does not decompress"),
    _SHORT: ("compression", "bitshuffle_lz4: short block"),
    _TILING: ("value_size", "bitshuffle_lz4 blocks end at byte {a} of {b}"),
}


def _block_error(code: int, a: int = 0, b: int = 0) -> MalformedMessage:
    kind, text = _BLOCK_ERRORS[code]
    return MalformedMessage(kind, text.format(a=a, b=b))


def _bslz4_spans(
    view: memoryview, count: int, block: int, itemsize: int
) -> Iterator[tuple[int, int, int]]:
    """(start, end, uncompressed size) of every LZ4 block, checked to tile the value
    exactly (a generator: a message of many tiny blocks must not become a big list)."""
    pos = BSLZ4_HEADER_SIZE
    for elements in _bslz4_block_elements(count, block):
        if pos + _BSLZ4_BLOCK_PREFIX.size > len(view):
            raise _block_error(_TRUNCATED)
        (length,) = _BSLZ4_BLOCK_PREFIX.unpack_from(view, pos)
        pos += _BSLZ4_BLOCK_PREFIX.size
        if pos + length > len(view):
            raise _block_error(_TRUNCATED)
        if elements * itemsize > _LZ4_MAX_RATIO * length:
            raise _block_error(_TOO_SMALL, length, elements * itemsize)
        yield pos, pos + length, elements * itemsize
        pos += length
    if pos + (count % 8) * itemsize != len(view):
        raise _block_error(_TILING, pos, len(view))


def _bslz4_block_elements(count: int, block: int) -> Iterator[int]:
    full, rest = divmod(count, block)
    yield from itertools.repeat(block, full)
    if rest >= 8:
        yield rest - rest % 8


def check_bitshuffle_lz4(view: memoryview, itemsize: int, expected: int | None,
                         limit: int) -> None:
    """Raise MalformedMessage unless ``view`` decompresses exactly (see decompress)."""
    _, count, block = _bslz4_layout(view, itemsize, expected, limit)
    check_bslz4_blocks(view, count, block, itemsize)


def check_bslz4_blocks_walk(view: memoryview, count: int, block: int, itemsize: int) -> None:
    """The blocks of a chunk whose header is checked, block by block from Python."""
    # One walk: nothing is allocated here that the layout check would protect.
    for _ in _bslz4_decompressed_blocks(view, _bslz4_spans(view, count, block, itemsize)):
        pass


def check_bslz4_blocks_at_once(view: memoryview, count: int, block: int,
                               itemsize: int) -> None:
    """The same as check_bslz4_blocks_walk in one call of the C extension _bslz4 (the
    GIL released once, not per block), with the same verdicts."""
    verdict = _bslz4.check(view, count, block, itemsize, BSLZ4_HEADER_SIZE, _LZ4_MAX_RATIO)
    if verdict is not None:
        raise _block_error(*verdict)


def _bind_lz4() -> bool:
    """Hand the extension the LZ4 decoder of the lz4 package (the walk's own)."""
    if _bslz4 is None:
        return False
    try:
        from lz4.block import _block
        address = ctypes.cast(ctypes.CDLL(_block.__file__).LZ4_decompress_safe,
                              ctypes.c_void_p).value
        _bslz4.bind(address)
    except (ImportError, OSError, AttributeError, ValueError) as error:
        log.warning("bitshuffle_lz4 chunks are checked block by block: %s", error)
        return False
    return True


check_bslz4_blocks: Callable[[memoryview, int, int, int], None] = (
    check_bslz4_blocks_at_once if _bind_lz4() else check_bslz4_blocks_walk)
