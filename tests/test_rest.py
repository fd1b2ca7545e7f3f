"""The predecessor's REST API (``--rest-port``): the IOC as a subprocess, a real bsread
source, HTTP over a real socket (urllib), Channel Access through pyepics, files read
back with h5py."""
from __future__ import annotations

import itertools
import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest

from sfbw_ioc.testing.ioc import IocProcess, free_port, poll, run_ioc, unique_prefix
from sfbw_ioc.testing.sources import BsreadSource, timestamp_for
from sfbw_ioc.testing.files import assert_rows

PREDECESSOR_PARAMETERS = {"general/created": "today", "general/user": "p11057",
                          "general/process": "dia", "general/instrument": "jungfrau"}
# After the predecessor's pulses 0..30, rising: the ring looks up starts in the newest run.
_bases = itertools.count(1000, 1000)


class Rest:
    """An HTTP client of the IOC's REST API."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def json(self, method: str, path: str, body: object = None, raw: bytes | None = None,
             http_status: int = 200) -> dict:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        status, answer = self.call(method, path, data)
        assert status == http_status, (method, path, status, answer)
        return json.loads(answer)

    def command(self, method: str, path: str, body: object = None) -> None:
        """A command the predecessor answered with an empty body."""
        data = None if body is None else json.dumps(body).encode()
        assert self.call(method, path, data) == (200, b""), (method, path)

    def refused(self, method: str, path: str, body: object = None,
                raw: bytes | None = None) -> str:
        answer = self.json(method, path, body, raw)
        assert answer["state"] == "error", answer
        return answer["status"]

    def status(self) -> str:
        answer = self.json("GET", "/status")
        assert answer["state"] == "ok"
        return answer["status"]

    def statistics(self) -> dict:
        return self.json("GET", "/statistics")["statistics"]

    def parameters(self, **extra: str) -> dict:
        parameters = {**PREDECESSOR_PARAMETERS, **extra}
        answer = self.json("POST", "/parameters", parameters)
        assert answer == {"state": "ok", "status": "waiting", "parameters": parameters}
        return parameters


@dataclass
class Rig:
    ioc: IocProcess
    source: BsreadSource
    root: Path
    rest: Rest


@pytest.fixture(scope="module")
def module_rig(tmp_path_factory, ca_ports):
    root = tmp_path_factory.mktemp("output")
    source = BsreadSource()
    rest_port = free_port()
    ioc = IocProcess(ca_ports(), unique_prefix("REST"),
                     ["--stream", source.address, "--output-root", str(root),
                      "--rest-port", str(rest_port),
                      # A silent stream is closed only 2 s × this past the stop: a file
                      # waiting for a stop in the future stays open however slow we are.
                      "--pulse-rate", "1"],
                     tmp_path_factory.mktemp("log") / "ioc.log")
    yield Rig(ioc, source, root, Rest(rest_port))
    source.close()
    assert ioc.stop() == 0, ioc.log()


@pytest.fixture
def rig(module_rig):
    yield module_rig
    module_rig.rest.json("GET", "/kill")  # leave the IOC idle for the next test
    module_rig.ioc.wait_for("STATE", 0)


def buffered(ioc, source, first: int, last: int) -> None:
    source.send_range(first, last)
    ioc.wait_for("LAST_PULSE_ID", last)


def utf8(ioc, name: str) -> str:
    """A CHAR waveform PV's text as UTF-8: pyepics decodes its bytes as Latin-1."""
    return ioc.text(name).encode("latin-1").decode("utf-8")


def general(path: Path) -> dict[str, str]:
    """The predecessor's /general/* (not /general/channels, the selection it never had)."""
    with h5py.File(path) as f:
        return {key: f["general"][key][()].decode() for key in f["general"]
                if key != "channels"}


# First in the module: pulse ids 0..30 are the stream's first, as in the predecessor's test.
def test_the_predecessors_interaction(rig):
    ioc, source, root, rest = rig.ioc, rig.source, rig.root, rig.rest
    buffered(ioc, source, 0, 30)  # 30: the writer stops on the first pulse past the stop
    assert rest.json("GET", "/status") == {"state": "ok", "status": "waiting"}
    parameters = rest.parameters(output_file="predecessor.h5")
    rest.command("PUT", "/start_pulse_id/0")
    answer = rest.json("GET", "/statistics")
    assert answer["state"] == "ok"
    assert answer["statistics"]["start_pulse_id"] == 0
    assert answer["statistics"]["stop_pulse_id"] is None
    rest.command("PUT", "/stop_pulse_id/29")
    target = root / "predecessor.h5"
    poll(lambda: rest.status() == "waiting" and target.exists(), what="the file closed")
    assert_rows(target, list(range(30)))
    assert general(target) == {key.split("/")[1]: value for key, value in parameters.items()
                               if key.startswith("general/")}
    assert rest.statistics() == {"start_pulse_id": 0, "stop_pulse_id": 29,
                                 "start_timestamp": None, "stop_timestamp": None,
                                 "last_pulse_id": 29,
                                 "last_timestamp": pytest.approx(timestamp_for(29) / 1e9)}


def started_from_the_buffer(rig: Rig, buffered_pulses: int, output_file: str) -> int:
    """A REST start at the first of ``buffered_pulses`` pulses sent; its pulse id."""
    base = next(_bases)
    buffered(rig.ioc, rig.source, base, base + buffered_pulses - 1)
    rig.rest.parameters(output_file=output_file)
    rig.rest.command("PUT", f"/start_pulse_id/{base}")
    return base


def test_a_stop_answers_when_taken_and_the_file_closes_later(rig):
    ioc, source, root, rest = rig.ioc, rig.source, rig.root, rig.rest
    base = started_from_the_buffer(rig, 10, "later.h5")
    rest.command("PUT", f"/stop_pulse_id/{base + 50}")  # pulses up to base + 9 so far
    target = root / "later.h5"
    assert rest.status() == "writing" and not target.exists()
    assert rest.statistics()["stop_pulse_id"] == base + 50
    source.send_range(base + 10, base + 51)
    poll(lambda: rest.status() == "waiting", what="the file closed")
    assert_rows(target, list(range(base, base + 51)))
    # The put-with-callback the REST call left running has completed for CA clients.
    assert ioc.get("STOP_PULSE_ID") == base + 50
    assert rest.statistics()["last_pulse_id"] == base + 50


def test_a_late_stop_cuts_the_rows_and_the_statistics_follow(rig):
    ioc, root, rest = rig.ioc, rig.root, rig.rest
    base = started_from_the_buffer(rig, 21, "late_stop.h5")
    poll(lambda: ioc.get("WRITTEN") == 21, what="all 21 buffered rows written")
    rest.command("PUT", f"/stop_pulse_id/{base + 10}")  # rows past it are in the file
    poll(lambda: rest.status() == "waiting", what="the file closed")
    assert_rows(root / "late_stop.h5", list(range(base, base + 11)))
    assert "had passed the stop pulse" in ioc.text("MESSAGE")  # rows were cut
    statistics = rest.statistics()
    assert statistics["last_pulse_id"] == base + 10
    assert statistics["last_timestamp"] == pytest.approx(timestamp_for(base + 10) / 1e9)


def test_every_refusal_is_an_error_answer(rig):
    ioc, source, root, rest = rig.ioc, rig.source, rig.root, rig.rest
    base = next(_bases)
    buffered(ioc, source, base, base + 9)
    user_before, output_file_before = ioc.text("USER"), ioc.text("OUTPUT_FILE")
    (root / "taken.h5").write_bytes(b"")
    missing = dict(PREDECESSOR_PARAMETERS)
    del missing["general/process"]
    assert rest.refused("POST", "/parameters", missing).startswith(
        "Missing mandatory parameters")
    assert "not JSON" in rest.refused("POST", "/parameters", raw=b"{bad")
    assert "JSON object" in rest.refused("POST", "/parameters", [1, 2])
    assert "must be a string" in rest.refused(
        "POST", "/parameters", {**PREDECESSOR_PARAMETERS, "general/user": 123})
    assert "unknown parameters" in rest.refused(
        "POST", "/parameters", {**PREDECESSOR_PARAMETERS, "general/usr": "x"})
    assert "USER holds 256" in rest.refused(  # with a good output_file: all or nothing
        "POST", "/parameters", {**PREDECESSOR_PARAMETERS, "general/user": "é" * 129,
                                "output_file": "fine.h5"})
    assert "outside the output root" in rest.refused(
        "POST", "/parameters", {**PREDECESSOR_PARAMETERS, "output_file": "../out.h5"})
    assert "exists already" in rest.refused(
        "POST", "/parameters", {**PREDECESSOR_PARAMETERS, "output_file": "taken.h5"})
    # Refused before anything was set.
    assert (ioc.text("USER"), ioc.text("OUTPUT_FILE")) == (user_before, output_file_before)
    for pulse_id in ("abc", "-5", "1.5", "+5", str(2**53)):
        assert "pulse id" in rest.refused("PUT", f"/start_pulse_id/{pulse_id}")
        assert "pulse id" in rest.refused("PUT", f"/stop_pulse_id/{pulse_id}")
    assert "nothing to stop" in rest.refused("PUT", "/stop_now")
    assert "nothing to stop" in rest.refused("GET", "/stop")
    assert "outside the output root" in rest.refused("PUT", "/start_now",
                                                     {"output_file": "/etc/x.h5"})
    assert "unknown parameters" in rest.refused("PUT", "/start_now", {"file": "x.h5"})
    assert "JSON object" in rest.refused("PUT", "/start_now", raw=b'"x.h5"')
    assert ioc.get("STATE") == 0 and rest.status() == "waiting"
    assert rest.json("GET", "/nowhere", http_status=404) == {"state": "error",
                                                             "status": "Not Found"}
    assert rest.json("DELETE", "/status", http_status=405)["state"] == "error"

    # Refusals while writing: START again, a stop before the start.
    rest.command("PUT", "/start_now", {"output_file": "refusals.h5"})
    assert "an acquisition is running" in rest.refused("PUT", f"/start_pulse_id/{base}")
    assert "an acquisition is running" in rest.refused("PUT", "/start_now")
    rest.json("GET", "/kill")
    rest.parameters(output_file="refusals_2.h5")
    rest.command("PUT", f"/start_pulse_id/{base + 5}")
    assert "before the start" in rest.refused("PUT", f"/stop_pulse_id/{base + 4}")
    assert rest.status() == "writing" and ioc.get("STATE") in (1, 2)
    assert "Traceback" not in ioc.log()  # every refusal was answered, none was a fault


def test_channel_access_and_rest_see_each_other(rig):
    ioc, source, root, rest = rig.ioc, rig.source, rig.root, rig.rest
    base = next(_bases)
    buffered(ioc, source, base, base + 9)
    # REST parameters → the PVs; a CA START then writes them, general/created included.
    rest.parameters(output_file="by_ca.h5", **{"general/user": "alice ✓",
                                               "general/created": "yesterday"})
    assert utf8(ioc, "USER") == "alice ✓" and ioc.text("OUTPUT_FILE") == "by_ca.h5"
    ioc.put("START_PULSE_ID", base + 2)
    assert rest.status() == "writing"
    assert rest.statistics()["start_pulse_id"] == base + 2
    source.send_range(base + 10, base + 14)
    ioc.wait_for("LAST_PULSE_ID", base + 14)
    # GET /stop answers once the file is closed.
    assert rest.json("GET", "/stop") == {"state": "ok", "status": "waiting"}
    first = root / "by_ca.h5"
    assert ioc.text("LAST_FILE") == str(first) and ioc.get("STATE") == 0
    assert_rows(first, list(range(base + 2, base + 15)))
    assert general(first)["created"] == "yesterday"
    assert general(first)["user"] == "alice ✓"
    assert rest.statistics()["stop_timestamp"] is not None

    # A REST START_NOW: CA sees it running; GET /kill aborts it and the IOC stays up.
    rest.command("PUT", "/start_now", {"output_file": "by_rest.h5"})
    assert ioc.get("STATE") in (1, 2) and ioc.text("OUTPUT_FILE") == "by_rest.h5"
    assert rest.statistics()["start_timestamp"] is not None
    source.send_range(base + 15, base + 19)
    poll(lambda: ioc.get("WRITTEN") == 5, what="5 rows written")
    assert rest.json("GET", "/kill") == {"state": "ok", "status": "waiting"}
    second = root / "by_rest.h5"
    assert ioc.text("LAST_FILE") == str(second)
    assert_rows(second, list(range(base + 15, base + 20)))
    # general/created was for the next file only: this one has its opening time.
    assert general(second)["created"] != "yesterday"
    assert general(second)["created"].startswith("20")
    assert ioc.process.poll() is None


def test_a_rest_port_in_use_fails_start_up(tmp_path, ca_ports):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_ioc(ca_ports(), unique_prefix("RESTX"),
                         ["--stream", "tcp://127.0.0.1:9", "--output-root", str(tmp_path),
                          "--rest-port", str(port), "--watchdog-seconds", "0"])
    assert result.returncode == 1, result.stderr
    assert f"cannot serve the REST API on 127.0.0.1:{port}" in result.stderr
