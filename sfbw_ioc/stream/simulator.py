"""A bsread source for demos and tests: a few synthetic channels at a fixed pulse rate.

Pulse ids come from the wall clock (pulses since PULSE_ID_EPOCH_NS), so they look like
SwissFEL's (above 2**31) and restarting the simulator never makes them go back. Every
value is a pure function of the pulse id (``simulated_values``), so a test can tell
exactly what a received message must contain.
"""
from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time

import numpy as np
import zmq

from ..bsread import ChannelSpec, Encoder

log = logging.getLogger(__name__)

# 2016-01-01T00:00:00Z, about when SwissFEL started counting pulses.
PULSE_ID_EPOCH_NS = 1_451_606_400 * 1_000_000_000
CAMERA_EVERY = 10  # the camera delivers an image only on every 10th pulse id
SEND_HWM = 1000

FLOAT64_1 = ChannelSpec("SIM:FLOAT64-1", "float64", ())
FLOAT64_2 = ChannelSpec("SIM:FLOAT64-2", "float64", ())
INT32 = ChannelSpec("SIM:INT32", "int32", ())
WAVEFORM = ChannelSpec("SIM:WAVEFORM", "float32", (256,))
STATUS = ChannelSpec("SIM:STATUS", "string", ())
CAMERA = ChannelSpec("SIM:CAMERA", "uint16", (64, 80), compression="bitshuffle_lz4")

_WAVEFORM_PHASE = np.arange(256) / 256
_CAMERA_PATTERN = np.add.outer(np.arange(64) * 16, np.arange(80) * 8)


def pulse_period_ns(rate_hz: float) -> int:
    return round(1e9 / rate_hz)


def pulse_time_ns(pulse_id: int, rate_hz: float = 100.0) -> int:
    """The time of a pulse on the simulator's clock (also every channel's timestamp)."""
    return PULSE_ID_EPOCH_NS + pulse_id * pulse_period_ns(rate_hz)


def simulated_values(
    pulse_id: int, rate_hz: float = 100.0
) -> list[tuple[ChannelSpec, np.ndarray | str | None, int]]:
    """(spec, value, timestamp_ns) of every channel for one pulse, in sending order.

    Numeric values are numpy arrays of the channel's dtype (0-d for scalars); the camera
    value is None on pulses without an image.
    """
    timestamp_ns = pulse_time_ns(pulse_id, rate_hz)
    # A 1 Hz cycle at 100 Hz; the remainder keeps the sine's argument small and exact.
    phase = 2 * math.pi * (pulse_id % 100) / 100
    camera = None
    if pulse_id % CAMERA_EVERY == 0:
        camera = ((_CAMERA_PATTERN + pulse_id // CAMERA_EVERY) % 4096).astype(np.uint16)
    values = [
        (FLOAT64_1, np.array(math.sin(phase), dtype=np.float64)),
        (FLOAT64_2, np.array(math.cos(phase), dtype=np.float64)),
        (INT32, np.array(pulse_id % 1000, dtype=np.int32)),
        (WAVEFORM, np.sin(2 * np.pi * _WAVEFORM_PHASE + phase).astype(np.float32)),
        (STATUS, f"ok {pulse_id % 1000}"),
        (CAMERA, camera),
    ]
    return [(spec, value, timestamp_ns) for spec, value in values]


class Simulator:
    """Sends one bsread message per ``pulse_step`` pulses of a ``rate_hz`` pulse clock.

    The socket is bound at construction (``endpoint`` tells the port of a ``:*``
    address). A message that cannot be queued at once (no receiver, or a receiver too
    slow) is dropped and counted, so the simulator never blocks.
    """

    def __init__(
        self, address: str, rate_hz: float = 100.0, mode: str = "push", pulse_step: int = 1
    ) -> None:
        if mode not in ("push", "pub"):
            raise ValueError(f"mode must be push or pub, not {mode!r}")
        if not rate_hz > 0 or pulse_step < 1:
            raise ValueError("rate_hz must be positive and pulse_step at least 1")
        self.rate_hz = rate_hz
        self.mode = mode
        self.pulse_step = pulse_step
        self.sent = 0
        self.dropped = 0
        self._period_ns = pulse_period_ns(rate_hz)
        self._encoder = Encoder()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._closed = False
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUSH if mode == "push" else zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(address)
        except zmq.ZMQError:
            self._close()
            raise
        self._endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def endpoint(self) -> str:
        """The bound address, with the actual port."""
        return self._endpoint

    def start(self) -> None:
        """Run the send loop in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._thread = threading.Thread(target=self.run_forever, name="sfbw-sim", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the send loop, wait for the start()ed thread and close the socket."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if not self._running:
            self._close()

    def run_forever(self) -> None:
        """Send until stop(); closes the socket when it returns."""
        self._running = True
        log.info(
            "simulating %s at %s, %g Hz, pulse step %d",
            self.mode, self.endpoint, self.rate_hz, self.pulse_step,
        )
        try:
            self._loop()
        finally:
            self._close()
            log.info("simulator stopped: %d messages sent, %d dropped", self.sent, self.dropped)

    def _loop(self) -> None:
        pulse_id = self._next_pulse(self._clock_pulse())
        while not self._stopping.is_set():
            # Deadlines come from the pulse grid, not from the previous send: no drift.
            delay_ns = PULSE_ID_EPOCH_NS + pulse_id * self._period_ns - time.time_ns()
            if delay_ns > 0 and self._stopping.wait(delay_ns / 1e9):
                break
            self._send(pulse_id)
            # After a stall, catch up with a burst like a real source's send queue: a
            # skipped pulse would look like a loss to whoever checks the stream.
            pulse_id = self._next_pulse(pulse_id + 1)

    def _clock_pulse(self) -> int:
        return (time.time_ns() - PULSE_ID_EPOCH_NS) // self._period_ns

    def _next_pulse(self, pulse_id: int) -> int:
        """The first pulse id at or after ``pulse_id`` that is a multiple of the step."""
        return -(-pulse_id // self.pulse_step) * self.pulse_step

    def _send(self, pulse_id: int) -> None:
        values = simulated_values(pulse_id, self.rate_hz)
        parts = self._encoder.encode(pulse_id, pulse_time_ns(pulse_id, self.rate_hz), values)
        try:
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        else:
            self.sent += 1

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._socket.close(linger=0)
            self._context.term()


def main(argv: list[str] | None = None) -> int:
    """``sfbw-sim``: serve simulated bsread data until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="sfbw-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True,
                        help="TCP port the source binds; receivers connect to "
                             "tcp://HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the source binds, '*' for every interface "
                             "(default: 127.0.0.1)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="pulse rate in Hz: pulse ids count at this rate from "
                             "2016-01-01 (default: 100)")
    parser.add_argument("--mode", choices=("push", "pub"), default="push",
                        help="ZeroMQ pattern: push (receivers use PULL, each message goes "
                             "to one of them) or pub (receivers use SUB, each gets every "
                             "message) (default: push)")
    parser.add_argument("--pulse-step", type=int, default=1,
                        help="send only every Nth pulse id, as a camera slower than the "
                             "machine does (default: 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # Blocked before any thread exists, so that every thread inherits the mask and the
    # signals wait for sigwait() instead of interrupting the send loop.
    signals = {signal.SIGINT, signal.SIGTERM}
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        try:
            simulator = Simulator(
                f"tcp://{args.host}:{args.port}", args.rate, args.mode, args.pulse_step
            )
        except (zmq.ZMQError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            return 1
        simulator.start()
        received = signal.sigwait(signals)
        log.info("%s received, stopping", signal.Signals(received).name)
        simulator.stop()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return 0


if __name__ == "__main__":
    sys.exit(main())
