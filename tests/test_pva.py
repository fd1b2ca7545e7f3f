"""PV Access beside Channel Access, with real EPICS 7 clients (pvget, pvput, pvinfo,
pvmonitor) and p4p's: the same value of every PV over both, a whole acquisition driven
over PVA only with pulse ids above 2**53 kept exact, refused puts with their reason."""
from __future__ import annotations

import itertools
import os
import queue
import subprocess
import threading
import time

import epics
import numpy as np
import pytest
from p4p.client.thread import RemoteError

from sfbw_ioc.testing.files import assert_value, read_file
from sfbw_ioc.testing.ioc import EPICS_BIN, poll, unique_prefix
from sfbw_ioc.testing.sources import CHANNELS, BsreadSource, streaming_ioc, value_for
from pva_clients import PvaPorts, pva_ioc, pva_tool
from sfbw_ioc.bsread import encode_message
from sfbw_ioc.pvs.epicsdb import pv_name
from sfbw_ioc.pvs.ioc import ioc_class

# Odd and above 2**53: float64 cannot hold these pulse ids, int64 can.
BASE = 2**53 + 1_000_001
_bases = itertools.count(BASE, 1000)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ca_ports):
    root = tmp_path_factory.mktemp("output")
    ports = PvaPorts()
    with streaming_ioc(ca_ports(), "PVA", root, tmp_path_factory.mktemp("log") / "ioc.log",
                       wrapper=ports.server_wrapper()) as (ioc, source):
        context = ports.context()
        try:
            yield ioc, source, root, ports, context
        finally:
            context.close()


def timestamp_of(pulse_id: int) -> int:
    """A global timestamp for a pulse id this large (harness.timestamp_for's would not
    fit int64): 10 ms a pulse from 2023-11-14."""
    return 1_700_000_000_000_000_000 + (pulse_id - BASE) * 10_000_000


def send_range(source: BsreadSource, first: int, last: int) -> None:
    for pulse_id in range(first, last + 1):
        stamp = timestamp_of(pulse_id)
        source.send_frames(encode_message(
            pulse_id, stamp, [(spec, value_for(spec, pulse_id), stamp) for spec in CHANNELS]))


def assert_file_rows(path, pulse_ids: list[int]) -> None:
    with read_file(path) as f:
        for spec in CHANNELS:
            group = f["data"][spec.name]
            assert group["pulse_id"][:].tolist() == pulse_ids, spec.name
            data = group["data"].asstr()[:] if spec.type == "string" else group["data"][:]
            for row, pulse_id in enumerate(pulse_ids):
                assert group["timestamp"][row] == timestamp_of(pulse_id)
                assert_value(spec, data[row], value_for(spec, pulse_id))


def choice(context, name: str) -> str:
    value = context.get(name).raw.value
    return value.choices[value.index]


def names_of_every_pv() -> list[str]:
    cls = ioc_class(2)
    names = [pv_name(cls, attr) for attr in cls._pvs_]
    aliases = [name[len("W1:"):] for name in names if name.startswith("W1:")]
    return names + aliases


def test_a_whole_acquisition_over_pva_only_with_pulse_ids_beyond_2_53(setup):
    ioc, source, root, ports, context = setup
    base = next(_bases)
    send_range(source, base, base + 29)
    poll(lambda: context.get(ioc.pv("LAST_PULSE_ID")) == base + 29,
         what="LAST_PULSE_ID over PVA")
    got = pva_tool(ports, "pvget", ioc.pv("LAST_PULSE_ID"))
    assert got.returncode == 0 and str(base + 29) in got.stdout, got.stdout + got.stderr

    assert pva_tool(ports, "pvput", ioc.pv("OUTPUT_FILE"), "pva/run.h5").returncode == 0
    started = pva_tool(ports, "pvput", ioc.pv("START_PULSE_ID"), str(base + 5))
    assert started.returncode == 0, started.stdout + started.stderr
    assert context.get(ioc.pv("START_PULSE_ID")) == base + 5
    # The stop's put completes when the file is closed: nothing to wait for after it.
    stopped = pva_tool(ports, "pvput", ioc.pv("STOP_PULSE_ID"), str(base + 20))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    target = root / "pva/run.h5"
    assert context.get(ioc.pv("LAST_FILE")) == str(target)
    assert choice(context, ioc.pv("STATE")) == "IDLE"
    assert_file_rows(target, list(range(base + 5, base + 21)))
    assert context.get(ioc.pv("FILE_FIRST_PULSE_ID")) == base + 5
    assert context.get(ioc.pv("FILE_LAST_PULSE_ID")) == base + 20
    assert context.get(ioc.pv("WRITTEN")) == 16
    # Channel Access, float64, is within one ulp: the exact figure is PVA's alone.
    assert ioc.get("FILE_LAST_PULSE_ID") == float(base + 20) != base + 20


def test_start_now_and_stop_now_over_p4p_complete_when_the_file_is_closed(setup):
    ioc, source, root, ports, context = setup
    base = next(_bases)
    context.put(ioc.pv("OUTPUT_FILE"), "pva/now.h5", wait=True)
    context.put(ioc.pv("START_NOW"), {"value.index": 1}, wait=True)
    send_range(source, base, base + 9)
    poll(lambda: context.get(ioc.pv("WRITTEN")) >= 10, what="10 rows written")
    context.put(ioc.pv("STOP_NOW"), {"value.index": 1}, wait=True, timeout=30)
    assert context.get(ioc.pv("LAST_FILE")) == str(root / "pva/now.h5")
    assert choice(context, ioc.pv("STOP_NOW")) == "Done"
    assert_file_rows(root / "pva/now.h5", list(range(base, base + 10)))


def test_a_refused_put_fails_with_the_iocs_reason_and_changes_nothing(setup):
    ioc, _, _, ports, context = setup
    before = context.get(ioc.pv("OUTPUT_FILE"))
    refused = pva_tool(ports, "pvput", ioc.pv("OUTPUT_FILE"), "../outside.h5")
    assert refused.returncode != 0
    assert "outside the output root" in refused.stdout + refused.stderr
    assert context.get(ioc.pv("OUTPUT_FILE")) == before
    assert "outside the output root" in context.get(ioc.pv("MESSAGE"))
    with pytest.raises(RemoteError, match="must be a whole number"):
        context.put(ioc.pv("START_PULSE_ID"), -5, wait=True)
    with pytest.raises(RemoteError, match="Put not permitted"):
        context.put(ioc.pv("LAST_PULSE_ID"), 5, wait=True)
    assert choice(context, ioc.pv("STATE")) == "IDLE"


def test_types_and_metadata_over_pva(setup):
    ioc, _, _, ports, context = setup
    info = pva_tool(ports, "pvinfo", ioc.pv("LAST_PULSE_ID"))
    assert info.returncode == 0
    assert "epics:nt/NTScalar:1.0" in info.stdout and "long value" in info.stdout
    assert "string value" in pva_tool(ports, "pvinfo", ioc.pv("OUTPUT_FILE")).stdout
    assert "enum_t value" in pva_tool(ports, "pvinfo", ioc.pv("STATE")).stdout
    rate = context.get(ioc.pv("RECEIVE_RATE")).raw
    assert (rate.display.units, rate.display.precision) == ("Hz", 1)
    assert rate.display.description == "Receive rate"
    live_rate = context.get(ioc.pv("LIVE_RATE")).raw
    assert (live_rate.control.limitLow, live_rate.control.limitHigh) == (0.0, 10.0)
    state = context.get(ioc.pv("W2:STATE")).raw
    assert list(state.value.choices)[:2] == ["IDLE", "WAITING"]


def lines_of(process: subprocess.Popen) -> queue.Queue:
    """What ``process`` prints, a line at a time, as it comes."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()
    return lines


def test_a_monitor_sees_the_state_change(setup):
    ioc, source, _, ports, context = setup
    monitor = subprocess.Popen([str(EPICS_BIN / "pvmonitor"), ioc.pv("W2:STATE")],
                               stdout=subprocess.PIPE, text=True,
                               env={**os.environ, **ports.client_environment()})
    lines = lines_of(monitor)
    try:
        assert "IDLE" in lines.get(timeout=10)
        context.put(ioc.pv("W2:OUTPUT_FILE"), "pva/w2.h5", wait=True)
        context.put(ioc.pv("W2:START_NOW"), {"value.index": 1}, wait=True)
        # publish_status writes STATE with each command: IDLE again, then WAITING.
        seen = [lines.get(timeout=10)]
        while "WAITING" not in seen[-1] and len(seen) < 3:
            seen.append(lines.get(timeout=10))
        assert "WAITING" in seen[-1], seen
        context.put(ioc.pv("W2:ABORT"), {"value.index": 1}, wait=True, timeout=30)
    finally:
        monitor.terminate()
        monitor.wait()


def test_a_pv_opened_again_after_its_last_pva_client_left_shows_what_changed_meanwhile(setup):
    # A PV no PVA client has is closed (nothing is made for nobody) and opened with the
    # current value at the next client's connection.
    ioc, _, _, ports, _ = setup
    name = ioc.pv("W2:OUTPUT_FILE")
    first = ports.context()
    try:
        first.put(name, "pva/before.h5", wait=True)
        assert first.get(name).raw.value == "pva/before.h5"
    finally:
        first.close()
    ioc.put("W2:OUTPUT_FILE", "pva/meanwhile.h5")  # over CA: no PVA client has it now
    second = ports.context()
    updates: queue.Queue = queue.Queue()
    try:
        assert second.get(name).raw.value == "pva/meanwhile.h5"
        subscription = second.monitor(name, updates.put)
        assert updates.get(timeout=10).raw.value == "pva/meanwhile.h5"
        ioc.put("W2:OUTPUT_FILE", "pva/after.h5")
        assert updates.get(timeout=10).raw.value == "pva/after.h5"
        subscription.close()
    finally:
        second.close()


def test_every_pv_has_the_same_value_over_ca_and_pva(setup):
    ioc, source, _, _, context = setup
    base = next(_bases)
    send_range(source, base, base + 4)
    poll(lambda: ioc.get("LAST_PULSE_ID") == float(base + 4), what="the stream received")
    # A quiet IOC: the rate is back to 0, nothing changes while both are read.
    poll(lambda: ioc.get("RECEIVE_RATE") == 0, what="the rate settled")
    names = names_of_every_pv()

    def differing(candidates: list[str]) -> list[str]:
        values = context.get([ioc.pv(name) for name in candidates])
        return [name for name, pva in zip(candidates, values) if not same_value(ioc, name, pva)]

    # A PV may change between its CA and its PVA read (MESSAGE, when the silent stream's
    # alarm is told): what differs must agree once read again.
    differ = differing(names)
    deadline = time.monotonic() + 5
    while differ and time.monotonic() < deadline:
        differ = differing(differ)
    assert len(names) > 100 and differ == []


def same_value(ioc, name: str, pva) -> bool:
    raw = pva.raw
    value = raw.value
    if raw.getID() == "epics:nt/NTEnum:1.0":
        return ioc.get(name, as_string=True) == value.choices[value.index]
    if isinstance(value, str):
        return ioc.text(name) == value
    ca = ioc.get(name)
    if isinstance(value, np.ndarray):
        return np.array_equal(np.asarray(ca, dtype=value.dtype).reshape(-1), value)
    return float(ca) == float(value)


def test_without_pva_nothing_answers_over_pva(tmp_path, ca_ports):
    ports = PvaPorts()
    ioc = pva_ioc(ca_ports(), unique_prefix("NOPVA"),
                  ["--simulate", "--no-pva", "--output-root", str(tmp_path)],
                  tmp_path / "ioc.log", ports)
    try:
        assert epics.caget(ioc.pv("STATE"), timeout=5) is not None
        assert pva_tool(ports, "pvget", ioc.pv("STATE")).returncode != 0
    finally:
        assert ioc.stop() == 0
