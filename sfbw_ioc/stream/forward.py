"""The buffered stream, re-published (the predecessor's ``-o OUTPUT_PORT``).

Every intact message the receiver took is sent on, its parts unchanged (the very frames
received: no copy), to whoever connects. A PUSH source gives each message to one of its
consumers; through this port online analysis and the writer all get every message.

Sending never waits: a consumer that is slow or absent loses messages, counted in
``dropped``. PUB mode is an XPUB socket with ``XPUB_NODROP``, so that a full subscriber
queue is reported (EAGAIN) instead of dropped silently as PUB does; the message is then
dropped for every subscriber. Only the receiver thread calls ``send``.
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence

import zmq

from ..bsread import Buffer

log = logging.getLogger(__name__)

MODES = ("pub", "push")
# Messages queued per consumer: memory outside the ring's budget (they hold the
# receiver's frames), bounded by this times the largest message.
SEND_HWM = 32


class Forwarder:
    """A PUB (XPUB) or PUSH socket bound on ``port`` of ``host`` (all interfaces: '*')."""

    def __init__(self, port: int, mode: str = "pub", host: str = "*",
                 context: zmq.Context | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"output mode must be one of {MODES}, not {mode!r}")
        context = context or zmq.Context.instance()
        self.mode = mode
        self._socket = context.socket(zmq.XPUB if mode == "pub" else zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        if mode == "pub":
            self._socket.setsockopt(zmq.XPUB_NODROP, 1)
        self._socket.bind(f"tcp://{host}:{port}")
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self._sent = 0
        self._dropped = 0
        log.info("re-publishing the stream on %s (%s)", self.address, mode)

    def send(self, frames: Sequence[Buffer]) -> None:
        """Send one message on, or count it dropped when a consumer's queue is full (or,
        for PUSH, nobody is connected)."""
        try:
            # Once the first part is queued, ZeroMQ queues the rest of the message.
            self._socket.send(frames[0], zmq.NOBLOCK | (zmq.SNDMORE if len(frames) > 1 else 0),
                              copy=False)
        except zmq.Again:
            with self._lock:
                self._dropped += 1
            return
        for index in range(1, len(frames)):
            more = zmq.SNDMORE if index < len(frames) - 1 else 0
            self._socket.send(frames[index], more, copy=False)
        with self._lock:
            self._sent += 1

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    @property
    def sent(self) -> int:
        with self._lock:
            return self._sent

    def close(self) -> None:
        self._socket.close(linger=0)
