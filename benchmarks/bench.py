"""Performance scenarios of sfbw-ioc, end to end: a bsread source on a real ZeroMQ socket,
the IOC as a subprocess (its command line only), a Channel Access client (pyepics).

    python benchmarks/bench.py scalars            # one scenario
    python benchmarks/bench.py all --quick        # every scenario, smaller

Each scenario prints ONE line on stdout,

    scenario: figure <value> <unit>, limit <value> <unit>, ratio <figure/limit>

and its details on stderr. See benchmarks/README.md for what each figure means.
Exit status 1 when a scenario failed (lost messages, wrong rows, an IOC error).
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import numpy as np
import zmq

from common import MiB, CpuMeter, Ioc, ca_setup, machine_busy_seconds
from sfbw_ioc.bsread import ChannelSpec, Encoder
from sfbw_ioc.testing.ioc import poll
from sfbw_ioc.testing.sources import BsreadSource, IncompressibleCamera, PacedSender, PreEncoded

BASE_PULSE_ID = 20_000_000_000  # above 2**31, like SwissFEL's
PERIOD_NS = 10_000_000
WARMUP = 50  # messages sent before a measurement, below its range, to settle the stream


class ScenarioFailed(Exception):
    """The IOC did not do the job (lost or wrong rows, an error): reported, not a rate."""


def detail(text: str) -> None:
    print("  " + text, file=sys.stderr, flush=True)


def result(name: str, figure: float, unit: str, limit: float, limit_unit: str | None = None,
           digits: int = 1) -> None:
    ratio = figure / limit if limit else float("nan")
    print(f"{name}: figure {figure:.{digits}f} {unit}, limit {limit:.{digits}f} "
          f"{limit_unit or unit}, ratio {ratio:.2f}", flush=True)


def failed(name: str, text: str) -> None:
    print(f"{name}: figure FAILED ({text}), limit n/a, ratio n/a", flush=True)


# ---- messages -------------------------------------------------------------------------

def timestamp_ns(pulse_id: int) -> int:
    return 1_700_000_000_000_000_000 + pulse_id * PERIOD_NS


def scalar_specs(count: int, prefix: str = "BENCH:S") -> list[ChannelSpec]:
    width = len(str(count - 1))
    return [ChannelSpec(f"{prefix}{i:0{width}d}", "float64", ()) for i in range(count)]


class ScalarMessages:
    """bsread messages of ``count`` float64 scalars, value = pulse_id + channel / 1000.

    ``frames(p)`` encodes with sfbw_ioc.bsread.Encoder (the reference format);
    ``fast_frames(p)`` comes from a block of ``block`` such pulses (PreEncoded), for
    senders that must outrun the IOC.
    """

    def __init__(self, count: int, block: int = 1000) -> None:
        self.specs = scalar_specs(count)
        self._offsets = np.arange(count) / 1000.0
        self._encoder = Encoder()
        self._block = PreEncoded([self.frames(p) for p in range(block)])

    def frames(self, pulse_id: int) -> list[bytes]:
        ts = timestamp_ns(pulse_id)
        values = pulse_id + self._offsets
        return self._encoder.encode(pulse_id, ts, [(spec, values[i], ts) for i, spec in
                                                   enumerate(self.specs)])

    def fast_frames(self, pulse_id: int) -> list[bytes]:
        return self._block.frames(pulse_id)


CAMERA_SPEC = ChannelSpec("BENCH:CAMERA", "uint16", (480, 640), compression="bitshuffle_lz4")


def camera_images(count: int, seed: int = 1) -> list[np.ndarray]:
    """Noisy 640x480 uint16 frames (a beam spot on a pedestal, sigma-35 noise): they
    compress to ~360 KB with bitshuffle_lz4, like a real detector image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    spot = 1000 + 800 * np.exp(-((xx - 320) ** 2 + (yy - 240) ** 2) / (2 * 80.0 ** 2))
    return [np.clip(spot + rng.normal(0, 35, spot.shape), 0, 65535).astype(np.uint16)
            for _ in range(count)]


class CameraMessages:
    """One bitshuffle_lz4 camera channel per message, cycling through a few images (each
    encoded once: consecutive messages share their value parts, as in PreEncoded)."""

    def __init__(self, distinct: int = 8) -> None:
        self.images = camera_images(distinct)
        encoder = Encoder()
        self._block = PreEncoded([
            encoder.encode(p, timestamp_ns(p), [(CAMERA_SPEC, image, timestamp_ns(p))])
            for p, image in enumerate(self.images)])

    def image_for(self, pulse_id: int) -> np.ndarray:
        return self.images[pulse_id % len(self.images)]

    def frames(self, pulse_id: int) -> list[bytes]:
        return self._block.frames(pulse_id)


# ---- one scenario's world: source, IOC, temp dir --------------------------------------

@dataclass
class World:
    name: str
    ports: list[int]
    tmp_parent: Path | None
    keep: bool
    ioc: Ioc | None = None
    source: BsreadSource | None = None
    tmp: Path = field(default=None)  # type: ignore[assignment]
    children: list = field(default_factory=list)
    monitor: object = None

    def __enter__(self) -> "World":
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sfbw-bench-{self.name}-", dir=self.tmp_parent))
        (self.tmp / "out").mkdir()
        return self

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def start_ioc(self, ioc_args: list[str], stream: str | None = None,
                  wrapper: Iterable[str] = ()) -> Ioc:
        if stream is None:
            self.source = BsreadSource()
            stream = self.source.address
            # Connection events of the PUSH socket: a reconnect loses what was queued.
            self.monitor = self.source._socket.get_monitor_socket(
                zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        args = ["--stream", stream, "--output-root", str(self.out), *ioc_args]
        detail(f"IOC: sfbw-ioc {' '.join(args)}")
        self.ioc = Ioc(self.ports.pop(0), args, self.tmp / "ioc.log", tag="BENCH",
                       wrapper=wrapper)
        return self.ioc

    def __exit__(self, kind, error, tb) -> None:
        for child in self.children:
            if child.is_alive():
                child.terminate()
            child.join(10)
        if self.ioc is not None:
            rc = self.ioc.stop()
            if kind is not None or rc != 0:
                detail(f"IOC exit status {rc}; log tail:\n"
                       + textwrap.indent(self.ioc.log()[-3000:], "    "))
        if self.source is not None:
            self.report_connections()
            self.source._socket.disable_monitor()
            self.monitor.close(linger=0)
            self.source.close()
        if self.keep:
            detail(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


    def report_connections(self) -> None:
        from zmq.utils.monitor import recv_monitor_message
        events = []
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            events.append((event["event"], event["endpoint"]))
        accepted = sum(e == zmq.EVENT_ACCEPTED for e, _ in events)
        disconnected = sum(e == zmq.EVENT_DISCONNECTED for e, _ in events)
        detail(f"source socket: {accepted} connection(s) accepted, {disconnected} "
               f"disconnected" + (" (the IOC's receiver reconnected: messages queued for "
                                  "the old connection are lost)" if accepted > 1 else ""))


def warm_up(ioc: Ioc, send: Callable[[int], None], first: int, count: int = WARMUP) -> None:
    """Send ``count`` messages just below ``first`` and wait until the IOC has them."""
    received = ioc.get("RECEIVED")
    for pulse_id in range(first - count, first):
        send(pulse_id)
    ioc.wait("RECEIVED", lambda v: v >= received + count, timeout=30)


def start_range(ioc: Ioc, name: str, first: int, last: int) -> dict:
    """OUTPUT_FILE, START_PULSE_ID first, STOP_PULSE_ID last as a put with callback;
    returns the dict the callback fills with its completion time."""
    ioc.put("OUTPUT_FILE", name)
    ioc.put("START_PULSE_ID", first)
    done: dict = {}
    ioc.put_callback("STOP_PULSE_ID", last, done)
    poll(lambda: ioc.text("MESSAGE").startswith("stopping at"), timeout=10,
         what="the STOP put to be taken")
    return done


def wait_done(done: dict, timeout: float) -> float:
    poll(lambda: "t" in done, timeout=timeout, interval=0.002, what="STOP put callback")
    return done["t"]


def check_acquisition(ioc: Ioc, path: Path, first: int, count: int,
                      channels: list[str] | None = None) -> None:
    """The IOC's figures and the file: exactly pulses first..first+count-1, aligned."""
    import h5py
    state, lost, missing, written = (ioc.get(n) for n in ("STATE", "LOST", "MISSING", "WRITTEN"))
    detail(f"WRITTEN {written:.0f}, LOST {lost:.0f}, MISSING {missing:.0f}, STATE {state}; "
           f"MESSAGE {ioc.text('MESSAGE')!r}")
    if lost or written != count or state != 0:
        raise ScenarioFailed(f"LOST {lost:.0f}, WRITTEN {written:.0f} of {count}, STATE {state}")
    if ioc.text("LAST_FILE") != str(path):
        raise ScenarioFailed(f"LAST_FILE {ioc.text('LAST_FILE')!r}, not {path}")
    expected = np.arange(first, first + count)
    with h5py.File(path, "r") as f:
        names = channels or list(f["data"])
        for name in names:
            pulse_ids = f["data"][name]["pulse_id"][:]
            if not np.array_equal(pulse_ids, expected):
                raise ScenarioFailed(f"{name}: {len(pulse_ids)} rows, pulse ids "
                                     f"{pulse_ids[:1]}..{pulse_ids[-1:]} not {first}..+{count}")
            if not f["data"][name]["is_data_present"][:].all():
                raise ScenarioFailed(f"{name}: rows marked absent")


def fsync_seconds(directory: Path, chunks: list[bytes] | bytes, time_write: bool) -> float:
    """Write ``chunks`` to a new file in ``directory`` with os.write, then os.fsync;
    the time of both (time_write) or of the fsync alone. The file is removed."""
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    path = directory / f"fsync-probe-{os.getpid()}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        t0 = time.perf_counter()
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
        path.unlink()
    return t2 - t0 if time_write else t2 - t1


# ---- 1. scalars -----------------------------------------------------------------------

BARE_PULL = """
import sys, zmq
socket = zmq.Context().socket(zmq.PULL)
socket.setsockopt(zmq.RCVHWM, 10_000)
socket.connect(sys.argv[1])
socket.recv_multipart()
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    socket.recv_multipart()
print("done", flush=True)
"""


def bare_loop_rate(script: str, frames: list[list[bytes]], *args: str) -> float:
    """Messages/s of ``script`` (python -c SCRIPT ADDRESS N ARGS...: connects to our PUSH
    socket, takes one message, prints "ready", takes N more, prints "done"), from the
    first of the N sent to "done"."""
    source = BsreadSource()
    child = subprocess.Popen([sys.executable, "-c", script, source.address, str(len(frames)),
                              *args], stdout=subprocess.PIPE, text=True)
    try:
        source.send_frames(frames[0])
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("bare loop did not start")
        t0 = time.perf_counter()
        for message in frames:
            source.send_frames(message)
        if child.stdout.readline().strip() != "done":
            raise RuntimeError("bare loop did not finish")
        return len(frames) / (time.perf_counter() - t0)
    finally:
        child.wait(60)
        source.close()


def bare_pull_rate(frames: list[list[bytes]]) -> float:
    """Messages/s a bare pyzmq PULL loop in its own process drains from our PUSH socket
    (blocking recv_multipart with copies, as the IOC's receiver does)."""
    return bare_loop_rate(BARE_PULL, frames)


def scenario_scalars(opts, world_args) -> None:
    n = opts.messages
    stream = ScalarMessages(opts.channels)
    first = BASE_PULSE_ID + 1_000_000
    t = time.perf_counter()
    frames = [stream.frames(p) for p in range(first, first + n + 1)]  # +1: past the stop
    detail(f"{n} messages of {opts.channels} float64 scalars, "
           f"{sum(map(len, frames[0]))} B and {len(frames[0])} parts each "
           f"(encoded in {time.perf_counter() - t:.1f} s)")
    bare = max(bare_pull_rate(frames[:n]) for _ in range(2))
    detail(f"bare pyzmq PULL loop: {bare:.0f} msgs/s (best of 2)")
    with World("scalars", **world_args) as world:
        ioc = world.start_ioc(["--buffer-length", str(opts.buffer_length)])
        send = world.source.send_frames
        warm_up(ioc, lambda p: send(stream.frames(p)), first)
        done = start_range(ioc, "scalars.h5", first, first + n - 1)
        t0 = time.perf_counter()
        for message in frames:
            send(message)
        t_sent = time.perf_counter()
        t_done = wait_done(done, timeout=300)
        detail(f"sent in {t_sent - t0:.2f} s ({n / (t_sent - t0):.0f} msgs/s), file closed "
               f"{t_done - t_sent:.2f} s after the last send")
        check_acquisition(ioc, world.out / "scalars.h5", first, n)
        result("scalars", n / (t_done - t0), "msgs/s", bare, digits=0)


# ---- 2. wide --------------------------------------------------------------------------

def scenario_wide(opts, world_args) -> None:
    stream = ScalarMessages(opts.channels, block=50)  # fast_frames: ~no sender CPU
    count = round(opts.seconds * opts.rate)
    first = BASE_PULSE_ID + 2_000_000
    with World("wide", **world_args) as world:
        ioc = world.start_ioc([])
        send = world.source.send_frames
        warm_up(ioc, lambda p: send(stream.frames(p)), first, count=10)
        done = start_range(ioc, "wide.h5", first, first + count - 1)
        cpu = CpuMeter(ioc.pid)
        t0 = time.perf_counter()
        behind = 0.0
        for i in range(count):
            ahead = t0 + i / opts.rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
            behind = max(behind, -ahead)
            send(stream.fast_frames(first + i))
        elapsed = time.perf_counter() - t0
        percent = cpu.percent()
        t_sent = time.perf_counter()
        written_at_end = ioc.get("WRITTEN")  # 2 Hz statistics: up to 0.5 s old
        send(stream.fast_frames(first + count))  # past the stop: closes the file
        t_done = wait_done(done, timeout=120)
        message = stream.fast_frames(first)
        detail(f"sent {count} messages of {opts.channels} channels "
               f"({sum(map(len, message))} B, {len(message)} parts) in {elapsed:.1f} s = "
               f"{count / elapsed:.1f} Hz (at most {behind * 1e3:.0f} ms behind schedule); "
               f"WRITTEN {written_at_end:.0f} at the last send; file closed "
               f"{t_done - t_sent:.2f} s after it")
        check_acquisition(ioc, world.out / "wide.h5", first, count,
                          channels=[s.name for s in stream.specs[::97]])
        result("wide", percent, "% of one core", 40.0)


# ---- 3. camera, cold ------------------------------------------------------------------

BARE_CAMERA = """
import os, sys, h5py, hdf5plugin, zmq
address, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
socket = zmq.Context().socket(zmq.PULL)
socket.setsockopt(zmq.RCVHWM, 100)  # as the IOC's receiver
socket.connect(address)
socket.recv_multipart()
print("ready", flush=True)
f = h5py.File(path, "w")
data = f.create_dataset("data", (n, 480, 640), "uint16", chunks=(1, 480, 640),
                        **hdf5plugin.Bitshuffle(cname="lz4"))
for i in range(n):
    data.id.write_direct_chunk((i, 0, 0), socket.recv_multipart(copy=False)[2].buffer)
f.close()
fd = os.open(path, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
print("done", flush=True)
"""


def bare_camera_rate(directory: Path, frames: list[list[bytes]]) -> float:
    """Frames/s of the physical pipeline: one process receives the frames from our PUSH
    socket and writes each value with write_direct_chunk into one dataset (no checks,
    no ring), fsync at the end; from the first send to the fsync's end."""
    path = directory / f"bare-{os.getpid()}.h5"
    try:
        return bare_loop_rate(BARE_CAMERA, frames, str(path))
    finally:
        path.unlink(missing_ok=True)


def camera_frames(n: int, first: int) -> tuple[CameraMessages, list[list[bytes]]]:
    stream = CameraMessages()
    frames = [stream.frames(p) for p in range(first, first + n + 1)]  # +1: past the stop
    total = sum(len(message[2]) for message in frames[:n])
    detail(f"{n} frames 640x480 uint16, bitshuffle_lz4 on the wire: "
           f"{total / n / 1e3:.0f} kB per frame ({total / n / (640 * 480 * 2):.2f} of raw), "
           f"{total / 1e6:.0f} MB in all")
    return stream, frames


def settle_memory(ioc: Ioc, quiet_s: float = 0.5) -> None:
    """Wait until the IOC's RSS has not changed for ``quiet_s``: a fresh IOC touches the
    memory its ring will take once the first messages show their size."""
    last = [ioc.rss(), time.monotonic()]

    def quiet() -> bool:
        rss, now = ioc.rss(), time.monotonic()
        if abs(rss - last[0]) > MiB:
            last[:] = rss, now
        return now - last[1] >= quiet_s
    poll(quiet, timeout=60, interval=0.05, what="the IOC's memory to settle")


def camera_acquisition(world: World, stream: CameraMessages, frames: list[list[bytes]],
                       first: int, name: str, fill_ring: bool) -> float:
    """Frames/s of one acquisition of ``frames`` (all but the last, which passes the
    stop) through a new IOC whose ring holds them all: first send -> STOP callback."""
    import h5py
    import hdf5plugin  # noqa: F401
    n = len(frames) - 1
    frame_bytes = sum(len(message[2]) for message in frames[:n]) / n
    ring_length = n + 2 * WARMUP
    ioc = world.start_ioc(["--buffer-length", str(ring_length),
                           "--buffer-bytes", str(int(ring_length * frame_bytes * 1.2))])
    send = world.source.send_frames
    # An IOC at the beamline buffers all the time: its ring has wrapped long before an
    # acquisition, and new images reuse the memory of evicted ones (fill_ring); a fresh
    # IOC's first acquisition runs on an empty ring (the cold scenario).
    t = time.perf_counter()
    warm_up(ioc, lambda p: send(stream.frames(p)), first,
            count=ring_length if fill_ring else WARMUP)
    settle_memory(ioc)
    detail(f"{'ring filled once' if fill_ring else 'empty ring (fresh IOC)'} before the "
           f"acquisition ({ring_length if fill_ring else WARMUP} frames, "
           f"{time.perf_counter() - t:.1f} s); IOC RSS {ioc.rss() / MiB:.0f} MiB")
    done = start_range(ioc, f"{name}.h5", first, first + n - 1)
    cpu0, busy0 = ioc.cpu(), machine_busy_seconds()
    t0 = time.perf_counter()
    for message in frames:
        send(message)
    t_sent = time.perf_counter()
    t_done = wait_done(done, timeout=600)
    ioc_cpu, busy = ioc.cpu() - cpu0, machine_busy_seconds() - busy0
    wall = t_done - t0
    detail(f"sent in {t_sent - t0:.2f} s ({n / (t_sent - t0):.0f} frames/s), file closed "
           f"{t_done - t_sent:.2f} s after the last send")
    detail(f"CPU from the first send to the file's close: the IOC {ioc_cpu / n * 1e3:.2f} ms "
           f"per frame ({ioc_cpu / wall * 100:.0f}% of one core), the machine "
           f"{busy / wall / os.cpu_count() * 100:.0f}% busy on {os.cpu_count()} CPUs")
    path = world.out / f"{name}.h5"
    check_acquisition(ioc, path, first, n)
    with h5py.File(path, "r") as f:
        data = f["data"][CAMERA_SPEC.name]["data"]
        row = n // 2
        if not np.array_equal(np.asarray(data[row]).reshape(480, 640),
                              stream.image_for(first + row)):
            raise ScenarioFailed(f"frame of row {row} differs from what was sent")
        detail(f"file: {path.stat().st_size / 1e6:.0f} MB, dataset {data.shape} "
               f"chunks {data.chunks} filters {list(data._filters)}")
    detail(f"IOC: {n / wall:.0f} frames/s")
    return n / wall


def scenario_camera(opts, world_args) -> None:
    n = opts.frames
    first = BASE_PULSE_ID + 3_000_000
    stream, frames = camera_frames(n, first)
    with World(opts.scenario, **world_args) as world:
        values = [message[2] for message in frames[:n]]
        disk_s = min(fsync_seconds(world.out, values, time_write=True) for _ in range(2))
        detail(f"disk: os.write + os.fsync of those bytes: "
               f"{sum(map(len, values)) / disk_s / 1e6:.0f} MB/s = {n / disk_s:.0f} frames/s "
               f"(best of 2)")
        bare = max(bare_camera_rate(world.out, frames[:n]) for _ in range(2))
        detail(f"bare pipeline (PULL -> write_direct_chunk, fsync): {bare:.0f} frames/s "
               f"(best of 2)")
        rate = camera_acquisition(world, stream, frames, first, opts.scenario, fill_ring=True)
    result(f"{opts.scenario}-disk", rate, "frames/s", n / disk_s)
    result(opts.scenario, rate, "frames/s", bare)


# ---- 3b. paced ------------------------------------------------------------------------

PACED_SIZES = {  # name: image shape (uint16, incompressible), or None for scalars
    "1KiB-scalars": None, "240KiB": (240, 512), "2MiB": (1024, 1024), "8MiB": (2048, 2048)}


@functools.lru_cache(maxsize=None)
def paced_messages(size: str) -> Callable[[int], list[bytes]]:
    if PACED_SIZES[size] is None:
        return ScalarMessages(6, block=100).fast_frames  # 6 float64 scalars: ~1 KiB
    return IncompressibleCamera(PACED_SIZES[size]).frames


def lag_samples(ioc: Ioc, sender: PacedSender, period: float = 0.1) -> list[float]:
    """Writer lag while ``sender`` runs: seconds since the oldest message of the
    acquisition (which starts at the sender's first) that WRITTEN does not count yet
    was sent. WRITTEN is published at 2 Hz: a sample may be up to 0.5 s too high."""
    samples = []
    while sender.is_alive():
        written = int(ioc.get("WRITTEN"))
        now = time.monotonic()
        sent_at = sender.sent_at
        samples.append(now - sent_at[written] if written < len(sent_at) else 0.0)
        time.sleep(period)  # a sampling period
    return samples


@dataclass
class PacedFigures:
    """One paced acquisition's figures."""
    size: str
    rate: float
    mib_s: float
    count: int
    late_ms: float
    lag_p50_ms: float
    lag_max_ms: float
    lost: int
    stop_ms: float
    cpu_percent: float

    def line(self) -> str:
        return (f"paced {self.size:>12} {self.rate:5g} Hz ({self.mib_s:6.1f} MiB/s, "
                f"{self.count} msgs, sender at most {self.late_ms:.0f} ms late): lag p50 "
                f"{self.lag_p50_ms:.0f} ms max {self.lag_max_ms:.0f} ms, LOST {self.lost}, "
                f"STOP -> file complete {self.stop_ms:.0f} ms, IOC CPU {self.cpu_percent:.0f}%")


def paced_case(ioc: Ioc, source: BsreadSource, out: Path, size: str, rate: float,
               seconds: float, first: int) -> PacedFigures:
    frames = paced_messages(size)
    nbytes = sum(map(len, frames(first)))
    name = f"paced-{size}-{rate:g}Hz.h5"
    ioc.put("OUTPUT_FILE", name)
    ioc.put("START_PULSE_ID", first)
    count = round(seconds * rate)
    sender = PacedSender(source, first, rate_hz=rate, frames=frames, count=count)
    cpu = CpuMeter(ioc.pid)
    sender.start()
    lags = lag_samples(ioc, sender)
    percent = cpu.percent()
    sender.join()
    late = max(np.diff(sender.sent_at) - 1 / rate, default=0.0)
    # The stop: half a second ahead of a live stream, a put with callback.
    stopper = PacedSender(source, first + count, rate_hz=rate, frames=frames)
    stopper.start()
    stop = first + count + max(1, round(rate / 2))
    done: dict = {}
    ioc.put_callback("STOP_PULSE_ID", stop, done)
    poll(lambda: "t" in done, timeout=120, interval=0.002, what="STOP put callback")
    stop_s = time.perf_counter() - done["t"]  # callback -> now, in perf_counter
    t_done = time.monotonic() - stop_s
    stopper.finish()
    if len(stopper.sent) <= stop - first - count:
        raise ScenarioFailed(f"{name}: the file closed before the stop pulse was sent")
    stop_ms = (t_done - stopper.sent_at[stop - first - count]) * 1e3
    lost = ioc.get("LOST")
    check_acquisition(ioc, out / name, first, stop - first + 1,
                      channels=None if PACED_SIZES[size] is None else ["PACED:FRAME"])
    lags_ms = np.array(lags) * 1e3
    return PacedFigures(size, rate, nbytes * rate / MiB, count, late * 1e3,
                        float(np.median(lags_ms)), float(lags_ms.max()), int(lost), stop_ms,
                        percent)


def scenario_paced(opts, world_args) -> None:
    with World("paced", **world_args) as world:
        probe = os.urandom(64 * MiB)
        disk = 4 * len(probe) / min(fsync_seconds(world.out, [probe] * 4, time_write=True)
                                    for _ in range(2))
        limit = min(opts.max_mib_s * MiB, disk)
        detail(f"disk: os.write + os.fsync of 256 MiB: {disk / MiB:.0f} MiB/s (best of 2); "
               f"cases above {limit / MiB:.0f} MiB/s are skipped")
        ioc = world.start_ioc([])
        first = BASE_PULSE_ID + 9_000_000
        for size in PACED_SIZES:
            for rate in opts.rates:
                frame_bytes = sum(map(len, paced_messages(size)(first)))
                stream_rate = frame_bytes * rate
                if stream_rate > limit:
                    print(f"paced {size:>12} {rate:5g} Hz: skipped, {stream_rate / MiB:.0f} "
                          f"MiB/s is more than this machine carries (limit "
                          f"{limit / MiB:.0f} MiB/s)", flush=True)
                    continue
                figures = paced_case(ioc, world.source, world.out, size, rate, opts.seconds,
                                     first)
                print(figures.line(), flush=True)
                first += 10_000_000


# ---- 4. close -------------------------------------------------------------------------

def scenario_close(opts, world_args) -> None:
    n = opts.messages
    stream = ScalarMessages(opts.channels)
    with World("close", **world_args) as world:
        ioc = world.start_ioc(["--buffer-length", str(n + 1000)])
        send = world.source.send_frames
        base = BASE_PULSE_ID + 4_000_000
        warm_up(ioc, lambda p: send(stream.fast_frames(p)), base)
        figures = []
        for attempt in range(opts.repeat):
            first = base + attempt * (n + 10)
            name = f"close-{attempt}.h5"
            done = start_range(ioc, name, first, first + n - 1)
            for p in range(first, first + n - 1):
                send(stream.fast_frames(p))
            ioc.wait("WRITTEN", lambda v: v >= n - 1, timeout=120, interval=0.1)
            time.sleep(1.5)  # let a periodic flush pass; the close should not depend on it
            t0 = time.perf_counter()
            send(stream.fast_frames(first + n - 1))  # the stop pulse itself closes the file
            close_s = wait_done(done, timeout=60) - t0
            path = world.out / name
            check_acquisition(ioc, path, first, n)
            fsync_s = fsync_seconds(world.out, path.read_bytes(), time_write=False)
            detail(f"#{attempt}: file {path.stat().st_size / 1e6:.1f} MB closed {close_s * 1e3:.1f} "
                   f"ms after the stop pulse was sent; fsync of its bytes {fsync_s * 1e3:.1f} "
                   f"ms -> {(close_s - fsync_s) * 1e3:.1f} ms")
            figures.append((close_s - fsync_s) * 1e3)
        result("close", float(np.median(figures)), "ms", 100.0)


# ---- 5. ca-latency --------------------------------------------------------------------

def blast(address_queue, go, stop, sent, channels: int) -> None:
    """Child process: a PUSH source sending scalar messages as fast as it can."""
    stream = ScalarMessages(channels)
    source = BsreadSource()
    address_queue.put(source.address)
    go.wait()
    pulse_id = BASE_PULSE_ID + 5_000_000
    count = 0
    try:
        while not stop.is_set():
            for _ in range(100):
                source.send_frames(stream.fast_frames(pulse_id + count))
                count += 1
            sent.value = count
    finally:
        source.close()


def caget_loop(pv: str, seconds: float, interval: float) -> list[float]:
    """Child process: time fresh gets of ``pv`` for ``seconds``.

    Not in the bench process: its pyepics holds monitors on the IOC's PVs (the helpers'
    waits), and handling their 2 Hz updates made every get that met one ~40 ms slower
    on the client's side (strace of the IOC: answered in ~3 ms, next request 44 ms later).
    """
    import epics
    channel = epics.PV(pv, auto_monitor=False)
    channel.wait_for_connection(10)
    latencies = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        t = time.perf_counter()
        value = channel.get(use_monitor=False, timeout=5)
        latencies.append(time.perf_counter() - t if value is not None else float("inf"))
        time.sleep(interval)
    return latencies


def scenario_ca_latency(opts, world_args) -> None:
    mp = multiprocessing.get_context("spawn")
    address_queue, go, stop = mp.Queue(), mp.Event(), mp.Event()
    sent = mp.Value("q", 0)
    with World("ca-latency", **world_args) as world:
        child = mp.Process(target=blast, args=(address_queue, go, stop, sent, opts.channels),
                           daemon=True)
        world.children.append(child)
        child.start()
        ioc = world.start_ioc(["--buffer-length", str(opts.buffer_length)],
                              stream=address_queue.get(timeout=60))
        ioc.put("OUTPUT_FILE", "ca-latency.h5")
        ioc.put("START_NOW", 1)
        go.set()
        ioc.wait("RECEIVED", lambda v: v > 1000, timeout=30)
        received0 = ioc.get("RECEIVED")
        t0 = time.monotonic()
        with mp.Pool(1) as pool:  # a client of its own: see caget_loop
            latencies = pool.apply(caget_loop, (ioc.pv("RECEIVED"), opts.seconds, opts.interval))
        rate = (ioc.get("RECEIVED") - received0) / (time.monotonic() - t0)
        written = ioc.get("WRITTEN")
        stop.set()
        child.join(30)
        ioc.put("STOP_NOW", 1, timeout=300)
        lost = ioc.get("LOST")
        ms = np.array(latencies) * 1e3
        p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
        detail(f"{len(ms)} cagets of RECEIVED while the IOC received {rate:.0f} msgs/s "
               f"({opts.channels} scalars) into a file: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
               f"max {ms.max():.1f} ms; file WRITTEN {written:.0f} during the gets, "
               f"{ioc.get('WRITTEN'):.0f} at the end, LOST {lost:.0f}")
        result("ca-latency-p50", p50, "ms", 20.0, digits=2)
        result("ca-latency", p99, "ms (p99)", 20.0, "ms", digits=2)


# ---- 6. memory ------------------------------------------------------------------------

def scenario_memory(opts, world_args) -> None:
    k = opts.frames
    stream = CameraMessages()
    first = BASE_PULSE_ID + 6_000_000
    with World("memory", **world_args) as world:
        ioc = world.start_ioc(["--buffer-length", str(k), "--buffer-bytes", "8G"])
        send = world.source.send_frames
        time.sleep(2)
        baseline = ioc.rss()
        for cycle in range(opts.rounds):
            for p in range(first + cycle * k, first + (cycle + 1) * k):
                send(stream.frames(p))
            ioc.wait("RECEIVED", lambda v: v >= (cycle + 1) * k, timeout=120)
            ioc.wait("BUFFER_COUNT", lambda v: v == k, timeout=30)
            time.sleep(1.0)
            held = ioc.get("BUFFER_BYTES")
            growth = ioc.rss() - baseline
            detail(f"after {(cycle + 1) * k} frames: RSS {baseline / MiB:.0f} -> "
                   f"{(baseline + growth) / MiB:.0f} MiB, growth {growth / MiB:.0f} MiB for "
                   f"{held / MiB:.0f} MiB in the ring ({k} messages): {growth / held:.2f}")
        result("memory", growth / held, "B RSS per B held", 1.2, digits=2)


# ---- 7. long --------------------------------------------------------------------------

def scenario_long(opts, world_args) -> None:
    n = opts.messages
    stream = ScalarMessages(opts.channels)
    first = BASE_PULSE_ID + 7_000_000
    with World("long", **world_args) as world:
        ioc = world.start_ioc(["--buffer-length", str(opts.buffer_length)])
        send = world.source.send_frames
        warm_up(ioc, lambda p: send(stream.frames(p)), first)
        done = start_range(ioc, "long.h5", first, first + n - 1)
        t0 = time.perf_counter()
        for i in range(n + 1):  # +1: past the stop
            ahead = t0 + i / opts.rate - time.perf_counter()
            if ahead > 0.002:
                time.sleep(ahead)
            send(stream.fast_frames(first + i))
        t_sent = time.perf_counter()
        t_done = wait_done(done, timeout=300)
        detail(f"sent {n} messages in {t_sent - t0:.1f} s = {n / (t_sent - t0):.0f} Hz through "
               f"a ring of {opts.buffer_length}; closed {t_done - t_sent:.2f} s after the last")
        check_acquisition(ioc, world.out / "long.h5", first, n)
        result("long", float(ioc.get("WRITTEN")), "msgs written", float(n), "msgs sent",
               digits=0)


# ---- command line ---------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


SCENARIOS: dict[str, tuple[Callable, str, dict[str, tuple[type, object, object, str]]]] = {
    # name: (function, help, {option: (type, default, quick default, help)})
    "scalars": (scenario_scalars, "20 float64 scalars blasted: msgs/s vs a bare PULL loop", {
        "messages": (int, 20_000, 10_000, "messages in the acquisition"),
        "channels": (int, 20, 20, "float64 scalars per message"),
        "buffer-length": (int, 100_000, 100_000, "IOC --buffer-length (holds them all)")}),
    "wide": (scenario_wide, "1000 scalars at 100 Hz: IOC CPU %%", {
        "seconds": (float, 60.0, 15.0, "duration of the stream"),
        "rate": (float, 100.0, 100.0, "message rate, Hz"),
        "channels": (int, 1000, 1000, "float64 scalars per message")}),
    "camera": (scenario_camera, "640x480 bitshuffle_lz4 frames blasted: frames/s vs the disk", {
        "frames": (int, 1000, 300, "frames in the acquisition")}),
    "paced": (scenario_paced, "1 KiB..8 MiB messages at 10 and 100 Hz: writer lag, STOP, CPU", {
        "seconds": (float, 60.0, 10.0, "duration of each case's stream"),
        "rates": (float_list, [10.0, 100.0], [10.0, 100.0], "message rates, Hz, comma-separated"),
        "max-mib-s": (float, 400.0, 400.0, "skip cases whose stream is faster (MiB/s); also "
                      "skipped: faster than the disk's write+fsync rate")}),
    "camera-sustained": (scenario_camera, "camera, 7.2 GB: more than the kernel lets be dirty", {
        "frames": (int, 20_000, 5_000, "frames in the acquisition (the IOC's ring holds them "
                   "all: ~430 kB of RAM each)")}),
    "close": (scenario_close, "time to close a 10,000-message file, minus an fsync", {
        "messages": (int, 10_000, 10_000, "messages in the file"),
        "channels": (int, 20, 20, "float64 scalars per message"),
        "repeat": (int, 3, 1, "files; the median is reported")}),
    "ca-latency": (scenario_ca_latency, "caget round trip while writing at max rate", {
        "seconds": (float, 20.0, 8.0, "duration of the gets"),
        "interval": (float, 0.005, 0.005, "pause between gets, s"),
        "channels": (int, 20, 20, "float64 scalars per message"),
        "buffer-length": (int, 100_000, 100_000, "IOC --buffer-length")}),
    "memory": (scenario_memory, "RSS growth per byte held in a ring of camera frames", {
        "frames": (int, 500, 200, "K: --buffer-length and frames per round"),
        "rounds": (int, 2, 2, "times the ring is filled (2: it has evicted once)")}),
    "long": (scenario_long, "100,000 messages at 3 kHz through a 5000-message ring", {
        "messages": (int, 100_000, 30_000, "messages in the acquisition"),
        "rate": (float, 3000.0, 3000.0, "send rate, Hz"),
        "channels": (int, 20, 20, "float64 scalars per message"),
        "buffer-length": (int, 5000, 5000, "IOC --buffer-length")}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tmp", type=Path, default=None,
                        help="where each scenario's temp dir goes (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (files, logs)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, options) in SCENARIOS.items():
        sub = commands.add_parser(name, help=help_text)
        for option, (kind, default, _, text) in options.items():
            sub.add_argument(f"--{option}", type=kind, default=default,
                             help=f"{text} (default: {default})")
    every = commands.add_parser("all", help="every scenario in turn")
    every.add_argument("--quick", action="store_true",
                       help="smaller defaults (e.g. wide 15 s, long 30,000 messages)")
    every.add_argument("--only", default=",".join(SCENARIOS),
                       help="comma-separated scenarios to run (default: all)")
    for name, (_, _, options) in SCENARIOS.items():
        for option, (kind, default, quick, text) in options.items():
            every.add_argument(f"--{name}-{option}", type=kind, default=None,
                               help=f"{name}: {text} (default: {default}, --quick: {quick})")
    return parser


def scenario_options(args, name: str) -> SimpleNamespace:
    options = SCENARIOS[name][2]
    if args.command != "all":
        return SimpleNamespace(**{o.replace("-", "_"): getattr(args, o.replace("-", "_"))
                                  for o in options})
    values = {}
    for option, (_, default, quick, _) in options.items():
        given = getattr(args, f"{name}-{option}".replace("-", "_"))
        values[option.replace("-", "_")] = (given if given is not None
                                            else quick if args.quick else default)
    return SimpleNamespace(**values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [args.command] if args.command != "all" else [
        n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenarios: {sorted(unknown)}", file=sys.stderr)
        return 2
    ports = ca_setup(len(names) + 1)  # one CA port per IOC
    world_args = dict(ports=ports, tmp_parent=args.tmp, keep=args.keep)
    status = 0
    for name in names:
        opts = scenario_options(args, name)
        opts.scenario = name
        detail(f"--- {name} {vars(opts)}; load average {os.getloadavg()[0]:.1f} "
               f"on {os.cpu_count()} CPUs")
        t = time.monotonic()
        try:
            SCENARIOS[name][0](opts, world_args)
        except ScenarioFailed as error:
            failed(name, str(error))
            status = 1
        except Exception as error:
            traceback.print_exc()
            failed(name, f"{type(error).__name__}: {error}")
            status = 1
        detail(f"--- {name} took {time.monotonic() - t:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
