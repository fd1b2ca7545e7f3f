"""bsread codec: main header, data header, channel values (decode and encode).

The wire format is described in tests/bsread_reference/README.md. The package is pure (no
sockets, no threads, no files) and depends on nothing else in sfbw_ioc, so that the
receiver, the writer and the simulator share one definition of the format.

Modules, one job each (each reads alone):
- ``types``: type names, sizes and bounds, ``ChannelSpec``/``DataHeader``/..., and
  ``MalformedMessage``.
- ``compression``: lz4 and bitshuffle_lz4 values, checked against hostile sizes.
- ``headers``: ``parse_main_header`` (cheap: the receiver calls it per message),
  ``parse_data_header``, and ``HeaderCache.get(main, part)``, which parses a data header
  only when its hash changes.
- ``decode``: one message: ``check_structure`` (part count, sizes of uncompressed values
  and of timestamps; raises ``MalformedMessage``), ``decode_value``, ``decode_values``
  (a channel that cannot be decoded is returned absent and its error listed).
- ``columns``: a run of messages, channel by channel (``decode_columns``,
  ``decode_uniform_columns``), and the check of images stored as HDF5 chunks
  (``corrupt_chunks``).
- ``encode``: ``encode_message``, the reference sender's format; ``Encoder`` does the
  same but serialises and hashes each distinct data header only once.

``MalformedMessage.kind`` is one of "main_header", "data_header", "data_header_hash",
"part_count", "timestamp_size", "value_size", "compression" (undecodable lz4 or
bitshuffle data) and "string" (not UTF-8).

Every decoder treats its input as hostile: sizes declared inside a message are checked
against the data header (or a fixed bound) before anything is allocated.
"""
from .columns import Column, corrupt_chunks, decode_columns, decode_uniform_columns
from .decode import check_structure, decode_value, decode_values
from .encode import Encoder, encode_message
from .headers import HeaderCache, parse_data_header, parse_main_header
from .types import (BSLZ4_HEADER_SIZE, BSREAD_TYPES, COMPRESSIONS, ENCODINGS, LZ4_HEADER_SIZE,
                    MAX_DATA_HEADER_BYTES, MAX_MAIN_HEADER_BYTES, MAX_SHAPE_DIMS,
                    MAX_STRING_BYTES, MAX_VALUE_BYTES, NS_PER_SECOND, TIMESTAMP_SIZE, Buffer,
                    ChannelSpec, ChannelValue, DataHeader, MainHeader, MalformedMessage,
                    is_direct_chunk, value_nbytes, wire_dtype)

__all__ = [
    "BSLZ4_HEADER_SIZE", "BSREAD_TYPES", "COMPRESSIONS", "ENCODINGS", "LZ4_HEADER_SIZE",
    "MAX_DATA_HEADER_BYTES", "MAX_MAIN_HEADER_BYTES", "MAX_SHAPE_DIMS", "MAX_STRING_BYTES",
    "MAX_VALUE_BYTES", "NS_PER_SECOND", "TIMESTAMP_SIZE", "Buffer", "ChannelSpec",
    "ChannelValue", "Column", "DataHeader", "Encoder", "HeaderCache", "MainHeader",
    "MalformedMessage", "check_structure", "corrupt_chunks", "decode_columns",
    "decode_uniform_columns", "decode_value", "decode_values", "encode_message",
    "is_direct_chunk", "parse_data_header", "parse_main_header", "value_nbytes",
    "wire_dtype",
]
