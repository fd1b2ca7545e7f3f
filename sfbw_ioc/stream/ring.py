"""The always-on ring buffer: raw bsread messages as received, addressed by arrival number.

The receiver thread appends; acquisitions read. Every message gets a sequence number
(``seq``) in arrival order, so a reader keeps a cursor that survives pulse ids that repeat
or go back after a source restart, and knows exactly how many messages the ring dropped
before it read them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .message import RawMessage


@dataclass(frozen=True, slots=True)
class RingStats:
    count: int
    nbytes: int
    oldest_pulse_id: int | None
    newest_pulse_id: int | None
    next_seq: int  # seq the next appended message will get
    dropped: int  # messages evicted since start


@dataclass(frozen=True, slots=True)
class ReadResult:
    messages: list[RawMessage]
    first_seq: int  # seq of messages[0] (or where reading resumes when empty)
    lost: int  # messages between the requested seq and first_seq that the ring dropped


def typical_step(pulse_ids: np.ndarray) -> int | None:
    """The most common positive step between consecutive pulse ids; None if none."""
    steps = np.diff(pulse_ids)
    steps = steps[steps > 0]
    if not len(steps):
        return None
    values, counts = np.unique(steps, return_counts=True)
    return int(values[np.argmax(counts)])


class RingBuffer:
    """Bounded by message count and by bytes; the oldest messages go first.

    Thread-safe. ``wait_for`` lets a reader sleep until a message with a given seq exists.
    """

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("the ring needs room for at least one message")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._slots: list[RawMessage | None] = [None] * max_messages
        # Bytes appended since start, as of the end of each slot's message: what waits
        # behind a reader's cursor is one subtraction, however many messages it is.
        self._appended_after: list[int] = [0] * max_messages
        self._arrived_at: list[float] = [0.0] * max_messages  # time.monotonic()
        self._appended = 0
        self._oldest_seq = 0
        self._next_seq = 0
        self._nbytes = 0
        self._dropped = 0
        self._cond = threading.Condition()

    def append(self, message: RawMessage) -> None:
        """Store a message, evicting the oldest as needed."""
        self.extend([message])

    def extend(self, messages: Sequence[RawMessage]) -> None:
        """Store messages in order, evicting the oldest as needed; wakes readers once."""
        now = time.monotonic()
        with self._cond:
            for message in messages:
                # A single message larger than the whole byte budget is still kept,
                # alone: dropping it would lose data an acquisition may need.
                while self._count() and (
                    self._count() >= self.max_messages
                    or self._nbytes + message.nbytes > self.max_bytes
                ):
                    self._evict_oldest()
                self._slots[self._next_seq % self.max_messages] = message
                self._appended += message.nbytes
                self._appended_after[self._next_seq % self.max_messages] = self._appended
                self._arrived_at[self._next_seq % self.max_messages] = now
                self._next_seq += 1
                self._nbytes += message.nbytes
            self._cond.notify_all()

    def read(self, from_seq: int, max_count: int, max_bytes: int | None = None) -> ReadResult:
        """Up to ``max_count`` messages starting at ``from_seq`` (or the oldest still held),
        and no more than ``max_bytes`` of them (but at least one): what a reader holds
        stays in memory after the ring evicts it, outside the ring's byte budget."""
        with self._cond:
            first = max(from_seq, self._oldest_seq)
            last = min(first + max_count, self._next_seq)
            messages, nbytes = [], 0
            for seq in range(first, last):
                message = self._slot(seq)
                nbytes += message.nbytes
                if messages and max_bytes is not None and nbytes > max_bytes:
                    break
                messages.append(message)
            return ReadResult(messages, first, first - from_seq)

    def newest(self, accept: Callable[[RawMessage], bool] | None = None) -> RawMessage | None:
        """The newest message (that ``accept`` takes, looking back through the whole ring,
        when given); None when there is none."""
        with self._cond:
            for seq in range(self._next_seq - 1, self._oldest_seq - 1, -1):
                message = self._slot(seq)
                if accept is None or accept(message):
                    return message
            return None

    def find_start(self, pulse_id: int) -> int:
        """Seq where an acquisition starting at ``pulse_id`` begins reading.

        That is the newest buffered message with pulse id >= ``pulse_id`` whose
        predecessor is below it or belongs to an earlier run of the source (its pulse id
        is higher: the source restarted), so a restart's repeated pulse ids are taken
        from the newest run. When no buffered message qualifies: ``next_seq``, and the
        acquisition waits for live messages.
        """
        with self._cond:
            newer: RawMessage | None = None
            for seq in range(self._next_seq - 1, self._oldest_seq - 1, -1):
                message = self._slot(seq)
                if newer is not None and newer.pulse_id >= pulse_id and (
                        message.pulse_id < pulse_id or message.pulse_id > newer.pulse_id):
                    return seq + 1
                newer = message
            if newer is not None and newer.pulse_id >= pulse_id:
                return self._oldest_seq
            return self._next_seq

    def wait_for(self, seq: int, timeout: float, pulse_id: int | None = None) -> bool:
        """Block until a message with ``seq`` was appended, or (if given) one with a pulse
        id of at least ``pulse_id``, or ``timeout`` seconds pass. True unless timed out."""
        def arrived() -> bool:
            return self._next_seq > seq or self._pulse_id_arrived(pulse_id)
        with self._cond:
            return self._cond.wait_for(arrived, timeout)

    def wait_for_batch(self, from_seq: int, count: int, nbytes: int, timeout: float,
                       pulse_id: int | None = None) -> bool:
        """Block until ``count`` messages or ``nbytes`` bytes wait from ``from_seq`` on,
        or (if given) a message with a pulse id of at least ``pulse_id`` arrived, or
        ``timeout`` seconds pass. True unless timed out."""
        def ready() -> bool:
            return (self._next_seq - from_seq >= count
                    or self._bytes_from(from_seq) >= nbytes
                    or self._pulse_id_arrived(pulse_id))
        with self._cond:
            return self._cond.wait_for(ready, timeout)

    def bytes_from(self, from_seq: int) -> int:
        """Bytes of the messages held from ``from_seq`` (or the oldest held) on."""
        with self._cond:
            return self._bytes_from(from_seq)

    def age(self, seq: int) -> float:
        """Seconds since the message ``seq`` (or the oldest held, when ``seq`` was
        dropped) arrived; 0 when no such message has arrived yet."""
        with self._cond:
            first = max(seq, self._oldest_seq)
            if first >= self._next_seq:
                return 0.0
            return time.monotonic() - self._arrived_at[first % self.max_messages]

    def clear(self) -> None:
        """Drop every message (another stream begins); seqs go on from where they were."""
        with self._cond:
            while self._count():
                self._evict_oldest()
            self._cond.notify_all()

    def held_bytes(self) -> int:
        """Bytes of the messages the ring holds now."""
        with self._cond:
            return self._nbytes

    def expected_bytes(self) -> int:
        """Bytes the ring will hold once full of messages of the mean size of those it
        holds now (0 while empty): the memory it is going to take."""
        with self._cond:
            count = self._count()
            return min(self.max_bytes, self.max_messages * self._nbytes // count) if count else 0

    def wake_readers(self) -> None:
        """Wake threads blocked in ``wait_for`` so they can look at new commands."""
        with self._cond:
            self._cond.notify_all()

    @property
    def next_seq(self) -> int:
        with self._cond:
            return self._next_seq

    def stats(self) -> RingStats:
        with self._cond:
            count = self._count()
            oldest = self._slot(self._oldest_seq).pulse_id if count else None
            newest = self._slot(self._next_seq - 1).pulse_id if count else None
            return RingStats(count, self._nbytes, oldest, newest, self._next_seq, self._dropped)

    def typical_pulse_step(self, window: int = 100) -> int:
        """The most common positive pulse-id step among the newest ``window`` messages.

        Streams step by 1 at 100 Hz, by 10 or 100 for slower sources; this is how a gap
        is told apart from the stream's normal rate. 1 when nothing can be told.
        """
        with self._cond:
            first = max(self._oldest_seq, self._next_seq - window)
            pulse_ids = [self._slot(seq).pulse_id for seq in range(first, self._next_seq)]
        return typical_step(np.array(pulse_ids, dtype=np.int64)) or 1

    def _count(self) -> int:
        return self._next_seq - self._oldest_seq

    def _bytes_from(self, from_seq: int) -> int:
        first = max(from_seq, self._oldest_seq)
        if first >= self._next_seq:
            return 0
        if first == self._oldest_seq:
            return self._nbytes
        # first - 1 is still held: its end is where the waiting bytes begin.
        return self._appended - self._appended_after[(first - 1) % self.max_messages]

    def _pulse_id_arrived(self, pulse_id: int | None) -> bool:
        return (pulse_id is not None and self._count() > 0
                and self._slot(self._next_seq - 1).pulse_id >= pulse_id)

    def _slot(self, seq: int) -> RawMessage:
        message = self._slots[seq % self.max_messages]
        assert message is not None
        return message

    def _evict_oldest(self) -> None:
        index = self._oldest_seq % self.max_messages
        message = self._slots[index]
        assert message is not None
        self._nbytes -= message.nbytes
        self._slots[index] = None
        self._oldest_seq += 1
        self._dropped += 1
