"""What a beamline uses every day, end to end through Channel Access: file naming with
auto-increment, channel selection, two writers at once, a stream changed at run time,
and the buffered stream re-published."""
from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import epics
import h5py
import pytest
import zmq

from sfbw_ioc.testing.ioc import IocProcess, caput_binary, free_port, poll, unique_prefix
from sfbw_ioc.testing.sources import (CHANNELS, BsreadSource, IncompressibleCamera, streaming_ioc,
                                      timestamp_for, value_for)
from sfbw_ioc.testing.files import assert_rows
from sfbw_ioc.bsread import encode_message

_bases = itertools.count(40_000_000_000, 100_000)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ca_ports):
    root = tmp_path_factory.mktemp("operator")
    with streaming_ioc(ca_ports(), "OPS", root,
                       tmp_path_factory.mktemp("log") / "ioc.log") as (ioc, source):
        yield ioc, source, root


@pytest.fixture
def ioc(setup):
    ioc = setup[0]
    yield ioc
    for writer in ("W1:", "W2:"):  # leave both writers idle for the next test
        ioc.put(writer + "ABORT", 1)


@pytest.fixture
def source(setup):
    return setup[1]


@pytest.fixture
def root(setup):
    return setup[2]


def caput(ioc: IocProcess, name: str, value, *options: str):
    """EPICS' caput -c (put with callback): exit status 1 when the IOC refuses."""
    return caput_binary("-c", *options, "--", ioc.pv(name), str(value), ca_timeout=30)


def channels_of(path: Path) -> set[str]:
    with h5py.File(path, "r") as f:
        return set(f["data"])


def acquire_now(ioc: IocProcess, source: BsreadSource, writer: str, pulses: range) -> Path:
    ioc.put(writer + "START_NOW", 1)
    ioc.wait_for(writer + "STATE", 1)  # WAITING: started, nothing written yet
    source.send_range(pulses.start, pulses.stop - 1)
    poll(lambda: ioc.get(writer + "WRITTEN") == len(pulses), what=f"{len(pulses)} written")
    ioc.put(writer + "STOP_NOW", 1)  # put-with-callback: returns when the file is closed
    return Path(ioc.text(writer + "LAST_FILE"))


# ---- 1. file naming --------------------------------------------------------------------

def test_auto_increment_gives_a_new_file_for_every_acquisition(ioc, source, root):
    assert caput(ioc, "FILE_PATH", "scan", "-S").returncode == 0
    assert caput(ioc, "FILE_NAME", "step", "-S").returncode == 0
    assert caput(ioc, "FILE_NUMBER", 1).returncode == 0
    assert ioc.text("OUTPUT_FILE") == "scan/step_0001.h5"  # what the next START writes
    assert ioc.text("W1:OUTPUT_FILE") == "scan/step_0001.h5"  # the same PV
    base = next(_bases)
    files = [acquire_now(ioc, source, "", range(base + 10 * n, base + 10 * n + 5))
             for n in range(3)]
    assert files == [root / f"scan/step_000{n}.h5" for n in (1, 2, 3)]
    for n, path in enumerate(files):
        assert_rows(path, list(range(base + 10 * n, base + 10 * n + 5)))
    assert ioc.get("FILE_NUMBER") == 4
    assert ioc.text("OUTPUT_FILE") == "scan/step_0004.h5"


def test_a_number_whose_file_exists_is_skipped_never_overwritten(ioc, source, root):
    ioc.put("FILE_PATH", "skip")
    ioc.put("FILE_NAME", "run")
    ioc.put("FILE_NUMBER", 7)
    (root / "skip").mkdir(exist_ok=True)
    (root / "skip/run_0007.h5").write_bytes(b"somebody else's")
    base = next(_bases)
    written = acquire_now(ioc, source, "", range(base, base + 3))
    assert written == root / "skip/run_0008.h5"
    assert (root / "skip/run_0007.h5").read_bytes() == b"somebody else's"
    assert ioc.get("FILE_NUMBER") == 9


def test_without_auto_increment_the_number_stays_and_the_next_start_is_refused(
        ioc, source, root):
    ioc.put("FILE_PATH", "fixed")
    ioc.put("FILE_NAME", "once")
    ioc.put("FILE_NUMBER", 0)
    ioc.put("AUTO_INCREMENT", 0)
    try:
        base = next(_bases)
        acquire_now(ioc, source, "", range(base, base + 3))
        assert ioc.get("FILE_NUMBER") == 0 and ioc.text("OUTPUT_FILE") == "fixed/once_0000.h5"
        refused = caput(ioc, "START_NOW", 1)
        assert refused.returncode == 1
        assert "exists already" in ioc.text("MESSAGE")
    finally:
        ioc.put("AUTO_INCREMENT", 1)


def test_templates_are_checked_and_may_not_leave_the_root(ioc):
    ioc.put("FILE_PATH", "")
    ioc.put("FILE_NAME", "t")
    assert caput(ioc, "FILE_TEMPLATE", "%s%s_%3.3d.h5", "-S").returncode == 0
    ioc.put("FILE_NUMBER", 5)
    assert ioc.text("OUTPUT_FILE") == "t_005.h5"
    before = ioc.text("OUTPUT_FILE")
    for template, reason in (("%s%s.h5", "needs 3"), ("%s%d%s", "must be %s for the name"),
                             ("%s%s%s", "must be an integer")):
        assert caput(ioc, "FILE_TEMPLATE", template, "-S").returncode == 1, template
        assert reason in ioc.text("MESSAGE"), template
    assert caput(ioc, "FILE_PATH", "../outside", "-S").returncode == 1
    assert "outside the output root" in ioc.text("MESSAGE")
    assert ioc.text("OUTPUT_FILE") == before and ioc.text("FILE_TEMPLATE") == "%s%s_%3.3d.h5"
    ioc.put("FILE_TEMPLATE", "%s%s_%04d.h5")


def test_a_direct_put_to_output_file_is_taken_verbatim(ioc, source, root):
    ioc.put("FILE_NAME", "composed")
    ioc.put("OUTPUT_FILE", "verbatim/by_hand.h5")
    base = next(_bases)
    assert acquire_now(ioc, source, "", range(base, base + 2)) == root / "verbatim/by_hand.h5"
    # A name given by hand is not followed by a composed one.
    assert ioc.text("OUTPUT_FILE") == "verbatim/by_hand.h5"


# ---- 2. channel selection --------------------------------------------------------------

def test_a_selection_by_name_and_pattern_writes_exactly_those_channels(ioc, source, root):
    selected = [spec for spec in CHANNELS if spec.name in ("T:F64", "T:WF", "T:I32")]
    ioc.put("W2:OUTPUT_FILE", "selected.h5")
    assert caput(ioc, "W2:CHANNELS", "T:F64, T:W* T:I3?,NOPE:*", "-S").returncode == 0
    base = next(_bases)
    try:
        source.send(base - 1)  # the stream's data header, for the check of the patterns
        ioc.wait_for("LAST_PULSE_ID", base - 1)
        path = acquire_now(ioc, source, "W2:", range(base, base + 20))
    finally:
        ioc.put("W2:CHANNELS", "")
    assert channels_of(path) == {"T:F64", "T:WF", "T:I32"}
    assert_rows(path, list(range(base, base + 20)), channels=selected)
    with h5py.File(path, "r") as f:
        assert f["general/channels"][()].decode() == "T:F64, T:W* T:I3?,NOPE:*"


def test_a_pattern_that_matches_nothing_is_named_but_does_not_refuse(ioc, source, root):
    source.send(next(_bases))
    ioc.put("W2:OUTPUT_FILE", "nothing_matches.h5")
    ioc.put("W2:CHANNELS", "T:F64 NOPE:*")
    try:
        ioc.put("W2:START_NOW", 1)
        ioc.wait_for("W2:STATE", 1)
        assert "no channel of the stream matches NOPE:*" in ioc.text("W2:MESSAGE")
    finally:
        ioc.put("W2:CHANNELS", "")


def test_the_stream_channels_are_listed(ioc, source):
    source.send(next(_bases))
    poll(lambda: ioc.get("STREAM_CHANNEL_COUNT") == len(CHANNELS), what="7 channels")
    assert ioc.text("STREAM_CHANNELS").split("\n") == [spec.name for spec in CHANNELS]


# ---- 3. two writers --------------------------------------------------------------------

def test_two_writers_overlap_in_pulses_and_time(ioc, source, root):
    """A long run file on W1 and a short step file inside it on W2."""
    base = next(_bases)
    source.send_range(base, base + 9)
    ioc.wait_for("LAST_PULSE_ID", base + 9)
    ioc.put("W1:OUTPUT_FILE", "overlap/run.h5")
    ioc.put("W2:OUTPUT_FILE", "overlap/step.h5")
    ioc.put("W1:START_PULSE_ID", base)  # in the past
    ioc.put("W2:START_PULSE_ID", base + 15)  # in the future
    stops = []
    threading.Thread(target=lambda: stops.append(ioc.put("W1:STOP_PULSE_ID", base + 40)),
                     daemon=True).start()
    source.send_range(base + 10, base + 30)
    ioc.put("W2:STOP_PULSE_ID", base + 25)
    assert ioc.get("W1:STATE") == 2, "W1 still writes while W2 has closed"
    source.send_range(base + 31, base + 41)
    poll(lambda: stops, what="W1's stop to complete")
    assert_rows(root / "overlap/run.h5", list(range(base, base + 41)))
    assert_rows(root / "overlap/step.h5", list(range(base + 15, base + 26)))
    assert ioc.get("W1:LOST") == 0 and ioc.get("W2:LOST") == 0


def test_one_writer_starts_while_the_other_is_busy(ioc, source, root):
    ioc.put("W1:OUTPUT_FILE", "busy/one.h5")
    ioc.put("W1:START_NOW", 1)
    ioc.put("W2:OUTPUT_FILE", "busy/two.h5")
    assert caput(ioc, "W2:START_NOW", 1).returncode == 0
    refused = caput(ioc, "W1:START_NOW", 1)
    assert refused.returncode == 1 and "an acquisition is running" in ioc.text("W1:MESSAGE")
    assert ioc.get("W2:STATE") == 1


# ---- 4. changing the stream ------------------------------------------------------------

@pytest.fixture
def lone_ioc(tmp_path, ca_ports):
    """An IOC of its own: changing its stream empties its buffer."""
    with streaming_ioc(ca_ports(), "STREAM", tmp_path, tmp_path / "ioc.log") as (ioc, source):
        yield ioc, source, tmp_path


def test_the_stream_changes_while_idle_and_the_buffer_is_emptied(lone_ioc):
    ioc, first, root = lone_ioc
    second = BsreadSource()
    try:
        first.send_range(100, 149)
        ioc.wait_for("BUFFER_COUNT", 50)
        assert caput(ioc, "STREAM", second.address, "-S").returncode == 0
        assert "stream changed" in ioc.text("MESSAGE")
        assert ioc.text("STREAM") == second.address
        ioc.wait_for("BUFFER_COUNT", 0)
        poll(lambda: _sends_until_received(second, ioc, 5_000), what="the new stream")
        assert ioc.get("BUFFER_OLDEST_PULSE_ID") >= 5_000  # nothing of the old stream
        ioc.put("OUTPUT_FILE", "after.h5")
        ioc.put("START_PULSE_ID", 100)  # the old stream's pulses are not there to take
        second.send_range(6_000, 6_004)
        ioc.put("STOP_PULSE_ID", 6_004)
        with h5py.File(root / "after.h5", "r") as f:
            assert f["data/T:F64/pulse_id"][0] >= 5_000
    finally:
        second.close()


def _sends_until_received(source: BsreadSource, ioc: IocProcess, pulse_id: int) -> bool:
    """ZeroMQ connects in the background: send until one arrives."""
    source.send(pulse_id)
    return ioc.get("LAST_PULSE_ID") == pulse_id


def test_a_stream_change_is_refused_while_writing_and_for_a_bad_address(lone_ioc):
    ioc, source, root = lone_ioc
    address = ioc.text("STREAM")
    for bad in ("tcp://nohost", "udp://127.0.0.1:9000", "tcp://127.0.0.1:99999", "x"):
        assert caput(ioc, "STREAM", bad, "-S").returncode == 1, bad
        assert "not a stream address" in ioc.text("MESSAGE")
    ioc.put("W2:OUTPUT_FILE", "running.h5")
    ioc.put("W2:START_NOW", 1)
    refused = caput(ioc, "STREAM", "tcp://127.0.0.1:1", "-S")
    assert refused.returncode == 1
    assert "W2 is acquiring" in ioc.text("MESSAGE")
    assert caput(ioc, "STREAM_MODE", "SUB").returncode == 1
    assert ioc.text("STREAM") == address and ioc.get("STREAM_MODE", as_string=True) == "PULL"
    ioc.put("W2:ABORT", 1)
    # An address nobody serves is accepted: ZeroMQ connects when the source appears.
    assert caput(ioc, "STREAM", "tcp://127.0.0.1:1", "-S").returncode == 0
    poll(lambda: ioc.get("RECEIVE_RATE") == 0, what="no messages")


# ---- 5. the buffered stream, re-published --------------------------------------------

@pytest.fixture
def forwarding_ioc(tmp_path, ca_ports, request):
    source, port = BsreadSource(), free_port()
    ioc = IocProcess(ca_ports(), unique_prefix("FWD"),
                     ["--stream", source.address, "--output-root", str(tmp_path),
                      "--output-port", str(port), "--output-mode", request.param],
                     tmp_path / "ioc.log")
    yield ioc, source, port
    source.close()
    assert ioc.stop() == 0, ioc.log()


def _pulse_id(frames: list[bytes]) -> int:
    return json.loads(frames[0])["pulse_id"]


@pytest.mark.parametrize("forwarding_ioc", ["pub"], indirect=True)
def test_a_consumer_on_the_output_port_gets_byte_identical_messages(forwarding_ioc):
    ioc, source, port = forwarding_ioc
    consumer = zmq.Context.instance().socket(zmq.SUB)
    consumer.setsockopt(zmq.SUBSCRIBE, b"")
    consumer.setsockopt(zmq.RCVTIMEO, 100)
    consumer.connect(f"tcp://127.0.0.1:{port}")
    sent: dict[int, list[bytes]] = {}

    def send(pulse_id: int, channels=CHANNELS) -> None:
        sent[pulse_id] = _frames(pulse_id, channels)
        source.send_frames(sent[pulse_id])

    def send_until_one_arrives() -> list[bytes] | None:
        send(50_000 + len(sent))  # a subscription takes a moment to reach the IOC
        try:
            return consumer.recv_multipart()
        except zmq.Again:
            return None

    try:
        received = [poll(send_until_one_arrives, what="a re-published message")]
        # Scalars only, then every kind with small images, then camera frames (parts the
        # receiver lends out uncopied: sfbw_ioc.stream.zmqparts).
        camera = IncompressibleCamera((256, 512))
        for pulse_id in range(60_000, 60_025):
            if pulse_id < 60_020:
                send(pulse_id, SCALARS if pulse_id < 60_010 else CHANNELS)
            else:
                sent[pulse_id] = camera.frames(pulse_id)
                source.send_frames(sent[pulse_id])
        consumer.setsockopt(zmq.RCVTIMEO, 5_000)
        while len(received) < 26 or _pulse_id(received[-1]) < 60_024:
            received.append(consumer.recv_multipart())
        for frames in received:
            assert frames == sent[_pulse_id(frames)], _pulse_id(frames)
        assert [_pulse_id(frames) for frames in received[-25:]] == list(range(60_000, 60_025))
        assert len(received[-1][2]) > 64 * 1024
        assert ioc.get("FORWARD_DROPPED") == 0
    finally:
        consumer.close(linger=0)


@pytest.mark.parametrize("forwarding_ioc", ["push"], indirect=True)
def test_without_a_consumer_a_push_output_drops_and_counts_never_blocking(forwarding_ioc):
    ioc, source, _ = forwarding_ioc
    source.send_range(70_000, 70_029)
    ioc.wait_for("LAST_PULSE_ID", 70_029)  # the receiver was not held up
    ioc.wait_for("FORWARD_DROPPED", 30)
    assert ioc.get("RECEIVED") == 30


SCALARS = tuple(spec for spec in CHANNELS if spec.type in ("float64", "int32", "uint64"))


def _frames(pulse_id: int, channels=CHANNELS) -> list[bytes]:
    return encode_message(pulse_id, timestamp_for(pulse_id),
                          [(spec, value_for(spec, pulse_id), timestamp_for(pulse_id))
                           for spec in channels])


def test_a_refusal_stays_in_message_when_a_later_command_succeeds(ioc):
    assert caput(ioc, "W2:FILE_TEMPLATE", "%d", "-S").returncode == 1
    reason = ioc.text("W2:MESSAGE")
    assert "conversion 1" in reason
    assert caput(ioc, "W2:FILE_NAME", "after_refusal", "-S").returncode == 0
    assert ioc.text("W2:MESSAGE") == reason


def test_written_never_goes_back_while_a_file_is_closed(ioc, source):
    """Every status carries the figures as they are: once the CLOSING status of the
    acquisition thread had none, and WRITTEN fell to 0 for the close and came back (a
    monitor saw both)."""
    seen: list[float] = []
    monitor = epics.PV(ioc.pv("W2:WRITTEN"), callback=lambda value, **_: seen.append(value))
    assert monitor.wait_for_connection(5)
    base = next(_bases)
    ioc.put("W2:OUTPUT_FILE", "monotonic.h5")
    ioc.put("W2:START_PULSE_ID", base)
    source.send_range(base, base + 39)
    poll(lambda: seen and seen[-1] == 40, what="WRITTEN 40 at the monitor")
    stopped = threading.Thread(target=ioc.put, args=("W2:STOP_PULSE_ID", base + 40))
    stopped.start()
    poll(lambda: "stopping at" in ioc.text("W2:MESSAGE"), what="the stop taken")
    source.send(base + 40)  # the stop pulse: the file closes
    stopped.join(30)
    poll(lambda: seen[-1] == 41, what="WRITTEN 41 at the monitor")
    monitor.disconnect()
    after_start = seen[seen.index(min(seen)):]  # from the reset for this file on
    assert after_start == sorted(after_start), seen
