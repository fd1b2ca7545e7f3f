"""Camera frames on a freshly started IOC against a bare receive-and-write loop.

    python benchmarks/cold.py                       # 500 and 2000 frames, 5 runs each
    python benchmarks/cold.py --frames 500 --runs 3 --no-profile

A sender process of its own (like bsread's reference sender: PUSH, bind, SNDHWM 10, as fast
as it can) sends 640 x 480 uint16 bitshuffle_lz4 frames to, in turn,

- bare: one process, ``recv_multipart`` + ``write_direct_chunk`` into one dataset, fsync;
- cold: an IOC started for this run whose acquisition (START_PULSE_ID, STOP_PULSE_ID as a
  put with callback) is armed before the first frame it ever receives;
- warm: the same after its ring was filled once (evicted images give their memory to new).

Each figure is frames / (first send -> file closed: bare's fsync, the IOC's STOP callback),
the median of the runs, which are interleaved (bare, cold, warm, bare, ...) so that a
passing load hits all three. Printed on stdout, one line each:

    cold-500: figure <IOC> frames/s, limit <bare> frames/s, ratio <IOC / bare>

With py-spy on PATH (--profile, default) one more cold and warm run per size is sampled
(py-spy record --nonblocking, 1 kHz) and the IOC's CPU per frame is broken down by thread
and by stage of the data path (see STAGES): the per-frame CPU budget.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import zmq

from bench import (BARE_CAMERA, BASE_PULSE_ID, CAMERA_SPEC, CameraMessages, World,
                   check_acquisition, detail, result, settle_memory, start_range, wait_done)
from common import ca_setup
from sfbw_ioc.testing.ioc import free_port

SNDHWM = 10  # bsread.sender.Sender's queue_size default
FRAME_BYTES = 361_000  # on the wire, bitshuffle_lz4 (CameraMessages' images)


# ---- the sender: a process of its own -------------------------------------------------

def sender_main(port: int) -> None:
    """Bind, encode, then obey stdin: ``peer`` (wait for a connection), ``send A B``
    (pulses A..B as fast as the socket takes them; answers ``sent T0 T1`` in
    perf_counter, which is CLOCK_MONOTONIC: comparable across processes)."""
    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.setsockopt(zmq.SNDHWM, SNDHWM)
    socket.setsockopt(zmq.LINGER, 5000)
    monitor = socket.get_monitor_socket(zmq.EVENT_ACCEPTED)
    socket.bind(f"tcp://127.0.0.1:{port}")
    stream = CameraMessages()
    print("bound", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "peer":
            monitor.recv_multipart()
            print("peer", flush=True)
        elif command[0] == "send":
            start, stop = int(command[1]), int(command[2])
            t0 = time.perf_counter()
            for pulse_id in range(start, stop + 1):
                socket.send_multipart(stream.frames(pulse_id))
            print(f"sent {t0} {time.perf_counter()}", flush=True)
        elif command[0] == "quit":
            break
    socket.close()


class Sender:
    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.child = subprocess.Popen(
            [sys.executable, __file__, "sender", str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("bound")

    def _ask(self, command: str) -> list[str]:
        self.child.stdin.write(command + "\n")
        self.child.stdin.flush()
        return self.child.stdout.readline().split()

    def _expect(self, word: str) -> list[str]:
        answer = self.child.stdout.readline().split()
        if not answer or answer[0] != word:
            raise RuntimeError(f"sender: {answer!r}, expected {word!r}")
        return answer

    def wait_for_peer(self) -> None:
        if self._ask("peer") != ["peer"]:
            raise RuntimeError("sender lost")

    def send(self, first: int, last: int) -> tuple[float, float]:
        answer = self._ask(f"send {first} {last}")
        return float(answer[1]), float(answer[2])

    def close(self) -> None:
        try:
            self._ask("quit")
        except (BrokenPipeError, OSError):
            pass
        self.child.wait(30)


# ---- the three ways ---------------------------------------------------------------------

BARE_READY = BARE_CAMERA.replace('socket.recv_multipart()\nprint("ready", flush=True)\n', "")
BARE_TIMED = BARE_READY.replace('print("done", flush=True)',
                                'import time; print("done", time.perf_counter(), flush=True)')


def run_bare(tmp: Path, n: int, first: int) -> float:
    path = tmp / "bare.h5"
    sender = Sender()
    child = subprocess.Popen([sys.executable, "-c", BARE_TIMED, sender.address, str(n),
                              str(path)], stdout=subprocess.PIPE, text=True)
    try:
        sender.wait_for_peer()
        t0, _ = sender.send(first, first + n - 1)
        answer = child.stdout.readline().split()
        if answer[:1] != ["done"]:
            raise RuntimeError(f"bare loop: {answer!r}")
        return n / (float(answer[1]) - t0)
    finally:
        child.wait(60)
        sender.close()
        path.unlink(missing_ok=True)


def run_ioc(world: World, n: int, first: int, warm: bool, profile: Path | None) -> float:
    ring_length = 2 * n if warm else n + 50
    sender = Sender()
    spy = None
    try:
        ioc = world.start_ioc(["--buffer-length", str(ring_length),
                               "--buffer-bytes", str(int(ring_length * FRAME_BYTES * 1.2))],
                              stream=sender.address)
        sender.wait_for_peer()
        if warm:
            received = ioc.get("RECEIVED")
            sender.send(first - ring_length, first - 1)
            ioc.wait("RECEIVED", lambda v: v >= received + ring_length, timeout=60)
            settle_memory(ioc)
        name = f"{'warm' if warm else 'cold'}-{n}"
        done = start_range(ioc, f"{name}.h5", first, first + n - 1)
        if profile is not None:
            spy = start_py_spy(ioc.pid, profile)
        cpu0, tasks0 = ioc.cpu(), task_cpu(ioc.pid)
        t0, t_sent = sender.send(first, first + n)  # + 1: past the stop, as a live stream
        t_done = wait_done(done, timeout=300)
        cpu, tasks = ioc.cpu() - cpu0, task_cpu(ioc.pid) - tasks0
        if spy is not None:
            stop_py_spy(spy)
            print(f"{name}: CPU per frame by OS thread name (/proc): " + ", ".join(
                f"{comm} {seconds / n * 1e3:.3f} ms" for comm, seconds in tasks.most_common()),
                flush=True)
        detail(f"{name}: sent in {t_sent - t0:.3f} s, file closed {t_done - t_sent:.3f} s "
               f"after the last send; IOC CPU {cpu / n * 1e3:.2f} ms per frame")
        check_acquisition(ioc, world.out / f"{name}.h5", first, n)
        return n / (t_done - t0)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        sender.close()


# ---- the per-frame budget ---------------------------------------------------------------

def task_cpu(pid: int) -> Counter:
    """CPU seconds of ``pid``'s threads so far, summed by thread name (comm): Python's
    threads are all the process's name, ZeroMQ's are ZMQbg/...; py-spy sees only the
    former."""
    seconds: Counter = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        seconds[comm] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def start_py_spy(pid: int, out: Path) -> subprocess.Popen:
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "1000",
                            "--format", "raw", "--threads", "--full-filenames",
                            "--nonblocking", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # py-spy attaches: its first samples come ~0.1-0.2 s after the start
    return spy


def stop_py_spy(spy: subprocess.Popen) -> None:
    spy.send_signal(2)  # SIGINT: py-spy writes what it has
    spy.wait(30)


# A sample counts for the first stage in this list that one of its frames matches (by
# "function (file" text): specific stages before the catch-alls of their thread.
STAGES = [
    ("close", ("OutputFile.close", "OutputFile._complete", "_close_h5", "publish (")),
    ("flush", ("OutputFile.flush",)),
    ("chunk write", ("_write_chunks", "write_direct_chunk")),
    ("row datasets", ("sfbw_ioc/hdf5/rows.py", "_create_data", "_create_group")),
    ("file (other)", ("sfbw_ioc/hdf5/",)),
    ("bslz4 check", ("corrupt_chunks", "sfbw_ioc/bsread/compression.py")),
    ("decode", ("sfbw_ioc/acquisition/decode.py", "sfbw_ioc/bsread/columns.py",
                "sfbw_ioc/bsread/decode.py")),
    ("hand-over", ("sfbw_ioc/acquisition/",)),
    ("ring store", ("sfbw_ioc/stream/ring.py",)),
    ("pack (one copy)", ("RawMessage.pack",)),
    ("header handling", ("sfbw_ioc/bsread/headers.py", "parse_main_header",
                         "check_structure")),
    ("zmq receive", ("sfbw_ioc/stream/zmqparts.py",)),
    ("memory keeper", ("sfbw_ioc/stream/memory.py",)),
    ("receiver (other)", ("sfbw_ioc/stream/",)),
    ("CA/PVA server", ("caproto", "p4p", "asyncio", "sfbw_ioc/pvs/", "sfbw_ioc/pva/")),
]


# py-spy counts a thread blocked in these as active: they wait for work, not on it.
WAITING = ("Poller.poll", "Condition.wait", "Event.wait", "EpollSelector.select",
           "Queue.get", "time.sleep")


def stage_of(frames: list[str]) -> str:
    if frames and frames[-1].startswith(WAITING):
        return "waiting for work"
    for stage, marks in STAGES:
        if any(mark in frame for frame in frames for mark in marks):
            return stage
    return "other"


def budget(raw: Path, frames: int) -> tuple[Counter, Counter]:
    """ms per frame by stage and by thread, from py-spy's raw samples (1 kHz: 1 ms each);
    the threads' time waiting for work is a stage of its own, left out of the threads'."""
    stages: Counter = Counter()
    threads: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *calls = stack.split(";")
        name = thread.partition(": ")[2] or thread
        stage = stage_of(calls)
        stages[stage] += int(count) / frames
        if stage != "waiting for work":
            threads[name] += int(count) / frames
    return stages, threads


def print_budget(label: str, stages: Counter, threads: Counter) -> None:
    waiting = stages.pop("waiting for work", 0.0)
    total = sum(stages.values())
    print(f"{label}: budget {total:.2f} ms per frame of the IOC's Python threads at work "
          f"(py-spy samples; on CPU or in a system call such as fsync; {waiting:.2f} ms "
          f"more waiting for work):", flush=True)
    for stage, ms in stages.most_common():
        print(f"    {stage:<16} {ms:6.3f} ms  {ms / total * 100:4.0f}%", flush=True)
    print("  by thread: " + ", ".join(f"{name} {ms:.3f}" for name, ms in threads.most_common()),
          flush=True)


# ---- main -------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", default="500,2000", help="comma-separated sizes")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tmp", type=Path, default=None)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    sizes = [int(v) for v in args.frames.split(",")]
    profile = not args.no_profile and shutil.which("py-spy") is not None
    ports = ca_setup(len(sizes) * (2 * args.runs + (2 if profile else 0)) + 1)
    world_args = dict(ports=ports, tmp_parent=args.tmp, keep=False)
    detail(f"{CAMERA_SPEC.name} 640x480 uint16 bitshuffle_lz4, ~{FRAME_BYTES / 1e3:.0f} kB "
           f"on the wire; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    figures: dict[tuple[int, str], list[float]] = {}
    for run in range(args.runs):
        for n in sizes:
            first = BASE_PULSE_ID + 9_000_000 + run * 100_000
            tmp = Path(tempfile.mkdtemp(prefix="sfbw-cold-", dir=args.tmp))
            try:
                figures.setdefault((n, "bare"), []).append(run_bare(tmp, n, first))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for kind in ("cold", "warm"):
                with World(f"{kind}-{n}", **world_args) as world:
                    figures.setdefault((n, kind), []).append(
                        run_ioc(world, n, first, kind == "warm", None))
            detail(f"run {run + 1}, {n} frames: " + ", ".join(
                f"{kind} {figures[(n, kind)][-1]:.0f}" for kind in ("bare", "cold", "warm"))
                + f" frames/s; load {os.getloadavg()[0]:.1f}")
    for n in sizes:
        bare = statistics.median(figures[(n, "bare")])
        for kind in ("cold", "warm"):
            result(f"{kind}-{n}", statistics.median(figures[(n, kind)]), "frames/s", bare,
                   "frames/s (bare loop)", digits=0)
    if profile:
        for n in sizes:
            for kind in ("cold", "warm"):
                with World(f"profile-{kind}-{n}", **world_args) as world:
                    raw = world.tmp / "py-spy.txt"
                    run_ioc(world, n, BASE_PULSE_ID + 9_900_000, kind == "warm", raw)
                    print_budget(f"{kind}-{n}", *budget(raw, n))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["sender"]:
        sender_main(int(sys.argv[2]))
    else:
        sys.exit(main())
