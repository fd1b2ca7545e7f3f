"""A message as the ring holds it: the parts received, back to back in one bytes object,
and what the receiver parsed of it.

Packing the parts (``RawMessage.pack``) and slicing them again (``frames``, ``part``) is
deliberate, not work done twice. The receiver checks a message and sends it on part by
part, as it came off the socket; the ring then keeps one object per message instead of
one per part, because the parts' own overhead outweighs small values: measured with
tracemalloc, 2.4 kB kept as parts against 1.0 kB packed for 20 scalars (42 parts), 106
against 33 kB for 1000 scalars. The join costs one copy of the message (17 us of the
receiver's ~270 us for a 1000-channel message; an image is copied here only). Reading back
copies nothing: ``frames`` and ``part`` are memoryviews of the one object, and the
writer's steady-stream path (``stack_uniform``) takes the values of many messages at
once without cutting them into parts at all.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

import numpy as np

from ..bsread import Buffer, DataHeader


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message as it came off the socket, plus what the receiver already parsed. An
    image that failed the receiver's check (``bsread.corrupt_chunks``) is stored absent.

    The parts are kept back to back in one bytes object (see the module's docstring).
    The data-header part is not kept: every message with that hash shares ``header``,
    the parsed one.
    """

    pulse_id: int
    global_timestamp_ns: int
    header: DataHeader
    payload: bytes  # the main header, then every value and timestamp part
    main_length: int  # of the main header
    # Where each value and timestamp part ends, counted from the end of the main header:
    # messages of a steady stream have equal ``ends`` although their main headers vary.
    ends: array

    @classmethod
    def pack(cls, pulse_id: int, global_timestamp_ns: int, header: DataHeader,
             frames: Sequence[Buffer]) -> RawMessage:
        main, values = frames[0], frames[2:]
        return cls(pulse_id, global_timestamp_ns, header, b"".join([main, *values]),
                   len(main), array("I", accumulate(map(len, values))))

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    @property
    def frames(self) -> list[bytes | memoryview]:
        """The message's parts as received, with an empty data-header part."""
        view = memoryview(self.payload)
        values = view[self.main_length:]
        parts = [values[start:end] for start, end in zip((0, *self.ends), self.ends)]
        return [view[:self.main_length], b"", *parts]

    def part(self, index: int) -> memoryview:
        """Part ``index`` of ``frames`` (2 or more: a value or timestamp part) without
        slicing every other part: a reader of a few channels of a wide message."""
        values = memoryview(self.payload)[self.main_length:]
        position = index - 2
        return values[self.ends[position - 1] if position else 0:self.ends[position]]


def stack_uniform(messages: Sequence[RawMessage]) -> tuple[np.ndarray, array] | None:
    """The value and timestamp parts of messages whose parts all have the same lengths,
    as one (n, bytes) uint8 array, and where each part starts and ends in a row
    (0 first, then the ``ends``); None when the lengths differ."""
    ends = messages[0].ends
    if any(message.ends != ends for message in messages):
        return None
    rows = np.empty((len(messages), ends[-1] if ends else 0), np.uint8)
    # Row by row in numpy, which copies without the GIL: b"".join of a large batch held
    # it for tens of ms and stalled the IOC's event loop.
    for row, message in zip(rows, messages):
        row[:] = np.frombuffer(message.payload, np.uint8, offset=message.main_length)
    return rows, array("I", [0]) + ends
