"""A message as the ring holds it: the parts received, the small ones back to back in one
bytes object, the large ones (images) as they came off the socket, and what the receiver
parsed of it.

Packing the small parts (``RawMessage.pack``) and slicing them again (``frames``,
``part``) is deliberate, not work done twice. The receiver checks a message and sends it
on part by part, as it came off the socket; the ring then keeps one object per message
instead of one per part, because the parts' own overhead outweighs small values:
measured with tracemalloc, 2.4 kB kept as parts against 1.0 kB packed for 20 scalars (42
parts), 106 against 33 kB for 1000 scalars. The join costs one copy of the small parts
(17 us of the receiver's ~270 us for a 1000-channel message). A part above
``LEND_LIMIT`` is kept as received (ZeroMQ's buffer, lent by ``stream.zmqparts``): copying
an image held the GIL (0.15 ms of a 361 kB frame on fresh memory, the receiver's largest
Python cost) and touched as much memory again. Reading back copies nothing: ``frames``
and ``part`` are memoryviews, and the writer's steady-stream path (``stack_uniform``)
takes the values of many messages at once without cutting them into parts at all.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import numpy as np

from ..bsread import Buffer, DataHeader

# Parts up to this size are copied (cheaper than lending a small part out); larger ones
# (images) are kept as received: ``stream.zmqparts`` lends them, the ring keeps them.
LEND_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message as it came off the socket, plus what the receiver already parsed. An
    image that failed the receiver's check (``bsread.corrupt_chunks``) is stored absent.

    The small parts are kept back to back in one bytes object, the large ones as
    received (see the module's docstring). The data-header part is not kept: every
    message with that hash shares ``header``, the parsed one.
    """

    pulse_id: int
    global_timestamp_ns: int
    header: DataHeader
    payload: bytes  # the main header, then every value and timestamp part but the lent
    main_length: int  # of the main header
    # Where each value and timestamp part ends in ``payload``, counted from the end of
    # the main header (a lent part takes no room there): messages of a steady stream
    # have equal ``ends`` although their main headers vary.
    ends: array
    lent: tuple[tuple[int, Buffer], ...] = ()  # (index in frames, part) above LEND_LIMIT

    @classmethod
    def pack(cls, pulse_id: int, global_timestamp_ns: int, header: DataHeader,
             frames: Sequence[Buffer]) -> RawMessage:
        main, values = frames[0], frames[2:]
        lent = tuple((2 + position, value) for position, value in enumerate(values)
                     if len(value) > LEND_LIMIT)
        if lent:
            values = [b"" if len(value) > LEND_LIMIT else value for value in values]
        return cls(pulse_id, global_timestamp_ns, header, b"".join([main, *values]),
                   len(main), array("I", accumulate(map(len, values))), lent)

    @property
    def nbytes(self) -> int:
        return len(self.payload) + sum(len(part) for _, part in self.lent)

    @property
    def values_nbytes(self) -> int:
        """Of the value and timestamp parts."""
        return self.nbytes - self.main_length

    @property
    def frames(self) -> list[bytes | memoryview]:
        """The message's parts as received, with an empty data-header part."""
        view = memoryview(self.payload)
        values = view[self.main_length:]
        frames = [view[:self.main_length], b"",
                  *(values[start:end] for start, end in zip((0, *self.ends), self.ends))]
        for index, part in self.lent:
            frames[index] = memoryview(part)
        return frames

    def part(self, index: int) -> memoryview:
        """Part ``index`` of ``frames`` (2 or more: a value or timestamp part) without
        slicing every other part: a reader of a few channels of a wide message."""
        for lent_index, part in self.lent:
            if lent_index == index:
                return memoryview(part)
        values = memoryview(self.payload)[self.main_length:]
        position = index - 2
        return values[self.ends[position - 1] if position else 0:self.ends[position]]


def stack_uniform(messages: Sequence[RawMessage]) -> tuple[np.ndarray, array] | None:
    """The value and timestamp parts of messages whose parts all have the same lengths,
    as one (n, bytes) uint8 array, and where each part starts and ends in a row
    (0 first, then the ``ends``); None when the lengths differ or a part was lent."""
    ends = messages[0].ends
    if any(message.ends != ends or message.lent for message in messages):
        return None
    rows = np.empty((len(messages), ends[-1] if ends else 0), np.uint8)
    # Row by row in numpy, which copies without the GIL: b"".join of a large batch held
    # it for tens of ms and stalled the IOC's event loop.
    for row, message in zip(rows, messages):
        row[:] = np.frombuffer(message.payload, np.uint8, offset=message.main_length)
    return rows, array("I", [0]) + ends
