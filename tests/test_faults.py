"""Faults provoked for real: signals and SIGKILL of the IOC and of the source, a full
disk (tmpfs in a private mount namespace), a directory removed under a running file, a
writer that falls behind, a stalled event loop. Every IOC is a subprocess on a real CA
port, every source a real ZeroMQ socket, every file read back with h5py."""
from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import epics
import h5py
import numpy as np
import pytest

from sfbw_ioc.testing.ioc import (REPO, IocProcess, caput_binary, free_port, poll, run_ioc,
                                  unique_prefix)
from sfbw_ioc.testing.sources import CHANNELS, BsreadSource, PacedSender, timestamp_for, value_for
from sfbw_ioc.testing.files import assert_rows, assert_value
from sfbw_ioc.bsread import ChannelSpec, encode_message
from sfbw_ioc.serving.caprobe import ProbeFailed, read_pv
from sfbw_ioc.stream.memory import TRIM_INTERVAL_S
from sfbw_ioc.serving.watchdog import Watchdog

_bases = itertools.count(20_000_000_000, 1_000_000)

ERROR = 4  # STATE index of ERROR
SLOW = os.environ.get("SFBW_SLOW") == "1"  # longer floods and loads, and the memory test


@pytest.fixture(scope="module")
def ca_port(ca_ports):
    """One CA port of the session's pool for the whole module: each test stops its IOC
    (its fixture makes sure), so the next one can take the port again."""
    return ca_ports()


@pytest.fixture
def iocs(ca_port, tmp_path):
    started: list[IocProcess] = []

    def start(args: list[str], **kwargs) -> IocProcess:
        ioc = IocProcess(ca_port, unique_prefix("FLT"), args,
                         tmp_path / f"ioc{len(started)}.log", **kwargs)
        started.append(ioc)
        return ioc

    yield start
    for ioc in started:
        ioc.stop(signal.SIGKILL)


def file_pulse_ids(path: Path) -> list[int]:
    """Rows of a file (also an unclosed one), the same in every channel."""
    with h5py.File(path, "r") as f:
        per_channel = {name: f["data"][name]["pulse_id"][:].tolist() for name in f["data"]}
    lists = list(per_channel.values())
    assert lists and all(ids == lists[0] for ids in lists), {
        name: len(ids) for name, ids in per_channel.items()}
    return lists[0]


def assert_acquisition_works(ioc: IocProcess, source: BsreadSource, root: Path, name: str,
                             first: int, rows: int) -> None:
    """An acquisition of ``rows`` pulses from ``first`` into ``name`` (the source sends one
    more, past the stop) gives exactly those rows."""
    ioc.put("OUTPUT_FILE", name)
    ioc.put("START_PULSE_ID", first)
    source.send_range(first, first + rows)
    ioc.put("STOP_PULSE_ID", first + rows - 1)
    assert_rows(root / name, list(range(first, first + rows)))


# ---- 1. SIGTERM --------------------------------------------------------------------------

@pytest.mark.parametrize("more_signals", [(), (signal.SIGTERM, signal.SIGINT)],
                         ids=["once", "repeated"])
def test_sigterm_during_an_acquisition_completes_the_file_and_exits_0(iocs, tmp_path,
                                                                     more_signals):
    """Also when the signal comes again while the file is being closed (Ctrl-C pressed
    twice; `timeout` signals the child and then its process group)."""
    root, source, base = tmp_path / "out", BsreadSource(), next(_bases)
    ioc = iocs(["--stream", source.address, "--output-root", str(root)])
    try:
        ioc.put("OUTPUT_FILE", "term/run.h5")
        ioc.put("START_NOW", 1)
        source.send_range(base, base + 29)
        ioc.wait_for("WRITTEN", 30)
        # Ten more that are received (in the ring) but maybe not yet written.
        source.send_range(base + 30, base + 39)
        ioc.wait_for("LAST_PULSE_ID", base + 39)
        if more_signals:
            ioc.process.send_signal(signal.SIGTERM)
            # Once the server is down, the IOC is completing the file: signal it again.
            poll(lambda: "Server exiting" in ioc.log(), what="the server going down")
            for sig in more_signals:
                ioc.process.send_signal(sig)
        assert ioc.stop(signal.SIGTERM) == 0, ioc.log()
    finally:
        source.close()
    target = root / "term/run.h5"
    assert target.exists() and not Path(f"{target}.partial").exists(), ioc.log()
    assert_rows(target, list(range(base, base + 40)))
    assert "IOC stopped" in ioc.log()


# ---- 2. SIGKILL of the IOC ----------------------------------------------------------------

def test_sigkill_leaves_a_readable_partial_and_a_restart_works(iocs, tmp_path):
    root, source, base = tmp_path / "out", BsreadSource(), next(_bases)
    args = ["--stream", source.address, "--output-root", str(root)]
    ioc = iocs(args)
    sender = PacedSender(source, base, rate_hz=200)
    try:
        ioc.put("OUTPUT_FILE", "killed.h5")
        ioc.put("START_PULSE_ID", base)
        sender.start()
        ioc.wait_for("STATE", 2)
        poll(lambda: ioc.get("WRITTEN") >= 100, what="100 rows written")
        written_early = ioc.get("WRITTEN")
        early = time.monotonic()
        # Keep the stream going for 1.3 s more: rows appended by ``early`` were flushed.
        poll(lambda: time.monotonic() - early > 1.3 and ioc.get("WRITTEN") > written_early,
             what="1.3 s of writing")
        ioc.process.kill()
        assert ioc.wait_exit() == -signal.SIGKILL
    finally:
        sent = sender.finish()
    partial = root / "killed.h5.partial"
    assert partial.exists() and not (root / "killed.h5").exists()
    rows = file_pulse_ids(partial)
    print(f"sigkill: {len(sent)} sent, WRITTEN {written_early:.0f} 1.3 s before the kill, "
          f"{len(rows)} rows readable in the .partial")
    assert written_early <= len(rows) <= len(sent), (written_early, len(rows), len(sent))
    assert rows == sent[:len(rows)]
    assert_rows(partial, rows)

    # The same port and output root serve again: the new IOC finds the partial file,
    # refuses its name and leaves it as it was.
    left = partial.read_bytes()
    base2 = next(_bases)
    ioc2 = iocs(args)
    try:
        ioc2.wait_for("PARTIAL_FILES", 1)
        assert ioc2.text("PARTIAL_FILES_NEWEST") == str(partial)
        assert f"1 .partial file left in {root} by an acquisition" in ioc2.log()
        refused = caput_binary("-c", "-S", ioc2.pv("OUTPUT_FILE"), "killed.h5", ca_timeout=30)
        assert refused.returncode == 1 and "killed.h5.partial exists already" in ioc2.text(
            "MESSAGE"), refused.stdout
        assert_acquisition_works(ioc2, source, root, "after_restart.h5", base2, 20)
        assert partial.read_bytes() == left and not (root / "killed.h5").exists()
        assert ioc2.stop() == 0
    finally:
        source.close()


# ---- 3. disk full -------------------------------------------------------------------------

BIG = ChannelSpec("T:BIG", "uint16", (512, 512))  # 512 KiB of random (incompressible) data

_MOUNT = 'mount -t tmpfs -o size=3m tmpfs "$0" && exec "$@"'


def _private_tmpfs_wrapper(mount_point: Path) -> list[str]:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1): cannot give the IOC a small private file system")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            _MOUNT, str(mount_point), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {probe.stderr}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _MOUNT,
            str(mount_point)]


def test_disk_full_fails_the_file_keeps_buffering_and_the_next_file_works(iocs, tmp_path):
    root = tmp_path / "out"
    small = root / "small"
    small.mkdir(parents=True)
    wrapper = _private_tmpfs_wrapper(small)
    source, base = BsreadSource(), next(_bases)
    ioc = iocs(["--stream", source.address, "--output-root", str(root)], wrapper=wrapper)
    # The tmpfs exists only in the IOC's mount namespace: look through /proc/PID/root.
    inside = Path(f"/proc/{ioc.pid}/root") / str(small).lstrip("/")
    rng = np.random.default_rng(1)
    try:
        ioc.put("OUTPUT_FILE", "small/full.h5")
        ioc.put("START_NOW", 1)
        pulse_id = base
        deadline = time.monotonic() + 20
        while ioc.get("STATE") != ERROR:  # ~6 images fill 3 MiB; a flush a second
            assert time.monotonic() < deadline, ioc.log()
            image = rng.integers(0, 2**16, BIG.shape, dtype=np.uint16)
            parts = [(spec, value_for(spec, pulse_id), timestamp_for(pulse_id))
                     for spec in CHANNELS] + [(BIG, image, timestamp_for(pulse_id))]
            source.send_frames(encode_message(pulse_id, timestamp_for(pulse_id), parts))
            pulse_id += 1
        message = ioc.text("MESSAGE")
        print(f"disk full after {pulse_id - base} images: {message}")
        assert "No space left" in message or "errno = 28" in message, message
        assert "partial" in message, message
        assert ioc.severity("STATE") == 2  # MAJOR
        assert (inside / "full.h5.partial").exists()
        assert not (inside / "full.h5").exists()
        assert (inside / "full.h5.partial").stat().st_size > 2_000_000  # really filled it

        # The ring keeps filling and CA keeps answering.
        received = ioc.get("RECEIVED")
        source.send_range(pulse_id, pulse_id + 9)
        ioc.wait_for("LAST_PULSE_ID", pulse_id + 9)
        poll(lambda: ioc.get("RECEIVED") >= received + 10, what="RECEIVED rising")
        assert ioc.get("STATE") == ERROR

        # A directory with room (outside the tmpfs, inside the root) works.
        base2 = pulse_id + 100
        ioc.put("OUTPUT_FILE", "roomy/next.h5")
        ioc.put("START_PULSE_ID", base2)
        assert ioc.get("STATE") == 1 and ioc.severity("STATE") == 0
        source.send_range(base2, base2 + 10)
        ioc.put("STOP_PULSE_ID", base2 + 9)
        assert_rows(root / "roomy/next.h5", list(range(base2, base2 + 10)))
        assert ioc.get("STATE") == 0
        assert ioc.stop() == 0, ioc.log()
    finally:
        source.close()
    assert not (small / "full.h5").exists()  # nothing leaked out of the namespace


# ---- 4. vanished and unwritable directories -----------------------------------------------

def test_output_directory_removed_during_an_acquisition(iocs, tmp_path):
    root, source, base = tmp_path / "out", BsreadSource(), next(_bases)
    ioc = iocs(["--stream", source.address, "--output-root", str(root)])
    try:
        ioc.put("OUTPUT_FILE", "gone/deeper/v.h5")
        ioc.put("START_PULSE_ID", base)
        source.send_range(base, base + 19)
        ioc.wait_for("WRITTEN", 20)
        shutil.rmtree(root / "gone")
        source.send_range(base + 20, base + 29)
        ioc.wait_for("STATE", ERROR)  # noticed at the next flush, before any stop
        message = ioc.text("MESSAGE")
        assert "v.h5.partial" in message and "No such file" in message, message
        assert ioc.severity("STATE") == 2
        assert not (root / "gone").exists()
        assert not list(root.rglob("v.h5*"))

        # The same name again: nothing is there.
        assert_acquisition_works(ioc, source, root, "gone/deeper/v.h5", base + 100, 10)
        assert ioc.stop() == 0, ioc.log()
    finally:
        source.close()


def test_unwritable_output_directory_is_refused_at_start(iocs, tmp_path):
    root, source, base = tmp_path / "out", BsreadSource(), next(_bases)
    root.mkdir()
    (root / "blocker").write_bytes(b"a regular file")
    ioc = iocs(["--stream", source.address, "--output-root", str(root)])
    try:
        ioc.put("OUTPUT_FILE", "blocker/x.h5")
        result = caput_binary("-c", ioc.pv("START_NOW"), "1", ca_timeout=10)
        assert result.returncode != 0, result.stdout
        message = ioc.text("MESSAGE")
        assert "cannot create" in message and "blocker/x.h5" in message, message
        assert ioc.get("STATE") == 0
        assert (root / "blocker").read_bytes() == b"a regular file"
        assert sorted(p.name for p in root.iterdir()) == ["blocker"]

        assert_acquisition_works(ioc, source, root, "fine/x.h5", base, 5)
        assert ioc.stop() == 0, ioc.log()
    finally:
        source.close()


# ---- 5. source killed and restarted -----------------------------------------------------

SENDER = r"""
import sys, threading, zmq
from sfbw_ioc.bsread import encode_message
from sfbw_ioc.testing.sources import CHANNELS, timestamp_for, value_for
port, first, last = (int(arg) for arg in sys.argv[1:4])
socket = zmq.Context.instance().socket(zmq.PUSH)
socket.bind(f"tcp://127.0.0.1:{port}")
for pulse_id in range(first, last + 1):
    parts = [(spec, value_for(spec, pulse_id), timestamp_for(pulse_id)) for spec in CHANNELS]
    socket.send_multipart(encode_message(pulse_id, timestamp_for(pulse_id), parts))
print("sent", flush=True)
threading.Event().wait()  # stay connected until killed
"""


def _sender(port: int, first: int, last: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The port may still be held for a moment by a killed predecessor's kernel socket.
    return subprocess.Popen([sys.executable, "-c", SENDER, str(port), str(first), str(last)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill(process: subprocess.Popen) -> None:
    process.kill()
    assert process.wait(10) == -signal.SIGKILL, process.stderr.read()


def test_source_killed_and_restarted_with_a_gap_and_a_jump_back(iocs, tmp_path):
    root, port, base, gap = tmp_path / "out", free_port(), next(_bases), 25
    ioc = iocs(["--stream", f"tcp://127.0.0.1:{port}", "--output-root", str(root)])
    senders = []
    try:
        ioc.put("OUTPUT_FILE", "gap.h5")
        ioc.put("START_PULSE_ID", base)
        senders.append(_sender(port, base, base + 49))
        ioc.wait_for("WRITTEN", 50, timeout=20)
        _kill(senders[-1])
        # Same port, pulse ids continue after ``gap`` pulses the source never sent.
        first2 = base + 50 + gap
        senders.append(_sender(port, first2, first2 + 50))
        ioc.wait_for("LAST_PULSE_ID", first2 + 50, timeout=20)
        ioc.put("STOP_PULSE_ID", first2 + 49)
        assert_rows(root / "gap.h5", list(range(base, base + 50)) +
                    list(range(first2, first2 + 50)))
        assert ioc.get("MISSING") == gap
        assert ioc.get("PULSE_ID_ANOMALIES") == 0
        _kill(senders[-1])

        # A restart whose pulse ids jump back: counted, and the new run is acquired.
        back = base - 500_000
        senders.append(_sender(port, back, back + 30))
        ioc.wait_for("LAST_PULSE_ID", back + 30, timeout=20)
        assert ioc.get("PULSE_ID_ANOMALIES") == 1
        ioc.put("OUTPUT_FILE", "after_jump.h5")
        ioc.put("START_PULSE_ID", back + 5)
        ioc.put("STOP_PULSE_ID", back + 25)
        assert_rows(root / "after_jump.h5", list(range(back + 5, back + 26)))
        assert ioc.get("MISSING") == 0
        assert ioc.stop() == 0, ioc.log()
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
                sender.wait()


# ---- 6. the writer falls behind ----------------------------------------------------------

WIDE = ChannelSpec("T:WIDE", "float64", (16384,))  # 128 KiB a message
FLOOD = 20_000 if SLOW else 1_000  # the IOC takes 80-700 such messages/s
RING = 50 if SLOW else 10  # messages: a writer that lags by more loses the oldest


def test_writer_falling_behind_loses_whole_messages_and_says_so(iocs, tmp_path):
    root, source, base = tmp_path / "out", BsreadSource(), next(_bases)
    ioc = iocs(["--stream", source.address, "--output-root", str(root),
                "--buffer-length", str(RING)])
    channels = (*CHANNELS, WIDE)
    try:
        ioc.put("OUTPUT_FILE", "flood.h5")
        ioc.put("STOP_PULSE_ID", base + FLOOD - 1)  # idle: kept for the start
        ioc.put("START_PULSE_ID", base)
        started = time.monotonic()
        source.send_range(base, base + FLOOD, channels=channels)  # one past the stop
        sent_in = time.monotonic() - started
        poll(lambda: ioc.get("STATE") == 0 and ioc.text("LAST_FILE"), timeout=60,
             what="the flood's file closed")
        written, lost = ioc.get("WRITTEN"), ioc.get("LOST")
        message = ioc.text("MESSAGE")
    finally:
        source.close()
    rows = file_pulse_ids(root / "flood.h5")
    print(f"flood: {FLOOD} messages sent in {sent_in:.1f} s, {len(rows)} written, "
          f"{lost:.0f} lost")
    assert len(rows) == written and written + lost == FLOOD, (written, lost)
    assert lost > 0, "the writer kept up: the test did not provoke the fault"
    assert rows == sorted(set(rows)) and rows[0] >= base and rows[-1] <= base + FLOOD - 1
    assert "lost" in message, message
    assert_rows(root / "flood.h5", rows)
    with h5py.File(root / "flood.h5") as f:
        data = f["data/T:WIDE/data"]
        for row in range(0, len(rows), max(1, len(rows) // 50)):
            assert_value(WIDE, data[row], value_for(WIDE, rows[row]))


# ---- 7. a deaf IOC exits; a failed start-up exits non-zero ------------------------------

def test_watchdog_fires_once_when_the_heartbeat_stops():
    fired = []
    done = threading.Event()
    watchdog = Watchdog(0.5, on_stale=lambda age, limit: (fired.append(age), done.set()))
    watchdog.start()
    try:
        beating = time.monotonic()
        while time.monotonic() - beating < 1.5:  # beats keep it quiet for 3 timeouts
            watchdog.beat()
            assert not fired
            time.sleep(0.05)  # the beat period of this test, not a synchronisation
        stopped = time.monotonic()
        assert done.wait(5), "the watchdog did not fire"
        assert 0.5 < fired[0] < 1.5 and time.monotonic() - stopped < 1.5
        assert len(fired) == 1
    finally:
        watchdog.stop()


def test_the_self_check_reads_a_pv_as_a_new_client_would(iocs, tmp_path):
    source = BsreadSource()
    # -v: client connections are logged (at DEBUG), so the probe's would be seen.
    ioc = iocs(["--stream", source.address, "--output-root", str(tmp_path / "out"), "-v"])
    try:
        assert read_pv(("127.0.0.1", ioc.port), ioc.pv("STATE"), 5.0) is not None
        with pytest.raises(ProbeFailed):
            read_pv(("127.0.0.1", ioc.port), ioc.pv("NO_SUCH_PV"), 5.0)
        with pytest.raises(OSError):
            read_pv(("127.0.0.1", free_port()), ioc.pv("STATE"), 5.0)
        # The IOC's own probe connects twice a second; the log tells only of ours.
        ports: list[int] = []
        logged_before = len(ioc.log_path.read_text().splitlines())
        for _ in range(4):
            read_pv(("127.0.0.1", ioc.port), ioc.pv("STATE"), 5.0, before_connect=ports.append)
            time.sleep(0.5)  # lets the IOC's probe run meanwhile; not a synchronisation
        logged = [line for line in ioc.log_path.read_text().splitlines()[logged_before:]
                  if "Connected to new client" in line]
        assert [re.search(r"client at [\d.]+:(\d+)", line).group(1) for line in logged] \
            == [str(port) for port in ports]
    finally:
        source.close()


@pytest.mark.parametrize("kind", ["ioc", "group"])
def test_an_ioc_out_of_file_descriptors_is_deaf_and_exits_70(iocs, tmp_path, kind):
    """Alive but deaf for real: with no descriptor left, the server cannot accept a
    connection (existing clients would still be served). The self-check notices, in the
    IOC and in the group IOC (whose member need not exist for that)."""
    source = BsreadSource()
    if kind == "ioc":
        ioc = iocs(["--stream", source.address, "--output-root", str(tmp_path / "out"),
                    "--watchdog-seconds", "3"])
    else:
        ioc = iocs(["--member", unique_prefix("ABSENT"), "--output-root",
                    str(tmp_path / "out"), "--watchdog-seconds", "3"],
                   module="sfbw_ioc.group.cli")
    try:
        assert read_pv(("127.0.0.1", ioc.port), ioc.pv("STATE"), 5.0) is not None
        open_fds = len(os.listdir(f"/proc/{ioc.pid}/fd"))
        resource.prlimit(ioc.pid, resource.RLIMIT_NOFILE, (open_fds, open_fds))
        deadline = time.monotonic() + 30
        deaf_seen = False
        while ioc.process.poll() is None:
            assert time.monotonic() < deadline, "the IOC neither went deaf nor exited"
            try:
                read_pv(("127.0.0.1", ioc.port), ioc.pv("STATE"), 0.5)
            except (OSError, ProbeFailed):
                deaf_seen = deaf_seen or ioc.process.poll() is None
        assert ioc.process.returncode == 70
        assert deaf_seen, "the IOC exited before it was seen not answering"
        assert "Channel Access has not answered" in ioc.log_path.read_text()
    finally:
        source.close()


def _shrink_pipe(fd: int, size: int) -> bool:
    """F_SETPIPE_SZ to ``size``, after reading what the start-up logged: the kernel
    refuses (EBUSY) to shrink a pipe below what it holds."""
    os.set_blocking(fd, False)
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, True)
    try:
        fcntl.fcntl(fd, 1031, size)
    except OSError as error:
        if error.errno != errno.EBUSY:
            raise
        return False
    return True


def test_a_stalled_event_loop_makes_the_ioc_exit_70(iocs, tmp_path):
    """A log pipe nobody reads (a stalled journald, a hung terminal) fills; the next log
    line from the event loop blocks it for good: CA goes deaf, the process lives on.
    The watchdog must end it. The refused puts here log from the loop."""
    source = BsreadSource()
    ioc = iocs(["--stream", source.address, "--output-root", str(tmp_path / "out"),
                "--watchdog-seconds", "2"], stdout=subprocess.PIPE)
    pipe = ioc.process.stdout
    try:
        poll(lambda: _shrink_pipe(pipe.fileno(), 4096), what="a small pipe")  # fills fast
        deadline = time.monotonic() + 30
        deaf_seen = False
        while ioc.process.poll() is None:
            assert time.monotonic() < deadline, "the IOC neither stalled nor exited"
            # Refused (negative pulse id): the putter logs a warning from the loop.
            try:
                epics.caput(ioc.pv("STOP_PULSE_ID"), -1, wait=False, connection_timeout=0.5)
            # A deaf or exiting IOC: the loop checks which. (pyepics raises TypeError
            # from a put racing a circuit that is going away.)
            except (epics.ca.CASeverityException, epics.ca.ChannelAccessException, TypeError):
                continue
            if not _answers(ioc.pv("STATE")):
                deaf_seen = deaf_seen or ioc.process.poll() is None
        assert ioc.process.returncode == 70
        assert deaf_seen, "the IOC exited before it was seen not answering"
    finally:
        source.close()
        pipe.close()


def _answers(pv: str) -> bool:
    try:
        return epics.caget(pv, timeout=0.3, use_monitor=False) is not None
    # Timed out after the request went out, or the circuit went away with the IOC.
    except (epics.ca.ChannelAccessGetFailure, epics.ca.CASeverityException):
        return False


def test_startup_failure_exits_non_zero(tmp_path, ca_port):
    (tmp_path / "file").write_text("not a directory")
    result = run_ioc(ca_port, unique_prefix("FLT"), ["--stream", "tcp://127.0.0.1:9",
                                                     "--output-root", str(tmp_path / "file/root")])
    assert result.returncode == 1, result.stderr
    assert "CRITICAL" in result.stderr and "output root" in result.stderr, result.stderr


# ---- 8. many Channel Access clients while a stream is written ---------------------------

CAMERA = ChannelSpec("T:CAMERA", "uint16", (256, 256), compression="bitshuffle_lz4")
CLIENTS = 10
LOAD_SECONDS = 10 if SLOW else 6

CLIENT = r"""
import json, sys, time, epics
prefix, seconds, names = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
counts = {"disconnects": 0, "updates": 0, "gets": 0, "answered": 0}
def on_connection(pvname=None, conn=None, **kwargs):
    counts["disconnects"] += not conn
def on_value(**kwargs):
    counts["updates"] += 1
pvs = [epics.PV(prefix + name, callback=on_value, connection_callback=on_connection,
                auto_monitor=True, form="time") for name in names]
deadline = time.monotonic() + 20
while not all(pv.connected for pv in pvs):
    if time.monotonic() > deadline:
        sys.exit("not connected: " + " ".join(pv.pvname for pv in pvs if not pv.connected))
    epics.poll(0.01, 0.1)
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for pv in pvs:
        counts["gets"] += 1
        counts["answered"] += pv.get(use_monitor=False, timeout=5, count=0) is not None
print(json.dumps(counts), flush=True)
"""


def test_ten_ca_clients_while_a_100hz_stream_with_images_is_written(iocs, tmp_path):
    root, source, base = tmp_path / "out", BsreadSource(), next(_bases)
    ioc = iocs(["--stream", source.address, "--output-root", str(root)])
    names = [name[len(ioc.prefix):] for name in _pv_names(ioc)]
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, ioc.prefix,
                                 str(LOAD_SECONDS + 2), *names],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(CLIENTS)]
    sender = PacedSender(source, base, rate_hz=100, channels=(*CHANNELS, CAMERA))
    try:
        for client in clients:
            assert client.stdout.readline().strip() == "ready", client.stderr.read()
        ioc.put("OUTPUT_FILE", "load.h5")
        ioc.put("START_PULSE_ID", base)
        sender.start()
        poll(lambda: len(sender.sent) >= LOAD_SECONDS * 100, timeout=LOAD_SECONDS + 10,
             what="the stream to run")
        sent = sender.finish()
        source.send(sent[-1] + 1, channels=(*CHANNELS, CAMERA))
        ioc.put("STOP_PULSE_ID", sent[-1])
        results = []
        for client in clients:
            out, err = client.communicate(timeout=30)
            assert client.returncode == 0, err
            results.append(json.loads(out.splitlines()[-1]))
    finally:
        sender.finish()
        source.close()
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
    print(f"load: {len(sent)} messages at 100 Hz; clients: {results}")
    assert ioc.get("LOST") == 0 and ioc.get("WRITTEN") == len(sent)
    assert_rows(root / "load.h5", sent, channels=(*CHANNELS, CAMERA))
    for result in results:
        assert result["disconnects"] == 0, result
        assert result["gets"] == result["answered"] > 0, result
        assert result["updates"] >= len(names), result
    assert ioc.stop() == 0, ioc.log()


def _pv_names(ioc: IocProcess) -> list[str]:
    """Every PV of the IOC, from its own database file (the same PVs it serves)."""
    db = subprocess.run([sys.executable, "-m", "sfbw_ioc.cli", "--write-db", "/dev/stdout"],
                        capture_output=True, text=True, cwd=REPO, check=True).stdout
    names = [line.split('"')[1].replace("$(P)", ioc.prefix)
             for line in db.splitlines() if line.startswith("record(")]
    assert len(names) > 20, db[:500]
    return names


# ---- 9. memory under a flood of images ------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="sends 1 GB; set SFBW_SLOW=1")
def test_memory_stays_bounded_under_an_image_flood(iocs, tmp_path):
    root, source, base = tmp_path / "out", BsreadSource(), next(_bases)
    # The stated bound: --buffer-bytes, plus what ZeroMQ may queue (RCVHWM 100 messages,
    # and up to half as many again: its pipe counts reads in steps of half the HWM) of
    # 1 MiB, plus 150 MiB (interpreter, libraries, batches in flight).
    buffer_mib, queued_mib, overhead_mib = 200, 150, 150
    ioc = iocs(["--stream", source.address, "--output-root", str(root),
                "--buffer-bytes", f"{buffer_mib}M"])
    image = ChannelSpec("T:FRAME", "uint16", (512, 1024))  # 1 MiB, random
    rng = np.random.default_rng(2)
    frames_sent, peak = 0, 0
    try:
        ioc.put("OUTPUT_FILE", "images.h5")
        ioc.put("START_PULSE_ID", base)
        pixels = rng.integers(0, 2**16, (64,) + image.shape, dtype=np.uint16)
        for pulse_id in range(base, base + 1024):  # 1 GiB
            parts = [(CHANNELS[0], value_for(CHANNELS[0], pulse_id), timestamp_for(pulse_id)),
                     (image, pixels[pulse_id % 64], timestamp_for(pulse_id))]
            source.send_frames(encode_message(pulse_id, timestamp_for(pulse_id), parts))
            frames_sent += 1
            peak = max(peak, _rss_mib(ioc.pid))
        sent_at = time.monotonic()

        def received_all() -> bool:
            nonlocal peak
            peak = max(peak, _rss_mib(ioc.pid))
            return ioc.get("LAST_PULSE_ID") == base + 1023
        poll(received_all, timeout=120, interval=0.05, what="every image received")
        received_in = time.monotonic() - sent_at
        ioc.put("STOP_NOW", 1)
        written, lost = ioc.get("WRITTEN"), ioc.get("LOST")
        # Freed images go back to the system at the heap trimmer's next round.
        settled = _rss_mib(ioc.pid)
        try:
            poll(lambda: _rss_mib(ioc.pid) < buffer_mib + overhead_mib,
                 timeout=3 * TRIM_INTERVAL_S, interval=0.2, what="the heap trimmed")
            trimmed = True
        except AssertionError:
            trimmed = False
        settled_later = _rss_mib(ioc.pid)
    finally:
        source.close()
    print(f"memory: {frames_sent} MiB sent, all received {received_in:.1f} s later, "
          f"{written:.0f} written, {lost:.0f} lost, RSS peak {peak} MiB, when received "
          f"{settled} MiB, {settled_later} MiB after trimming "
          f"(limit {buffer_mib} + {queued_mib} + {overhead_mib})")
    rows = file_pulse_ids(root / "images.h5")
    assert rows == sorted(rows) and len(rows) == written and written + lost == 1024
    assert trimmed  # nothing queued once all is received, and the freed heap returned
    assert peak < buffer_mib + queued_mib + overhead_mib



def _rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


# ---- a stream nobody hears (issue 26.6b) --------------------------------------------------

def test_an_unresolved_stream_host_raises_the_stream_alarm(iocs, tmp_path):
    ioc = iocs(["--stream", "tcp://nohost.invalid:9000", "--output-root", str(tmp_path)])
    ioc.wait_for("STREAM_STATUS", 3)  # UNRESOLVED
    assert epics.PV(ioc.pv("STREAM_STATUS")).get_ctrlvars()["severity"] == 2  # MAJOR
    assert "does not resolve" in ioc.text("MESSAGE"), ioc.text("MESSAGE")
    assert "nohost.invalid" in ioc.log()
    assert ioc.stop() == 0, ioc.log()


def test_a_silent_stream_raises_the_alarm_and_messages_clear_it(iocs, tmp_path):
    source, base = BsreadSource(), next(_bases)
    ioc = iocs(["--stream", source.address, "--output-root", str(tmp_path)])
    try:
        ioc.wait_for("STREAM_STATUS", 2, timeout=15)  # SILENT: nothing for over 5 s
        assert "no message at all" in ioc.text("MESSAGE"), ioc.text("MESSAGE")
        source.send_range(base, base + 3)
        ioc.wait_for("STREAM_STATUS", 0)  # RECEIVING
        poll(lambda: epics.PV(ioc.pv("STREAM_STATUS")).get_ctrlvars()["severity"] == 0,
             what="the alarm to clear")
        assert ioc.stop() == 0, ioc.log()
    finally:
        source.close()
