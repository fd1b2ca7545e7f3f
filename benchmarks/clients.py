"""Many and slow Channel Access clients during a paced camera acquisition (issue 26.2).

    python benchmarks/clients.py                  # a short run
    python benchmarks/clients.py --minutes 30     # the report's run

A 100 Hz stream of incompressible 2 MiB frames (``--shape``) runs throughout; the IOC
writes it in acquisitions of ``--acquisition-seconds`` (exact pulse ranges, each file
checked and deleted), with a few seconds IDLE between them. First without clients (the
baseline), then with the mix, every client a process of its own on 127.0.0.1:

- ``--monitors`` camonitor (EPICS' C client) of STATE, WRITTEN, LAST_PULSE_ID, MESSAGE;
- ``--image-monitors`` pyepics monitors of IMAGE:ARRAY, IMAGE:RATE at 10 Hz;
- one pyepics monitor of IMAGE:ARRAY stopped (SIGSTOP) after its first frame: it never
  reads its socket again;
- ``--connectors`` clients connecting, creating a channel and disconnecting in a loop;

and a caget loop (a process of its own, like bench.py's) timing fresh reads all along.
Prints the caget p50/p99 IDLE and WRITING with and without the clients, LOST, the files'
exactness, the IOC's RSS over time and the STATE transitions each monitor saw; exits 1
when a file was not exact, anything was LOST, a monitor missed a transition or the RSS
grew past ``--rss-limit-mib``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import MiB, Ioc, ca_setup, rss_bytes
from sfbw_ioc.testing.ioc import EPICS_BIN, poll
from sfbw_ioc.testing.sources import BsreadSource, IncompressibleCamera, PacedSender

FIRST_PULSE_ID = 20_000_000_000
RATE_HZ = 100.0
IDLE_S = 4.0  # between acquisitions: the IDLE samples of the caget loop
LEAD_PULSES = 50  # an acquisition starts this far ahead of the stream
STATES_OF_ONE = ["WAITING", "WRITING", "CLOSING", "IDLE"]


def detail(text: str) -> None:
    print("  " + text, file=sys.stderr, flush=True)


# ---- client processes -----------------------------------------------------------------

def caget_times(pv: str, out: str, interval: float) -> None:
    """Child: fresh reads of ``pv`` until killed, one 'monotonic latency' line each."""
    import epics
    channel = epics.PV(pv, auto_monitor=False)
    channel.wait_for_connection(10)
    with open(out, "w", buffering=1) as lines:
        while True:
            t = time.perf_counter()
            value = channel.get(use_monitor=False, timeout=5)
            latency = time.perf_counter() - t if value is not None else float("inf")
            lines.write(f"{time.monotonic():.4f} {latency:.6f}\n")
            time.sleep(interval)


def image_monitor(pv: str, out: str) -> None:
    """Child: a monitor of the image; writes the number of frames received so far."""
    import epics
    frames = [0]

    def count(**_) -> None:
        frames[0] += 1
        Path(out).write_text(str(frames[0]))
    epics.PV(pv, auto_monitor=True, callback=count, form="native")
    while True:
        time.sleep(60)  # the callbacks do the work


def connector(host_port: tuple[str, int], pv: str, interval: float) -> None:
    """Child: connect, create a channel to ``pv``, disconnect, again and again (caproto's
    sans-I/O client commands on a plain socket)."""
    import caproto as ca
    while True:
        circuit = ca.VirtualCircuit(ca.CLIENT, host_port, 0)
        with socket.create_connection(host_port, timeout=5) as tcp:
            commands = [ca.VersionRequest(0, ca.DEFAULT_PROTOCOL_VERSION),
                        ca.HostNameRequest("localhost"), ca.ClientNameRequest("connector"),
                        ca.CreateChanRequest(pv, 1, ca.DEFAULT_PROTOCOL_VERSION)]
            tcp.sendall(b"".join(circuit.send(*commands)))
            created = False
            while not created:
                data = tcp.recv(65536)
                if not data:
                    break
                commands, _ = circuit.recv(data)
                created = any(isinstance(c, ca.CreateChanResponse) for c in commands)
        time.sleep(interval)


@dataclass
class Clients:
    """The client processes and where they write."""

    tmp: Path
    camonitors: list[subprocess.Popen] = field(default_factory=list)
    children: list[multiprocessing.Process] = field(default_factory=list)
    stopped: multiprocessing.Process | None = None

    def start(self, ioc: Ioc, opts, ctx) -> None:
        env = dict(os.environ)
        scalars = [ioc.pv(n) for n in ("STATE", "WRITTEN", "LAST_PULSE_ID", "MESSAGE")]
        for index in range(opts.monitors):
            with open(self.tmp / f"camonitor-{index}.txt", "wb") as out:
                self.camonitors.append(subprocess.Popen(
                    # Line-buffered: a terminated camonitor loses no lines.
                    ["stdbuf", "-oL", str(EPICS_BIN / "camonitor"), "-S", *scalars], stdout=out,
                    stderr=subprocess.STDOUT, env=env))
        for index in range(opts.image_monitors):
            self._child(ctx, image_monitor, ioc.pv("IMAGE:ARRAY"),
                        str(self.tmp / f"image-{index}.txt"))
        slow_out = self.tmp / "image-stopped.txt"
        self.stopped = self._child(ctx, image_monitor, ioc.pv("IMAGE:ARRAY"), str(slow_out))
        address = ("127.0.0.1", ioc.proc.port)
        for _ in range(opts.connectors):
            self._child(ctx, connector, address, ioc.pv("STATE"), opts.connect_interval)
        poll(lambda: all(self._monitor_started(i) for i in range(opts.monitors)), timeout=60,
             what="every camonitor's first STATE")
        poll(slow_out.exists, timeout=60, what="the slow client's first frame")
        os.kill(self.stopped.pid, signal.SIGSTOP)

    def _child(self, ctx, target, *args) -> multiprocessing.Process:
        child = ctx.Process(target=target, args=args, daemon=True)
        child.start()
        self.children.append(child)
        return child

    def _monitor_started(self, index: int) -> bool:
        return bool(monitor_states(self.tmp / f"camonitor-{index}.txt"))

    def states(self) -> list[list[str]]:
        return [monitor_states(self.tmp / f"camonitor-{i}.txt")
                for i in range(len(self.camonitors))]

    def image_frames(self) -> list[int]:
        paths = sorted(self.tmp.glob("image-[0-9]*.txt"))
        return [int(path.read_text() or 0) for path in paths]

    def stop(self) -> None:
        if self.stopped is not None and self.stopped.is_alive():
            os.kill(self.stopped.pid, signal.SIGCONT)
        for process in self.camonitors:
            process.terminate()
            process.wait(10)
        for child in self.children:
            child.terminate()
            child.join(10)


def monitor_states(path: Path) -> list[str]:
    """The STATE values a camonitor printed, in order ('PV date time value ...')."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return [line.split()[3] for line in lines
            if line.split()[:1] and line.split()[0].endswith(":STATE") and len(line.split()) > 3]


# ---- acquisitions ---------------------------------------------------------------------

@dataclass
class Phase:
    """Windows of monotonic time: IDLE and WRITING, for the caget loop's samples."""

    idle: list[tuple[float, float]] = field(default_factory=list)
    writing: list[tuple[float, float]] = field(default_factory=list)


def acquire(ioc: Ioc, sender: PacedSender, camera: IncompressibleCamera, out: Path,
            name: str, seconds: float, phase: Phase) -> None:
    """One acquisition of an exact pulse range; the file checked and deleted.

    Raises AssertionError when LOST is not 0 or the file is not exactly the range."""
    first = sender.next_pulse_id + LEAD_PULSES
    last = first + round(seconds * RATE_HZ) - 1
    ioc.put("OUTPUT_FILE", name)
    ioc.put("START_PULSE_ID", first)
    t0 = time.monotonic() + LEAD_PULSES / RATE_HZ
    # The put completes when the file is closed.
    ioc.put("STOP_PULSE_ID", last, timeout=seconds + 120)
    phase.writing.append((t0, time.monotonic()))
    lost, written = ioc.get("LOST"), ioc.get("WRITTEN")
    assert lost == 0, f"{name}: LOST {lost:.0f}"
    assert written == last - first + 1, f"{name}: WRITTEN {written:.0f} of {last - first + 1}"
    check_file(out / name, first, last, camera)
    (out / name).unlink()


def check_file(path: Path, first: int, last: int, camera: IncompressibleCamera) -> None:
    """Exactly pulses first..last, every frame present, the first and last as sent."""
    import h5py
    import hdf5plugin  # noqa: F401  (bitshuffle filter)
    with h5py.File(path, "r") as f:
        group = f["data"][camera.spec.name]
        pulse_ids = group["pulse_id"][:]
        assert np.array_equal(pulse_ids, np.arange(first, last + 1)), \
            f"{path.name}: pulse ids {pulse_ids[:1]}..{pulse_ids[-1:]} not {first}..{last}"
        assert group["is_data_present"][:].all(), f"{path.name}: frames absent"
        for row, pulse_id in ((0, first), (-1, last)):
            assert np.array_equal(group["data"][row], camera.image_for(pulse_id)), \
                f"{path.name}: frame of pulse {pulse_id} differs"


def run_phase(ioc: Ioc, sender: PacedSender, camera: IncompressibleCamera, out: Path,
              seconds: float, acquisition_s: float, tag: str, rss: list[tuple[float, int]],
              t_start: float) -> Phase:
    phase = Phase()
    deadline = time.monotonic() + seconds
    index = 0
    while time.monotonic() < deadline:
        t_idle = time.monotonic()
        time.sleep(IDLE_S)  # IDLE time for the caget loop to sample
        phase.idle.append((t_idle, time.monotonic()))
        acquire(ioc, sender, camera, out, f"{tag}-{index}.h5",
                min(acquisition_s, max(1.0, deadline - time.monotonic())), phase)
        rss.append((time.monotonic() - t_start, ioc.rss()))
        detail(f"{tag} #{index}: exact, LOST 0; IOC RSS {ioc.rss() / MiB:.0f} MiB; "
               f"load {os.getloadavg()[0]:.1f}")
        index += 1
    return phase


def latencies_in(samples: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    if not len(samples):
        return samples
    inside = np.zeros(len(samples), dtype=bool)
    for t0, t1 in windows:
        inside |= (samples[:, 0] >= t0) & (samples[:, 0] < t1)
    return samples[inside, 1] * 1e3


def report_latency(what: str, ms: np.ndarray) -> tuple[float, float]:
    p50, p99 = (np.percentile(ms, 50), np.percentile(ms, 99)) if len(ms) else (np.nan,) * 2
    print(f"caget {what}: {len(ms)} reads, p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
          f"max {ms.max() if len(ms) else np.nan:.1f} ms", flush=True)
    return p50, p99


# ---- main -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0,
                        help="with the clients (default 1; 30 for the report)")
    parser.add_argument("--baseline-seconds", type=float, default=30.0,
                        help="without clients, before")
    parser.add_argument("--acquisition-seconds", type=float, default=20.0)
    parser.add_argument("--shape", type=int, nargs=2, default=(1024, 1024),
                        help="uint16 frame (default 1024 1024: 2 MiB)")
    parser.add_argument("--monitors", type=int, default=50)
    parser.add_argument("--image-monitors", type=int, default=5)
    parser.add_argument("--connectors", type=int, default=20)
    parser.add_argument("--connect-interval", type=float, default=0.2,
                        help="each connector's pause between connections, s")
    parser.add_argument("--caget-interval", type=float, default=0.01)
    parser.add_argument("--rss-limit-mib", type=float, default=2500.0,
                        help="fail when the IOC's RSS exceeds this (the ring is 1 GiB)")
    parser.add_argument("--out", type=Path, default=None, help="directory (default: temp)")
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    detail(f"load average at start: {open('/proc/loadavg').read().strip()}")
    ctx = multiprocessing.get_context("spawn")
    (port,) = ca_setup(1)
    tmp = Path(tempfile.mkdtemp(prefix="sfbw-clients-", dir=opts.out))
    out = tmp / "out"
    out.mkdir()
    camera = IncompressibleCamera(tuple(opts.shape))
    source = BsreadSource()
    ioc = Ioc(port, ["--stream", source.address, "--output-root", str(out)], tmp / "ioc.log")
    sender = PacedSender(source, FIRST_PULSE_ID, rate_hz=RATE_HZ, frames=camera.frames)
    clients = Clients(tmp)
    caget = ctx.Process(target=caget_times, args=(ioc.pv("RECEIVED"), str(tmp / "caget.txt"),
                                                  opts.caget_interval), daemon=True)
    failures: list[str] = []
    rss: list[tuple[float, int]] = []
    phase_of: dict[str, Phase] = {}  # the phases that ran, for their latencies
    t_start = time.monotonic()
    try:
        sender.start()
        ioc.put("IMAGE:NAME", camera.spec.name)
        ioc.put("IMAGE:RATE", 10.0)
        caget.start()
        poll(lambda: (tmp / "caget.txt").exists(), timeout=30, what="the caget loop")
        alone = phase_of["alone"] = run_phase(ioc, sender, camera, out, opts.baseline_seconds,
                                              opts.acquisition_seconds, "alone", rss, t_start)
        clients.start(ioc, opts, ctx)
        t_clients = time.monotonic()
        crowd = phase_of["crowd"] = run_phase(ioc, sender, camera, out, opts.minutes * 60,
                                              opts.acquisition_seconds, "clients", rss, t_start)
        detail(f"with clients for {(time.monotonic() - t_clients) / 60:.1f} min")
        states = clients.states()
        frames = clients.image_frames()
        expected = ["IDLE"] + STATES_OF_ONE * len(crowd.writing)
        short = [i for i, seen in enumerate(states) if seen[-len(expected):] != expected]
        print(f"STATE transitions: {len(crowd.writing)} acquisitions, {len(expected) - 1} "
              f"transitions each monitor should see; {len(states) - len(short)} of "
              f"{len(states)} monitors saw every one", flush=True)
        if short:
            failures.append(f"monitors {short[:10]} missed STATE transitions "
                            f"(first: {states[short[0]][-12:]})")
        print(f"IMAGE:ARRAY frames per monitor: {frames} (the stopped one: "
              f"{(tmp / 'image-stopped.txt').read_text()})", flush=True)
        print(f"LOST {ioc.get('LOST'):.0f}; every file exact: "
              f"{len(alone.writing) + len(crowd.writing)} acquisitions", flush=True)
    except AssertionError as error:
        failures.append(str(error))
    finally:
        caget.terminate()
        caget.join(10)
        clients.stop()
        sender.finish()
        alive = ioc.alive()
        rc = ioc.stop()
        source.close()
    if not alive or rc != 0:
        failures.append(f"IOC exit status {rc}: {ioc.log()[-2000:]}")
    samples = np.loadtxt(tmp / "caget.txt", ndmin=2)
    phases = {"without clients": phase_of.get("alone"), "with clients": phase_of.get("crowd")}
    for who, phase in phases.items():
        if phase is None:
            continue  # failed before it began
        report_latency(f"{who}, IDLE", latencies_in(samples, phase.idle))
        _, p99 = report_latency(f"{who}, WRITING", latencies_in(samples, phase.writing))
        if not p99 < 20.0:
            failures.append(f"caget p99 {p99:.1f} ms {who}, WRITING (limit 20 ms)")
    peak = max((r for _, r in rss), default=0)
    print("IOC RSS (s: MiB): " + ", ".join(f"{t:.0f}: {r / MiB:.0f}" for t, r in rss), flush=True)
    if peak > opts.rss_limit_mib * MiB:
        failures.append(f"IOC RSS peaked at {peak / MiB:.0f} MiB")
    detail(f"load average at end: {open('/proc/loadavg').read().strip()}; files in {tmp}")
    for failure in failures:
        print(f"FAILED: {failure}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
