"""End to end: a bsread source on a real socket, the IOC as a subprocess, real Channel
Access clients (pyepics = libca, EPICS caput, caproto), HDF5 files read back with h5py."""
from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import epics
import h5py
import numpy as np
import pytest
from caproto.sync import client as caproto_client

from sfbw_ioc.testing.ioc import EPICS_BIN, caput_binary, poll
from sfbw_ioc.testing.sources import CHANNELS, streaming_ioc, timestamp_for, value_for
from sfbw_ioc.testing.files import assert_rows
from sfbw_ioc.bsread import ChannelSpec, encode_message

_bases = itertools.count(10_000_000_000, 100_000)  # pulse ids above 2**31, rising per test


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ca_ports):
    root = tmp_path_factory.mktemp("output")
    with streaming_ioc(ca_ports(), "E2E", root, tmp_path_factory.mktemp("log") / "ioc.log",
                       "--buffer-length", "500", "--list-pvs") as (ioc, source):
        yield ioc, source, root


@pytest.fixture
def ioc(setup):
    ioc, _, _ = setup
    yield ioc
    # Leave the persistent IOC idle for the next test, whatever this one did.
    epics.caput(ioc.pv("ABORT"), 1, wait=True, timeout=30)


@pytest.fixture
def source(setup):
    return setup[1]


@pytest.fixture
def root(setup):
    return setup[2]


def wait_received(ioc, pulse_id):
    ioc.wait_for("LAST_PULSE_ID", pulse_id)


def wait_idle_with(ioc, target: Path):
    ioc.wait_for("LAST_FILE", str(target), as_string=True)
    ioc.wait_for("STATE", 0)


# ---- acquisitions --------------------------------------------------------------------

def test_start_in_the_past_stop_in_the_future(ioc, source, root):
    base = next(_bases)
    source.send_range(base, base + 49)
    wait_received(ioc, base + 49)
    ioc.put("OUTPUT_FILE", "runs/past_future.h5")
    ioc.put("START_PULSE_ID", base + 10)
    ioc.wait_for("STATE", 2)  # WRITING: the buffered pulses are being written
    source.send_range(base + 50, base + 60)
    ioc.put("STOP_PULSE_ID", base + 55)  # put-with-callback: returns once closed
    target = root / "runs/past_future.h5"
    assert ioc.text("LAST_FILE") == str(target)
    assert_rows(target, list(range(base + 10, base + 56)))
    assert ioc.get("WRITTEN") == 46 and ioc.get("MISSING") == 0
    with h5py.File(target) as f:
        assert f["general/user"][()].decode() == "not given"
        assert f["general/created"][()]


def test_stop_put_before_start(ioc, source, root):
    base = next(_bases)
    source.send_range(base, base + 20)
    wait_received(ioc, base + 20)
    ioc.put("USER", "e12345")
    ioc.put("OUTPUT_FILE", "stop_first.h5")
    ioc.put("STOP_PULSE_ID", base + 30)  # idle: kept for the next start
    ioc.put("START_PULSE_ID", base + 5)
    source.send_range(base + 21, base + 40)
    target = root / "stop_first.h5"
    wait_idle_with(ioc, target)
    assert_rows(target, list(range(base + 5, base + 31)))
    with h5py.File(target) as f:
        assert f["general/user"][()].decode() == "e12345"


def test_start_now_and_stop_now_with_the_caproto_client(ioc, source, root):
    base = next(_bases)
    source.send_range(base, base + 9)  # before START_NOW: not in the file
    wait_received(ioc, base + 9)
    caproto_client.write(ioc.pv("OUTPUT_FILE"), "now.h5", notify=True)
    caproto_client.write(ioc.pv("START_NOW"), 1, notify=True)
    source.send_range(base + 10, base + 14)
    poll(lambda: caproto_client.read(ioc.pv("WRITTEN")).data[0] == 5, what="5 rows written")
    caproto_client.write(ioc.pv("STOP_NOW"), 1, notify=True, timeout=30)
    target = root / "now.h5"
    assert caproto_client.read(ioc.pv("LAST_FILE"), data_type="native").data.tobytes(
    ).rstrip(b"\0").decode() == str(target)
    assert_rows(target, list(range(base + 10, base + 15)))


def test_abort_closes_the_file_with_what_was_written(ioc, source, root):
    base = next(_bases)
    ioc.put("OUTPUT_FILE", "aborted.h5")
    ioc.put("START_PULSE_ID", base)
    assert ioc.get("STATE") == 1  # WAITING: the start is in the future
    source.send_range(base, base + 9)
    ioc.wait_for("WRITTEN", 10)
    ioc.put("ABORT", 1)
    target = root / "aborted.h5"
    assert ioc.text("LAST_FILE") == str(target)
    assert "aborted" in ioc.text("MESSAGE")
    assert_rows(target, list(range(base, base + 10)))


def test_two_acquisitions_in_a_row_share_no_rows(ioc, source, root):
    for name in ("first.h5", "second.h5"):
        base = next(_bases)
        ioc.put("OUTPUT_FILE", name)
        ioc.put("START_PULSE_ID", base)
        source.send_range(base, base + 12)
        ioc.put("STOP_PULSE_ID", base + 9)
        assert_rows(root / name, list(range(base, base + 10)))


def test_start_older_than_the_buffer_is_reported_not_faked(ioc, source, root):
    base = next(_bases)
    source.send_range(base, base + 599)  # the ring holds 500
    wait_received(ioc, base + 599)
    ioc.put("OUTPUT_FILE", "too_old.h5")
    ioc.put("START_PULSE_ID", base)
    message = ioc.text("MESSAGE")
    assert "older than the buffer" in message and str(base + 100) in message
    source.send_range(base + 600, base + 601)
    ioc.put("STOP_PULSE_ID", base + 600)
    assert_rows(root / "too_old.h5", list(range(base + 100, base + 601)))
    assert ioc.get("MISSING") == 100


def test_gaps_in_the_stream_are_counted_as_missing(ioc, source, root):
    base = next(_bases)
    sent = [base + step * 10 for step in range(20) if step not in (5, 6, 12)]
    for pulse_id in sent[:5]:
        source.send(pulse_id)  # the stream's usual step (10) shows in the buffer
    wait_received(ioc, sent[4])
    ioc.put("OUTPUT_FILE", "gaps.h5")
    ioc.put("START_PULSE_ID", base)
    for pulse_id in sent[5:]:
        source.send(pulse_id)
    source.send(base + 500)
    ioc.put("STOP_PULSE_ID", base + 190)
    assert_rows(root / "gaps.h5", sent)
    assert ioc.get("MISSING") == 3


def test_a_silent_stream_closes_by_the_message_clock(ioc, source, root):
    base = next(_bases)
    ioc.put("OUTPUT_FILE", "silent.h5")
    ioc.put("START_PULSE_ID", base)
    source.send_range(base, base + 4)
    ioc.wait_for("WRITTEN", 5)
    # Pulse base+10 would be due 0.1 s after base+4 at 100 Hz: the file closes ~2 s later
    # although no message passes the stop.
    ioc.put("STOP_PULSE_ID", base + 10)
    assert_rows(root / "silent.h5", list(range(base, base + 5)))
    assert ioc.get("MISSING") == 6


def test_the_receiver_reconnects_when_the_source_restarts(ioc, source, root):
    base = next(_bases)
    ioc.put("OUTPUT_FILE", "restart.h5")
    ioc.put("START_PULSE_ID", base)
    source.send_range(base, base + 4)
    ioc.wait_for("WRITTEN", 5)
    source.restart()
    source.send_range(base + 5, base + 9)
    source.send(base + 20)
    ioc.put("STOP_PULSE_ID", base + 9)
    assert_rows(root / "restart.h5", list(range(base, base + 10)))


# ---- content ---------------------------------------------------------------------------

def test_header_changes_and_absent_values_mid_acquisition(ioc, source, root):
    base = next(_bases)
    added = ChannelSpec("T:ADDED", "int16", (3,))
    wave_f64 = ChannelSpec("T:WF", "float64", (4,))
    first = list(CHANNELS)
    second = first + [added]
    third = [spec for spec in second if spec.name != "T:I32"]
    third = [wave_f64 if spec.name == "T:WF" else spec for spec in third]
    ioc.put("OUTPUT_FILE", "changes.h5")
    ioc.put("START_PULSE_ID", base)
    for pulse_id in range(base, base + 15):
        channels = first if pulse_id < base + 5 else second if pulse_id < base + 10 else third
        source.send(pulse_id, channels=channels,
                    absent=["T:IMG"] if pulse_id % 2 else [],
                    dh_compression="lz4" if pulse_id % 3 else "none")
    source.send(base + 20)
    ioc.put("STOP_PULSE_ID", base + 14)
    target = root / "changes.h5"
    pulse_ids = list(range(base, base + 15))
    unchanged = [s for s in CHANNELS if s.name not in ("T:I32", "T:WF")]
    assert_rows(target, pulse_ids, unchanged,
                absent=lambda name, pulse_id: name == "T:IMG" and pulse_id % 2 == 1)
    with h5py.File(target) as f:
        i32 = f["data/T:I32"]
        assert i32["is_data_present"][:].tolist() == [1] * 10 + [0] * 5
        assert i32["pulse_id"][:].tolist() == pulse_ids
        new = f["data/T:ADDED"]
        assert new["is_data_present"][:].tolist() == [0] * 5 + [1] * 10
        assert np.array_equal(new["data"][7], value_for(added, base + 7))
        wave = f["data/T:WF"]
        assert wave["data(1)"].dtype == np.float32 and wave["data(1)"].shape[1:] == (16,)
        assert wave["data"].dtype == np.float64 and wave["data"].shape == (15, 4)
        assert np.array_equal(wave["data"][12], value_for(wave_f64, base + 12))
        assert np.array_equal(wave["data(1)"][3], value_for(CHANNELS[5], base + 3))
        assert wave["timestamp"][12] == timestamp_for(base + 12)


def test_malformed_messages_between_good_ones(ioc, source, root):
    base = next(_bases)
    malformed_before = ioc.get("MALFORMED")
    ioc.put("OUTPUT_FILE", "malformed.h5")
    ioc.put("START_PULSE_ID", base)
    bad_messages = iter([
        [b"not json", b"{}"],
        [b'{"htype": "bsr_m-1.1", "pulse_id": 1}'],
        _truncated_message(base + 100),
    ])
    for offset in range(10):
        source.send(base + offset)
        if offset in (2, 5, 7):
            source.send_frames(next(bad_messages))
    source.send(base + 10)
    ioc.put("STOP_PULSE_ID", base + 9)
    assert_rows(root / "malformed.h5", list(range(base, base + 10)))
    poll(lambda: ioc.get("MALFORMED") >= malformed_before + 3, what="MALFORMED counted")


def _truncated_message(pulse_id):
    frames = encode_message(pulse_id, 0, [(CHANNELS[0], value_for(CHANNELS[0], pulse_id), 0)])
    frames[2] = frames[2][:3]
    return frames


# ---- refused puts ----------------------------------------------------------------------

def test_refused_puts_explain_and_leave_the_acquisition_running(ioc, source, root):
    base = next(_bases)
    (root / "exists.h5").write_bytes(b"keep me")
    ioc.put("OUTPUT_FILE", "refusals.h5")
    ioc.put("START_PULSE_ID", base + 100)
    refusals = [  # (caput options, PV, value, reason expected in MESSAGE)
        ([], "START_PULSE_ID", str(base + 200), "running"),
        ([], "STOP_PULSE_ID", str(base + 50), "before the start"),
        (["-S"], "OUTPUT_FILE", "../outside.h5", "outside the output root"),
        (["-S"], "OUTPUT_FILE", "/etc/evil.h5", "outside the output root"),
        (["-S"], "OUTPUT_FILE", "exists.h5", "exists already"),
        (["--"], "STOP_PULSE_ID", "-5", "whole number"),
        ([], "STOP_PULSE_ID", "nan", "whole number"),
        ([], "STOP_PULSE_ID", "1.5", "whole number"),
    ]
    for options, name, value, reason in refusals:
        result = caput_binary("-c", *options, ioc.pv(name), value, ca_timeout=30)
        assert result.returncode != 0, (name, value, result.stdout, result.stderr)
        assert reason in ioc.text("MESSAGE"), (name, value, ioc.text("MESSAGE"))
        assert ioc.get("STATE") == 1, (name, value)  # still WAITING for its start
    assert (root / "exists.h5").read_bytes() == b"keep me"
    source.send_range(base + 100, base + 105)
    ioc.put("STOP_PULSE_ID", base + 104)
    assert_rows(root / "refusals.h5", list(range(base + 100, base + 105)))


def test_start_now_after_the_stop_set_while_idle_is_refused(ioc, source, root):
    base = next(_bases)
    source.send_range(base, base + 20)
    wait_received(ioc, base + 20)
    ioc.put("OUTPUT_FILE", "after_stop.h5")
    ioc.put("STOP_PULSE_ID", base + 10)  # idle: kept, and already in the past
    result = caput_binary("-c", ioc.pv("START_NOW"), "1", ca_timeout=30)
    assert result.returncode != 0, (result.stdout, result.stderr)
    assert "is after the stop already set" in ioc.text("MESSAGE"), ioc.text("MESSAGE")
    assert ioc.get("STATE") == 0
    assert not (root / "after_stop.h5").exists()
    assert not (root / "after_stop.h5.partial").exists()
    # A start before the stop takes it (and the fixture's ABORT ends it): no stop is
    # left pending for the next test.
    ioc.put("START_PULSE_ID", base + 5)
    wait_idle_with(ioc, root / "after_stop.h5")
    assert_rows(root / "after_stop.h5", list(range(base + 5, base + 11)))


def test_put_callback_on_stop_returns_only_when_the_file_is_complete(ioc, source, root):
    base = next(_bases)
    ioc.put("OUTPUT_FILE", "callback.h5")
    ioc.put("START_PULSE_ID", base)
    source.send_range(base, base + 4)
    caput = subprocess.Popen([str(EPICS_BIN / "caput"), "-c", "-w", "60",
                              ioc.pv("STOP_PULSE_ID"), str(base + 9)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ioc.wait_for("WRITTEN", 5)
    poll(lambda: "stopping" in ioc.text("MESSAGE"), what="the stop to arrive")
    assert caput.poll() is None, "caput -c returned before the file was closed"
    target = root / "callback.h5"
    assert not target.exists()
    source.send_range(base + 5, base + 12)
    assert caput.wait(30) == 0, caput.stderr.read()
    # The instant caput returns, the file is complete under its final name.
    assert target.exists() and not Path(str(target) + ".partial").exists()
    assert_rows(target, list(range(base, base + 10)))

