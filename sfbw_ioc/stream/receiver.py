"""The receiver thread: a bsread ZeroMQ stream into the ring buffer, forever.

Per message it parses only the main header (pulse id, data-header hash) and checks the
message's structure against the cached data header; values stay raw for the writer.
"""
from __future__ import annotations

import logging
import socket as sockets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol, Sequence

import zmq

from ..bsread import (Buffer, HeaderCache, MalformedMessage, check_structure, corrupt_chunks,
                      parse_main_header)
from .malformed import MalformedCounter
from .message import RawMessage
from .ring import RingBuffer
from .zmqparts import Receive, best_receive

log = logging.getLogger(__name__)

MODES = {"pull": zmq.PULL, "sub": zmq.SUB}
_POLL_MS = 100
# Messages taken per wake-up; they reach the ring together (one lock, one wake-up of
# the writer), so a burst costs less per message than a trickle. Bounded in bytes too:
# a batch is memory outside the ring's budget.
_DRAIN_BATCH = 64
_DRAIN_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ReceiverStats:
    received: int  # good messages put into the ring
    last_pulse_id: int | None
    pulse_id_anomalies: int  # pulse id repeated or went back (source restart)
    last_arrival: float | None = None  # time.monotonic() of the last message
    listening_since: float = 0.0  # time.monotonic() when this stream was first listened to
    unresolved: str | None = None  # why the stream's host name does not resolve


class Forward(Protocol):
    """Where the receiver sends on every intact message, parts unchanged (it must never
    block: sfbw_ioc.forward.Forwarder)."""

    def send(self, parts: Sequence[Buffer]) -> None: ...


class Receiver(threading.Thread):
    """Connects to ``address`` (PULL or SUB) and appends every good message to ``ring``
    (and hands the intact ones to ``forward``); ``receive`` takes a message's parts off
    the socket (default: the fastest of sfbw_ioc.zmqparts)."""

    def __init__(self, address: str, ring: RingBuffer, malformed: MalformedCounter,
                 mode: str = "pull", context: zmq.Context | None = None,
                 forward: Forward | None = None, receive: Receive | None = None) -> None:
        super().__init__(name="bsread-receiver", daemon=True)
        _check_mode(mode)
        self.address = address
        self.mode = mode
        self._ring = ring
        self._malformed = malformed
        self._forward = forward
        self._receive = receive or best_receive()  # parts end where ZeroMQ ends them
        self._switch: tuple[str, str, Future] | None = None
        self._switching = threading.Event()
        self._context = context or zmq.Context.instance()
        self._headers = HeaderCache()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._received = 0
        self._last_pulse_id: int | None = None
        self._anomalies = 0
        self._last_anomaly_log = float("-inf")
        self._last_arrival: float | None = None
        self._listening_since = time.monotonic()
        self._unresolved: str | None = None

    def stop(self, timeout: float = 2.0) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def reconnect(self, address: str, mode: str) -> Future:
        """Listen to ``address`` instead: the receiver thread closes its socket, empties
        the ring (no message of the old stream may reach a file as the new one's) and
        connects anew. The future resolves once the ring is empty."""
        _check_mode(mode)
        future: Future = Future()
        with self._lock:
            if self._switch is not None:
                raise RuntimeError("a change of stream is under way")
            self._switch = (address, mode, future)
        self._switching.set()
        return future

    def stats(self) -> ReceiverStats:
        with self._lock:
            return ReceiverStats(self._received, self._last_pulse_id, self._anomalies,
                                 self._last_arrival, self._listening_since, self._unresolved)

    def run(self) -> None:
        # A socket error other than the stop must never end buffering: wait, reconnect.
        while not self._stop_event.is_set():
            try:
                self._receive_until_stopped()
            except zmq.ZMQError:
                log.exception("receiver socket failed; reconnecting to %s in 1 s", self.address)
                self._stop_event.wait(1.0)
            self._switch_stream()

    def _switch_stream(self) -> None:
        """Apply a pending ``reconnect``; the old socket is closed by now."""
        with self._lock:
            switch, self._switch = self._switch, None
            self._switching.clear()
            if switch is None:
                return
            self.address, self.mode, future = switch
            self._last_pulse_id = None  # the new source's pulse ids are no anomaly
            self._last_arrival = None
            self._listening_since = time.monotonic()
        self._ring.clear()
        log.info("stream changed to %s (%s); buffer emptied", self.address, self.mode)
        future.set_result(None)

    def _receive_until_stopped(self) -> None:
        socket = self._open_socket()
        try:
            poller = zmq.Poller()
            poller.register(socket, zmq.POLLIN)
            while not (self._stop_event.is_set() or self._switching.is_set()):
                if poller.poll(_POLL_MS):
                    self._drain(socket)
        finally:
            socket.close(linger=0)

    def _open_socket(self) -> zmq.Socket:
        socket = self._context.socket(MODES[self.mode])
        # Messages waiting in ZeroMQ are outside the ring and its byte budget: keep few.
        socket.setsockopt(zmq.RCVHWM, 100)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # TCP keepalive notices a source that vanished without closing its connection.
        # Not ZeroMQ heartbeats: a receiver busy for longer than their timeout has its
        # connection dropped with the messages queued on it (libzmq #4767).
        socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
        socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)
        socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 5)
        if self.mode == "sub":
            socket.setsockopt(zmq.SUBSCRIBE, b"")
        unresolved = _resolve_error(self.address)
        with self._lock:
            self._unresolved = unresolved
        socket.connect(self.address)
        log.info("receiving bsread from %s (%s)", self.address, self.mode)
        return socket

    def _drain(self, socket: zmq.Socket) -> None:
        batch: list[RawMessage] = []
        nbytes = 0
        for _ in range(_DRAIN_BATCH):
            if nbytes >= _DRAIN_BYTES:
                break
            try:
                message, intact = self._next_message(socket)
                batch.append(message)
                nbytes += message.nbytes
                if intact is not None and self._forward is not None:
                    self._forward.send(intact)
            except zmq.Again:
                break
            except MalformedMessage as error:
                self._malformed.report(error)
            except Exception as error:  # a codec bug must not end buffering: count, log
                log.exception("unexpected error on a message; counted as malformed")
                self._malformed.report(MalformedMessage("unexpected", repr(error)))
        if batch:
            self._store(batch)

    def _store(self, batch: list[RawMessage]) -> None:
        self._ring.extend(batch)
        with self._lock:
            self._last_arrival = time.monotonic()
            for message in batch:
                if self._last_pulse_id is not None and message.pulse_id <= self._last_pulse_id:
                    self._note_anomaly(self._last_pulse_id, message.pulse_id)
                self._last_pulse_id = message.pulse_id
            self._received += len(batch)

    def _note_anomaly(self, previous: int, current: int) -> None:
        self._anomalies += 1
        # A source repeating pulse ids would log at 100 Hz: at most one line per 10 s.
        now = time.monotonic()
        if now - self._last_anomaly_log >= 10.0:
            self._last_anomaly_log = now
            log.warning("pulse id went from %d to %d (source restart?); %d such so far",
                        previous, current, self._anomalies)

    def _next_message(self, socket: zmq.Socket) -> tuple[RawMessage, list[Buffer] | None]:
        """One whole message off the socket, checked, and its parts as received when it
        is intact (they may be sent on; None when an image was left out); zmq.Again when
        there is none, MalformedMessage once all its parts are taken off the socket."""
        return self._parse(self._receive(socket))

    def _parse(self, frames: list[Buffer]) -> tuple[RawMessage, list[Buffer] | None]:
        if len(frames) < 2:
            raise MalformedMessage("part_count", f"{len(frames)} parts, need at least 2")
        main = parse_main_header(frames[0])
        header = self._headers.get(main, frames[1])
        check_structure(header, frames)
        # Checked here, once: a corrupt image is counted as it arrives, and the ring
        # holds the message without it (absent), so no file can get it.
        corrupt = corrupt_chunks(header, frames)
        intact = None if corrupt else frames
        for index, error in corrupt:
            self._malformed.report(error, main.pulse_id)
            frames = [*frames[:2 + 2 * index], b"", b"", *frames[4 + 2 * index:]]
        message = RawMessage.pack(main.pulse_id, main.global_timestamp_ns, header, frames)
        return message, intact


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")


def _resolve_error(address: str) -> str | None:
    """Why the host of tcp://host:port does not resolve (None: it does). ZeroMQ retries a
    name that does not resolve forever and says nothing; the receiver's thread may wait
    for the resolver, the IOC's loop never does."""
    host = address.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    try:
        sockets.getaddrinfo(host, None)
    except (sockets.gaierror, UnicodeError) as error:
        return f"{host}: {error}"
    return None
