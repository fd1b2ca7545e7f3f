"""bsread sources whose every value a test knows: a source on a real ZeroMQ socket,
pre-encoded messages for senders that must outrun the IOC, paced senders, and streams
of common pulse ids for a group of IOCs."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import zmq

from ..bsread import ChannelSpec, encode_message
from .ioc import IocProcess, free_port, poll, unique_prefix

CHANNELS = (
    ChannelSpec("T:F64", "float64", ()),
    ChannelSpec("T:I32", "int32", ()),
    ChannelSpec("T:U64", "uint64", ()),
    ChannelSpec("T:BOOL", "bool", ()),
    ChannelSpec("T:STR", "string", ()),
    ChannelSpec("T:WF", "float32", (16,), compression="lz4"),
    ChannelSpec("T:IMG", "uint16", (8, 12), compression="bitshuffle_lz4"),
)


def value_for(spec: ChannelSpec, pulse_id: int):
    """A deterministic value of ``spec`` for ``pulse_id`` (what the source sends)."""
    if spec.type == "string":
        return f"pulse {pulse_id} ✓"
    if spec.type == "bool":
        return np.array(pulse_id % 2 == 0)
    dtype = np.dtype(spec.type)
    size = int(np.prod(spec.shape, dtype=np.int64))
    base = np.arange(size, dtype=np.float64) + pulse_id % 100_000
    if dtype.kind == "f":
        base = base / 7.0
    return base.astype(dtype).reshape(spec.shape)


def timestamp_for(pulse_id: int) -> int:
    return 1_700_000_000_000_000_000 + pulse_id * 10_000_000


class BsreadSource:
    """A PUSH socket bound on a free port, sending messages the test composes."""

    def __init__(self, mode: str = "push") -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self._type = zmq.PUSH if mode == "push" else zmq.PUB
        self._bind()

    def _bind(self) -> None:
        self._socket = zmq.Context.instance().socket(self._type)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDTIMEO, 10_000)
        # ZeroMQ releases a closed socket's port in its I/O thread, a moment later.
        poll(lambda: self._try_bind(), timeout=10, what=f"binding {self.address}")

    def _try_bind(self) -> bool:
        try:
            self._socket.bind(self.address)
        except zmq.ZMQError as error:
            if error.errno != zmq.EADDRINUSE:
                raise
            return False
        return True

    def restart(self) -> None:
        """Like a source process that dies and comes back on the same port."""
        self._socket.close(linger=0)
        self._bind()

    def send(self, pulse_id: int, channels: Iterable[ChannelSpec] = CHANNELS,
             absent: Iterable[str] = (), dh_compression: str = "none") -> None:
        absent = set(absent)
        parts = [(spec, None if spec.name in absent else value_for(spec, pulse_id),
                  timestamp_for(pulse_id)) for spec in channels]
        self.send_frames(encode_message(pulse_id, timestamp_for(pulse_id), parts,
                                        dh_compression))

    def send_range(self, first: int, last: int, **kwargs) -> None:
        for pulse_id in range(first, last + 1):
            self.send(pulse_id, **kwargs)

    def send_frames(self, frames: list[bytes]) -> None:
        self._socket.send_multipart(frames)

    def close(self) -> None:
        self._socket.close(linger=0)


class PreEncoded:
    """Messages of a few pre-encoded pulses (pulse p reuses the parts of pulse p % len),
    with only the main header built per pulse (bsread spec: htype, hash, pulse_id,
    global_timestamp): a sender that must outrun the IOC spends ~nothing per message, and
    a long stream of camera frames holds only the few distinct images in memory."""

    def __init__(self, messages: list[list[bytes]]) -> None:
        self._messages = messages
        self._hash = json.loads(messages[0][0])["hash"]

    def frames(self, pulse_id: int) -> list[bytes]:
        sec, ns = divmod(timestamp_for(pulse_id), 1_000_000_000)
        main = json.dumps({"htype": "bsr_m-1.1", "hash": self._hash, "pulse_id": pulse_id,
                           "global_timestamp": {"sec": sec, "ns": ns}}).encode()
        return [main, *self._messages[pulse_id % len(self._messages)][1:]]


class IncompressibleCamera:
    """Incompressible uint16 frames with bitshuffle_lz4 (the worst case for the disk),
    a few distinct ones encoded once and cycled by pulse id."""

    def __init__(self, shape: tuple[int, ...], distinct: int = 4) -> None:
        self.spec = ChannelSpec("PACED:FRAME", "uint16", shape, compression="bitshuffle_lz4")
        rng = np.random.default_rng(7)
        self.images = [rng.integers(0, 65535, shape, dtype=np.uint16) for _ in range(distinct)]
        self._encoded = PreEncoded([
            encode_message(p, timestamp_for(p), [(self.spec, image, timestamp_for(p))])
            for p, image in enumerate(self.images)])

    def frames(self, pulse_id: int) -> list[bytes]:
        return self._encoded.frames(pulse_id)

    def image_for(self, pulse_id: int) -> np.ndarray:
        return self.images[pulse_id % len(self.images)]


class PacedSender(threading.Thread):
    """Sends consecutive pulse ids at ``rate_hz`` on a drift-free schedule until stopped
    or ``count`` are sent; ``sent`` in order, ``sent_at`` when each went out. The
    messages are ``source.send``'s, or ``frames(pulse_id)`` when given."""

    def __init__(self, source: BsreadSource, first: int, rate_hz: float = 200.0,
                 channels=CHANNELS, frames: Callable[[int], list[bytes]] | None = None,
                 count: int | None = None) -> None:
        super().__init__(daemon=True)
        self.source, self.next_pulse_id, self.period = source, first, 1.0 / rate_hz
        self.channels, self._frames, self._count = channels, frames, count
        self.sent: list[int] = []
        self.sent_at: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while not self.halt.is_set() and (self._count is None or len(self.sent) < self._count):
            try:
                self._send(self.next_pulse_id)
            except zmq.Again:  # no receiver for SNDTIMEO (the IOC was killed): done
                return
            self.sent_at.append(time.monotonic())
            self.sent.append(self.next_pulse_id)
            self.next_pulse_id += 1
            due = start + len(self.sent) * self.period
            self.halt.wait(max(0.0, due - time.monotonic()))  # pacing, not synchronisation

    def _send(self, pulse_id: int) -> None:
        if self._frames is None:
            self.source.send(pulse_id, channels=self.channels)
        else:
            self.source.send_frames(self._frames(pulse_id))

    def finish(self) -> list[int]:
        self.halt.set()
        self.join(10)
        return list(self.sent)


def member_channels(index: int, channels=CHANNELS) -> tuple[ChannelSpec, ...]:
    """``channels`` named for stream ``index`` ("M<index>:..."): each stream of a group
    has its own channel names, as SwissFEL's streams do."""
    return tuple(dataclasses.replace(spec, name=f"M{index}:{spec.name}") for spec in channels)


class CommonPulseStreams(threading.Thread):
    """Sends the same pulse id to every source (one timing system numbers every stream),
    source i with ``member_channels(i, channels)``, every ``period`` s."""

    def __init__(self, sources: list[BsreadSource], first_pulse_id: int,
                 channels=CHANNELS, period: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.sources = sources
        self.pulse_id = first_pulse_id
        self.sent_at: dict[int, float] = {}  # pulse id -> time.monotonic() when sent
        self.silent: set[int] = set()  # sources whose receiver is gone: a PUSH would block
        self._channels = [member_channels(i, channels) for i in range(len(sources))]
        self._period = period
        self._halted = threading.Event()

    def run(self) -> None:
        while not self._halted.wait(self._period):
            for index, source in enumerate(self.sources):
                if index not in self.silent:
                    source.send(self.pulse_id, channels=self._channels[index])
            self.sent_at[self.pulse_id] = time.monotonic()
            self.pulse_id += 1

    def halt(self) -> None:
        self._halted.set()
        self.join()


@contextlib.contextmanager
def streaming_ioc(port: int, tag: str, root: Path, log_path: Path, *args: str,
                  wrapper: Iterable[str] = ()) -> Iterator[tuple[IocProcess, BsreadSource]]:
    """An IOC on a new BsreadSource, files under ``root``, started through ``wrapper``
    (e.g. PvaPorts.server_wrapper()): (ioc, source); at the end the source is closed
    and the IOC must exit 0."""
    source = BsreadSource()
    ioc = IocProcess(port, unique_prefix(tag),
                     ["--stream", source.address, "--output-root", str(root), *args], log_path,
                     wrapper=wrapper)
    try:
        yield ioc, source
    finally:
        source.close()
        assert ioc.stop() == 0, ioc.log()


@contextlib.contextmanager
def paced_ioc(port: int, tag: str, root: Path, log_path: Path,
              first_pulse_id: int) -> Iterator[IocProcess]:
    """An IOC receiving a 100 Hz stream of CHANNELS from ``first_pulse_id`` on, once its
    first message is in; at the end the stream stops and the IOC must exit 0."""
    with streaming_ioc(port, tag, root, log_path) as (ioc, source):
        sender = PacedSender(source, first=first_pulse_id, rate_hz=100.0)
        sender.start()
        try:
            poll(lambda: ioc.get("LAST_PULSE_ID") > 0, what="the stream at the IOC")
            yield ioc
        finally:
            sender.finish()
