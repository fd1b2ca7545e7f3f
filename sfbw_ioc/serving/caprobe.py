"""The IOC's own Channel Access client: proof that the server still answers.

A process can be alive while its CA server is deaf: the event loop blocked (a log pipe
nobody reads), the accept loop unable to take connections (file descriptors exhausted),
a caproto task dead after an overload. Only a real client notices. ``CaProbe`` is a
thread that, every ``period_s``, connects to the server like a new client would, creates
a channel to one of the IOC's PVs and reads it; each answer calls ``on_answer`` (the
watchdog's ``beat``). The CA messages come from caproto's sans-I/O layer; the sockets
are plain blocking ones with timeouts, so the probe never waits on the server's loop.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

import caproto as ca

log = logging.getLogger(__name__)

PROBE_PERIOD_S = 0.5
_LOG_EVERY_S = 10.0
# Who the probe says it is (an access security file must let it read STATE).
PROBE_HOST = "localhost"
PROBE_USER = "sfbw-caprobe"


class ProbeFailed(Exception):
    """The server answered, but not with the PV's value."""


def read_pv(address: tuple[str, int], name: str, timeout: float,
            before_connect: Callable[[int], None] = lambda port: None) -> Any:
    """Read ``name`` from the CA server at ``address`` (IPv4) over a new TCP connection;
    ``before_connect`` is given the connection's local port.

    Raises OSError (no connection, timeout), ProbeFailed or caproto's errors."""
    deadline = time.monotonic() + timeout
    circuit = ca.VirtualCircuit(ca.CLIENT, address, priority=0)
    channel = ca.ClientChannel(name, circuit)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind(("", 0))
        before_connect(sock.getsockname()[1])
        sock.connect(address)
        _send(sock, circuit, ca.VersionRequest(priority=0, version=ca.DEFAULT_PROTOCOL_VERSION),
              ca.HostNameRequest(PROBE_HOST), ca.ClientNameRequest(PROBE_USER),
              channel.create())
        _receive(sock, circuit, deadline, ca.CreateChanResponse)
        _send(sock, circuit, channel.read())
        return _receive(sock, circuit, deadline, ca.ReadNotifyResponse).data


def _send(sock: socket.socket, circuit: ca.VirtualCircuit, *commands: Any) -> None:
    sock.sendall(b"".join(bytes(buffer) for buffer in circuit.send(*commands)))


def _receive(sock: socket.socket, circuit: ca.VirtualCircuit, deadline: float,
             wanted: type) -> Any:
    """Commands from the server until one of type ``wanted``."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {wanted.__name__} in time")
        sock.settimeout(remaining)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        commands, _ = circuit.recv(data)
        for command in commands:
            circuit.process_command(command)
            if isinstance(command, (ca.CreateChFailResponse, ca.ErrorResponse)):
                raise ProbeFailed(repr(command))
            if isinstance(command, wanted):
                return command


class _QuietAboutOwnConnections(logging.Filter):
    """Drops caproto's connect/disconnect lines for the probe's own connections: four
    INFO lines a second, forever, would bury the ones about real clients."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: deque[int] = deque(maxlen=8)  # appended by the probe thread only

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.msg.startswith(("Connected to new client", "Disconnected from client"))
                    and len(args) >= 2 and args[1] in self.ports)


class CaProbe:
    """A thread reading ``pv_name`` from the server at ``address`` every ``period_s``;
    ``on_answer()`` after each successful read. Failures are logged (at most one line
    per 10 s); what to do about silence is the watchdog's business."""

    def __init__(self, address: tuple[str, int], pv_name: str, on_answer: Callable[[], None],
                 period_s: float = PROBE_PERIOD_S, timeout_s: float = 2.0) -> None:
        self.address = address
        self.pv_name = pv_name
        self._on_answer = on_answer
        self._period_s = period_s
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ca-probe", daemon=True)
        self._last_log = -_LOG_EVERY_S
        self._quiet = _QuietAboutOwnConnections()

    def start(self) -> None:
        logging.getLogger("caproto.ctx").addFilter(self._quiet)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        logging.getLogger("caproto.ctx").removeFilter(self._quiet)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                read_pv(self.address, self.pv_name, self._timeout_s,
                        before_connect=self._quiet.ports.append)
                self._on_answer()
            except (OSError, ProbeFailed, ca.CaprotoError) as error:
                self._log_failure(error)
            self._stop.wait(self._period_s)

    def _log_failure(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning("Channel Access self-check: reading %s from %s:%d failed: %s",
                        self.pv_name, *self.address, str(error) or type(error).__name__)


def probe_address(interface: str, port: int) -> tuple[str, int]:
    """Where a local client reaches a server listening on ``interface``."""
    return ("127.0.0.1" if interface in ("0.0.0.0", "") else interface, port)
