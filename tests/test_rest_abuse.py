"""The REST API under abuse (issue 26.4), against an IOC subprocess with a paced stream:
bodies over the limit, a flood of malformed requests, connections that send nothing,
unknown paths, START/STOP from REST and Channel Access at once. All traffic to
127.0.0.1; every loop bounded in count and time."""
from __future__ import annotations

import http.client
import json
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import epics
import h5py
import pytest

from sfbw_ioc.bridges.rest import IDLE_SECONDS, MAX_BODY_BYTES, MAX_CONNECTIONS
from sfbw_ioc.testing.files import assert_rows
from sfbw_ioc.testing.ioc import IocProcess, caput_binary, free_port, poll, unique_prefix
from sfbw_ioc.testing.sources import CHANNELS, BsreadSource, PacedSender
from test_rest import Rest

PULSE0 = 70_000_000_000
RING = 200  # messages: the ring is full (its memory settled) 2 s into the stream
STATUS_OF_STATE = {0: "waiting", 1: "writing", 2: "writing", 3: "writing", 4: "error"}


@dataclass
class Rig:
    ioc: IocProcess
    sender: PacedSender
    root: Path
    rest: Rest


@pytest.fixture(scope="module")
def rig(tmp_path_factory, ca_ports):
    root = tmp_path_factory.mktemp("output")
    source = BsreadSource()
    rest_port = free_port()
    ioc = IocProcess(ca_ports(), unique_prefix("RABUSE"),
                     ["--stream", source.address, "--output-root", str(root),
                      "--rest-port", str(rest_port), "--buffer-length", str(RING)],
                     tmp_path_factory.mktemp("log") / "ioc.log")
    sender = PacedSender(source, PULSE0, rate_hz=100.0)
    sender.start()
    ioc.wait_for("BUFFER_COUNT", RING)
    yield Rig(ioc, sender, root, Rest(rest_port))
    sender.finish()
    source.close()
    assert ioc.stop() == 0, ioc.log()
    assert not re.search(r"REST \S+ \S+ failed", ioc.log())  # no fault of the API's own


def memory_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of a process, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes | None:
    """Send ``request`` on a new connection and read until the server closes it:
    the answer, b"" when closed unanswered, None when reset or refused (dropped)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
            connection.sendall(request)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
            return answer
    except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
        return None


def answer_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_body_over_the_limit_is_refused_unread_and_costs_no_memory(rig):
    rest, pid = rig.rest, rig.ioc.pid
    body = b"{" + b" " * (2 * 1024 * 1024) + b"}"  # 2 MiB, and JSON

    def with_length() -> tuple[int, dict]:
        status, answer = rest.call("POST", "/parameters", body)
        return status, json.loads(answer)

    def chunked() -> tuple[int, dict]:  # no Content-Length: aiohttp's own limit acts
        connection = http.client.HTTPConnection("127.0.0.1", int(rest.url.rsplit(":", 1)[1]),
                                                timeout=30)
        try:
            chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
            connection.request("POST", "/parameters", body=chunks, encode_chunked=True)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def batch() -> list[tuple[int, dict]]:  # 8 at a time: 16 MiB if buffered whole
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda send: send(), [with_length, chunked] * 8))

    refusal = {"state": "error",
               "status": f"the request body is over the limit of {MAX_BODY_BYTES} bytes"}
    rss_start = memory_kib(pid, "VmRSS")
    assert batch() == [(413, refusal)] * 16
    # The first batch sets the allocator's and the sockets' buffers; then no growth.
    rss_before, peak_before = memory_kib(pid, "VmRSS"), memory_kib(pid, "VmHWM")
    for _ in range(3):
        assert batch() == [(413, refusal)] * 16
    grown = memory_kib(pid, "VmRSS") - rss_before
    peak_grown = memory_kib(pid, "VmHWM") - peak_before
    print(f"RSS {rss_start} KiB; +{rss_before - rss_start} KiB in the first 32 MiB of bodies, "
          f"+{grown} KiB (peak +{peak_grown} KiB) in the next 96 MiB")
    assert rss_before - rss_start < 16 * 1024
    assert grown < 8192 and peak_grown < 8192
    assert rest.status() == "waiting"  # and the IOC answers as before


# Each answered by the API's refusal or aiohttp's 400 (none is a command that acts).
MALFORMED = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",  # TLS on the HTTP port
    b"GET /status HTTP/9\r\n\r\n",
    b"GET /status HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /status HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(40)) + b"\r\n",
    b"GET /status HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"GET /status HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /parameters HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\n{bad!",
    b"POST /parameters HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 6\r\n\r\n[1, 2]",
    b"PUT /start_pulse_id/-5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"PUT /stop_pulse_id/1e9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    bytes(random.Random(26).randrange(256) for _ in range(300)),
]
FLOOD_THREADS, FLOOD_PER_THREAD, FLOOD_SECONDS = 6, 500, 60.0


def flood(port: int, outcomes: list[str]) -> None:
    deadline = time.monotonic() + FLOOD_SECONDS
    for i in range(FLOOD_PER_THREAD):
        if time.monotonic() > deadline:
            return
        try:
            answer = exchange(port, MALFORMED[i % len(MALFORMED)])
        except socket.timeout:
            outcomes.append("hung")
            continue
        outcomes.append("dropped" if not answer else
                        "answered" if answer.startswith(b"HTTP/1.") else "garbled")


def test_a_flood_of_malformed_requests_leaves_the_ioc_responsive_and_the_file_exact(rig):
    ioc, rest, root = rig.ioc, rig.rest, rig.root
    port = int(rest.url.rsplit(":", 1)[1])
    log_before = len(ioc.log())
    ioc.put("OUTPUT_FILE", "flooded.h5")
    start = int(ioc.get("LAST_PULSE_ID"))
    ioc.put("START_PULSE_ID", start)
    outcomes: list[str] = []
    floods = [threading.Thread(target=flood, args=(port, outcomes)) for _ in range(FLOOD_THREADS)]
    began = time.monotonic()
    for thread in floods:
        thread.start()
    caget_seconds, statuses = [], []
    while any(thread.is_alive() for thread in floods) and time.monotonic() - began < 90:
        asked = time.monotonic()
        assert ioc.get("STATE") in (1, 2)  # a caget answers: the acquisition runs
        caget_seconds.append(time.monotonic() - asked)
        statuses.append(rest.status())  # and so does a well-behaved REST client
    for thread in floods:
        thread.join(FLOOD_SECONDS)
    flood_seconds = time.monotonic() - began
    stop = int(ioc.get("LAST_PULSE_ID")) + 20
    ioc.put("STOP_PULSE_ID", stop)
    ioc.wait_for("STATE", 0, timeout=20)

    counts = {outcome: outcomes.count(outcome) for outcome in set(outcomes)}
    print(f"flood: {counts} in {flood_seconds:.1f} s; {len(caget_seconds)} cagets meanwhile, "
          f"the slowest {max(caget_seconds) * 1000:.0f} ms")
    assert len(outcomes) == FLOOD_THREADS * FLOOD_PER_THREAD  # all sent within the bound
    assert set(counts) <= {"answered", "dropped"} and counts["answered"] > len(outcomes) // 2
    assert caget_seconds and set(statuses) == {"writing"}
    assert_rows(root / "flooded.h5", list(range(start, stop + 1)))
    assert ioc.get("LOST") == 0
    # aiohttp's traceback per malformed request became a line per interval at most.
    flood_log = ioc.log()[log_before:]
    assert "Traceback" not in flood_log
    assert flood_log.count("rest.http") <= flood_seconds / 10 + 2


def test_connections_that_send_nothing_are_closed_and_bounded(rig):
    rest = rig.rest
    port = int(rest.url.rsplit(":", 1)[1])
    opened = time.monotonic()
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS - 4)]
    half_heads = held[:10]  # a slowloris: a head that never ends
    for connection in half_heads:
        connection.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
    slow_body = socket.create_connection(("127.0.0.1", port))
    slow_body.sendall(b"POST /parameters HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"gen")
    try:
        assert rest.status() == "waiting"  # below the limit, a new client is served
        held += [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        # The limit reached: a new client is answered 503 at once.
        answer = exchange(port, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer is not None and answer_json(answer) == (503, {"state": "error", "status": (
            f"too many connections (the limit is {MAX_CONNECTIONS}): try again later")})

        for connection in held:
            connection.settimeout(IDLE_SECONDS + 5)
            assert connection.recv(1024) == b""  # closed by the server, unanswered
        closed = time.monotonic() - opened
        status, refusal = answer_json(slow_body.recv(4096))
        assert (status, refusal["status"]) == (
            408, f"the request body did not arrive within {IDLE_SECONDS:g} s")
        print(f"{len(held)} silent connections closed {closed:.1f} s after they opened")
        assert IDLE_SECONDS - 1 < closed < IDLE_SECONDS + 5
        assert rest.status() == "waiting"  # the slots are free again
    finally:
        for connection in [*held, slow_body]:
            connection.close()


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/nowhere", 404), ("GET", "/status/extra", 404), ("PUT", "/start_pulse_id/", 404),
    ("GET", "/%00", 404), ("GET", "/../../etc/passwd", 404), ("GET", "/" + "x" * 4000, 404),
    ("POST", "/status", 405), ("DELETE", "/kill", 405), ("GET", "/start_now", 405)])
def test_an_unknown_path_or_method_gets_its_status_with_json(rig, method, path, status):
    answer = rig.rest.json(method, path, http_status=status)
    assert answer["state"] == "error" and answer["status"]


ROUNDS = 12


def test_start_and_stop_from_rest_and_channel_access_at_once_agree(rig):
    ioc, rest, root = rig.ioc, rig.rest, rig.root
    ioc.put("FILE_NAME", "race")  # OUTPUT_FILE composed anew after every file
    ioc.put("AUTO_INCREMENT", 1)
    commands = [
        lambda: rest.call("PUT", "/start_now"),
        lambda: epics.caput(ioc.pv("START_NOW"), 1, wait=True, timeout=10),
        lambda: caput_binary(ioc.pv("START_NOW"), "1", ca_timeout=5),
        lambda: rest.call("PUT", "/stop_now"),
        lambda: rest.call("GET", "/stop"),
        lambda: epics.caput(ioc.pv("STOP_NOW"), 1, wait=False),
        lambda: caput_binary(ioc.pv("STOP_NOW"), "1", ca_timeout=5),
    ]
    shuffle = random.Random(264)
    with ThreadPoolExecutor(len(commands)) as pool:
        for _ in range(ROUNDS):
            shuffle.shuffle(commands)
            for done in [pool.submit(command) for command in commands]:
                done.result(timeout=60)
            poll(lambda: _quiet_and_agreeing(ioc, rest), timeout=15,
                 what="STATE and /status agreeing")
    if ioc.get("STATE") != 0:
        rest.json("GET", "/stop")
    ioc.wait_for("STATE", 0)
    assert not list(root.glob("**/*.partial"))
    files = sorted(root.glob("race_*.h5"))
    print(f"{ROUNDS} rounds: {len(files)} files")
    assert files
    for path in files:
        assert_consecutive_and_exact(path)


def _quiet_and_agreeing(ioc: IocProcess, rest: Rest) -> bool:
    """STATE is not between two states (CLOSING) and /status says the same, read before
    and after it."""
    before = ioc.get("STATE")
    status = rest.status()
    return before != 3 and ioc.get("STATE") == before and STATUS_OF_STATE[before] == status


def assert_consecutive_and_exact(path: Path) -> None:
    with h5py.File(path) as f:
        first = f"data/{CHANNELS[0].name}/pulse_id"
        pulse_ids = f[first][:].tolist() if first in f else []
    if pulse_ids:  # a file stopped before its first row has none
        assert pulse_ids == list(range(pulse_ids[0], pulse_ids[-1] + 1)), path
        assert_rows(path, pulse_ids)
