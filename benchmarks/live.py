"""What the live view (LIVEn:*, IMAGE:*) costs the IOC, end to end: a bsread source on a
real ZeroMQ socket, the IOC as a subprocess, pyepics monitors as the panel's viewer.

    python benchmarks/live.py image-cost    # IOC CPU: a 2560x2160 camera, image view on/off
    python benchmarks/live.py writers       # writer throughput and lag, live view on/off
    python benchmarks/live.py all

Each figure is one line on stdout; details (load average, rates, IOC figures) on stderr.
Off and on are measured back to back on the same IOC and the same stream, alternating
(off, on, off, on, ...), so that a change of the machine's load hits both alike.
See benchmarks/README.md ("Live view") for what each figure means.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from bench import (BASE_PULSE_ID, ScenarioFailed, World, check_acquisition, detail, failed,
                   start_range, timestamp_ns, wait_done, warm_up)
from common import CpuMeter, Ioc, ca_setup
from sfbw_ioc.bsread import ChannelSpec, Encoder
from sfbw_ioc.testing.ioc import poll
from sfbw_ioc.testing.sources import PacedSender, PreEncoded

SLOTS = 8
LIVE_HZ = 10.0  # the live view's maximum rate: the worst case
# The viewer's monitors receive IMAGE:ARRAY (up to 4 MiB of float32): libca's default
# array limit is 16 kB. Read by libca at its first call, so set before ca_setup.
MAX_ARRAY_BYTES = str(8 * 2**20)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} CPUs"


def figure(name: str, text: str) -> None:
    print(f"{name}: {text}; {load()}", flush=True)


# ---- the stream -----------------------------------------------------------------------

def noisy_frames(shape: tuple[int, int], count: int, seed: int = 2) -> list[np.ndarray]:
    """uint16 frames of a pedestal with sigma-35 noise: bitshuffle_lz4 keeps ~0.6 of the
    raw size, like a real detector's images (pure noise does not compress at all)."""
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(1000, 35, shape), 0, 65535).astype(np.uint16)
            for _ in range(count)]


@dataclass(frozen=True)
class LiveStream:
    """Pre-encoded messages of a camera plus the channels the slots show."""

    camera: ChannelSpec
    slot_channels: tuple[ChannelSpec, ...]
    block: PreEncoded
    frame_bytes: int

    @classmethod
    def build(cls, name: str, shape: tuple[int, int], slot_channels: int,
              distinct: int = 4) -> LiveStream:
        camera = ChannelSpec(f"{name}:CAMERA", "uint16", shape, compression="bitshuffle_lz4")
        # One waveform among the scalars, when there are slot channels at all.
        slots = tuple(ChannelSpec(f"{name}:SCALAR{i}", "float64", ())
                      for i in range(slot_channels - 1))
        if slot_channels:
            slots += (ChannelSpec(f"{name}:WAVE", "float64", (1024,)),)
        encoder = Encoder()
        messages = []
        for p, image in enumerate(noisy_frames(shape, distinct)):
            ts = timestamp_ns(p)
            values = [(spec, np.full(spec.shape, p + i, dtype=np.float64) if spec.shape
                       else float(p + i), ts) for i, spec in enumerate(slots)]
            messages.append(encoder.encode(p, ts, [(camera, image, ts), *values]))
        return cls(camera, slots, PreEncoded(messages), len(messages[0][2]))

    def frames(self, pulse_id: int) -> list[bytes]:
        return self.block.frames(pulse_id)


# ---- the live view on and off, and a viewer --------------------------------------------

def set_live_view(ioc: Ioc, stream: LiveStream | None) -> None:
    """Every slot and the image on ``stream``'s channels at LIVE_HZ, or all off (None)."""
    names = [spec.name for spec in stream.slot_channels] if stream else []
    ioc.put("LIVE_RATE", LIVE_HZ)
    ioc.put("IMAGE:RATE", LIVE_HZ)
    for slot in range(1, SLOTS + 1):
        ioc.put(f"LIVE{slot}:NAME", names[slot - 1] if slot <= len(names) else "")
    ioc.put("IMAGE:NAME", stream.camera.name if stream else "")


def _watch(pvnames: list[str], counts, ready, stop) -> None:
    """The viewer process: a monitor per PV, counting its updates into ``counts``."""
    import epics

    def counter(index: int):
        def count(**_) -> None:
            with counts.get_lock():
                counts[index] += 1
        return count

    pvs = [epics.PV(name, auto_monitor=True, callback=counter(index))
           for index, name in enumerate(pvnames)]
    if all(pv.wait_for_connection(10) for pv in pvs):
        ready.set()
    stop.wait()


class Viewer:
    """Monitors on IMAGE:ARRAY and every LIVEn:VALUE, as the panel holds them, in a process
    of its own as a Phoebus panel is (in the sender's process its callbacks would slow the
    sender); counts the updates each gets."""

    def __init__(self, ioc: Ioc) -> None:
        context = multiprocessing.get_context("spawn")  # libca is not fork-safe
        self._names = [ioc.pv(name) for name in
                       ("IMAGE:ARRAY", *(f"LIVE{slot}:VALUE" for slot in range(1, SLOTS + 1)))]
        self._counts = context.Array("q", len(self._names))
        self._ready, self._stop = context.Event(), context.Event()
        self._process = context.Process(target=_watch, daemon=True, args=(
            self._names, self._counts, self._ready, self._stop))
        self._process.start()
        if not self._ready.wait(30):
            self.close()
            raise ScenarioFailed("viewer: its monitors did not connect")

    def snapshot(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(self._names, self._counts[:]))

    def close(self) -> None:
        self._stop.set()
        self._process.join(10)


class NoViewer:
    """Nobody watching: the IOC publishes, caproto sends nothing."""

    def snapshot(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def updates(before: dict[str, int], after: dict[str, int], pvname: str) -> int:
    return after.get(pvname, 0) - before.get(pvname, 0)


def alternate(rounds: int, measure_off, measure_on) -> tuple[list, list]:
    """off, on, off, on, ...: ``rounds`` figures of each, measured back to back."""
    off, on = [], []
    for round_ in range(rounds):
        off.append(measure_off(round_))
        on.append(measure_on(round_))
    return off, on


# ---- a. the cost of publishing a big frame ---------------------------------------------

def scenario_image_cost(opts, world_args) -> None:
    shape = (opts.height, opts.width)
    stream = LiveStream.build("LIVEBENCH", shape, slot_channels=0)
    detail(f"camera {opts.width}x{opts.height} uint16, bitshuffle_lz4: "
           f"{stream.frame_bytes / 1e6:.1f} MB per frame on the wire, {opts.camera_hz:g} Hz "
           f"= {stream.frame_bytes * opts.camera_hz / 1e6:.0f} MB/s")
    with World("image-cost", **world_args) as world:
        ioc = world.start_ioc(["--buffer-bytes", opts.buffer_bytes])
        sender = PacedSender(world.source, BASE_PULSE_ID, rate_hz=opts.camera_hz,
                             frames=stream.frames)
        sender.start()
        viewer = Viewer(ioc)  # counts the frames published
        try:
            # Until the ring has wrapped: new frames then reuse evicted frames' memory, as
            # in an IOC that has buffered for days (first-touch pages cost more here).
            t = time.monotonic()
            poll(lambda: ioc.get("RECEIVED") > ioc.get("BUFFER_COUNT") + 2 * opts.camera_hz,
                 timeout=120, interval=0.5, what="the ring to wrap")
            detail(f"ring wrapped after {time.monotonic() - t:.0f} s")

            def measure(view_on: bool, round_: int) -> tuple[float, float, float]:
                set_live_view(ioc, stream if view_on else None)  # in effect when put
                meter, sent0, seen0 = CpuMeter(ioc.pid), len(sender.sent), viewer.snapshot()
                time.sleep(opts.seconds)  # a measurement window, not synchronisation
                cpu, seconds = meter.percent(), opts.seconds
                camera_hz = (len(sender.sent) - sent0) / seconds
                published = updates(seen0, viewer.snapshot(), ioc.pv("IMAGE:ARRAY")) / seconds
                detail(f"round {round_} image view {'on ' if view_on else 'off'}: IOC "
                       f"{cpu:.1f} % of one core, camera {camera_hz:.1f} Hz, IMAGE:ARRAY "
                       f"{published:.1f} updates/s; {load()}")
                return cpu, camera_hz, published

            off, on = alternate(opts.rounds, lambda r: measure(False, r),
                                lambda r: measure(True, r))
        finally:
            viewer.close()
            sender.finish()
    if any(p > LIVE_HZ * 1.1 for _, _, p in on):
        raise ScenarioFailed(f"IMAGE:ARRAY updated faster than IMAGE:RATE {LIVE_HZ:g}: {on}")
    if any(p for _, _, p in off):
        raise ScenarioFailed(f"IMAGE:ARRAY updated with the image view off: {off}")
    cpu_off = statistics.median(c for c, _, _ in off)
    cpu_on = statistics.median(c for c, _, _ in on)
    rate_on = statistics.median(p for _, _, p in on)
    size = f"{opts.width}x{opts.height}"
    figure("image-cost-off", f"IOC CPU {cpu_off:.1f} % of one core, {size} camera at "
           f"{opts.camera_hz:g} Hz, image view off (median of {opts.rounds})")
    figure("image-cost-on", f"IOC CPU {cpu_on:.1f} % of one core, same stream, IMAGE:RATE "
           f"{LIVE_HZ:g}: {rate_on:.1f} frames/s published (median of {opts.rounds})")
    figure("image-cost-per-frame", f"{(cpu_on - cpu_off) * 10 / rate_on:.1f} ms of IOC CPU "
           f"per published frame (decompress, bin, publish to one viewer)")


# ---- b. the writers with the live view at its maximum rate -----------------------------

def scenario_writers(opts, world_args) -> None:
    stream = LiveStream.build("LIVEBENCH", (480, 640), slot_channels=SLOTS)
    n = opts.frames
    ring_length = n + 100
    with World("writers", **world_args) as world:
        ioc = world.start_ioc(["--buffer-length", str(ring_length), "--buffer-bytes",
                               str(int(ring_length * stream.frame_bytes * 1.3))])
        send = world.source.send_frames
        next_pulse = [BASE_PULSE_ID + 5_000_000]
        viewer = Viewer(ioc) if opts.viewer else NoViewer()

        def take(count: int) -> int:
            first = next_pulse[0]
            next_pulse[0] += count
            return first

        try:
            t = time.perf_counter()
            warm_up(ioc, lambda p: send(stream.frames(p)), take(ring_length) + ring_length,
                    count=ring_length)
            detail(f"{640}x{480} camera + {SLOTS} slot channels, {stream.frame_bytes / 1e3:.0f}"
                   f" kB per frame; ring filled once ({ring_length} messages, "
                   f"{time.perf_counter() - t:.1f} s)")

            def fast(view_on: bool, round_: int) -> float:
                set_live_view(ioc, stream if view_on else None)
                first = take(n + 1)
                name = f"fast-{round_}-{'on' if view_on else 'off'}.h5"
                done = start_range(ioc, name, first, first + n - 1)
                seen0, cpu0 = viewer.snapshot(), ioc.cpu()
                t0 = time.perf_counter()
                for pulse_id in range(first, first + n + 1):
                    send(stream.frames(pulse_id))
                wall = wait_done(done, timeout=300) - t0
                cpu_ms = (ioc.cpu() - cpu0) / n * 1e3
                check_acquisition(ioc, world.out / name, first, n)
                (world.out / name).unlink()
                images = updates(seen0, viewer.snapshot(), ioc.pv("IMAGE:ARRAY"))
                detail(f"round {round_} live view {'on ' if view_on else 'off'}: {n} frames in "
                       f"{wall:.2f} s = {n / wall:.0f} frames/s, IOC CPU {cpu_ms:.2f} ms per "
                       f"frame; the viewer got {images} images meanwhile; {load()}")
                return n / wall

            def paced(view_on: bool, round_: int) -> float:
                set_live_view(ioc, stream if view_on else None)
                first = take(opts.paced + 1)
                name = f"paced-{round_}-{'on' if view_on else 'off'}.h5"
                done = start_range(ioc, name, first, first + opts.paced - 1)
                # The stop pulse itself closes the file: nothing is sent past it.
                sender = PacedSender(world.source, first, rate_hz=opts.rate,
                                     frames=stream.frames, count=opts.paced)
                sender.start()
                t_done = wait_done(done, timeout=opts.paced / opts.rate + 60)
                sender.join(10)
                # sent_at is time.monotonic(); wait_done's clock is perf_counter.
                lag = t_done - (sender.sent_at[-1] - time.monotonic() + time.perf_counter())
                check_acquisition(ioc, world.out / name, first, opts.paced)
                (world.out / name).unlink()
                detail(f"round {round_} live view {'on ' if view_on else 'off'}: "
                       f"{opts.paced} messages at {opts.rate:g} Hz, stop pulse sent -> file "
                       f"closed {lag * 1e3:.0f} ms; {load()}")
                return lag

            fast_off, fast_on = alternate(opts.rounds, lambda r: fast(False, r),
                                          lambda r: fast(True, r))
            lag_off, lag_on = alternate(opts.rounds, lambda r: paced(False, r),
                                        lambda r: paced(True, r))
        finally:
            viewer.close()
    rate_off, rate_on = statistics.median(fast_off), statistics.median(fast_on)
    lag_off_ms, lag_on_ms = statistics.median(lag_off) * 1e3, statistics.median(lag_on) * 1e3
    target = "within 10 %" if rate_on >= 0.9 * rate_off else "NOT within 10 %"
    figure("writers-camera-off", f"{rate_off:.0f} frames/s, acquisition of {n} frames as fast "
           f"as they come, live view off (median of {opts.rounds}: "
           f"{', '.join(f'{r:.0f}' for r in fast_off)})")
    figure("writers-camera-on", f"{rate_on:.0f} frames/s with the live view at {LIVE_HZ:g} Hz "
           f"({SLOTS} slots, IMAGE:RATE {LIVE_HZ:g}), ratio {rate_on / rate_off:.2f} of off, "
           f"{target} (median of {opts.rounds}: {', '.join(f'{r:.0f}' for r in fast_on)})")
    figure("writers-lag-off", f"{lag_off_ms:.0f} ms from the stop pulse sent to the "
           f"file closed, {opts.paced} messages paced at {opts.rate:g} Hz, live view off "
           f"(median of {opts.rounds})")
    figure("writers-lag-on", f"{lag_on_ms:.0f} ms with the live view at {LIVE_HZ:g} Hz, "
           f"{lag_on_ms - lag_off_ms:+.0f} ms against off (median of {opts.rounds})")


# ---- command line ---------------------------------------------------------------------

SCENARIOS = {"image-cost": scenario_image_cost, "writers": scenario_writers}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--rounds", type=int, default=5,
                        help="off/on pairs measured per figure (default: 5)")
    parser.add_argument("--no-viewer", dest="viewer", action="store_false",
                        help="writers: no monitors on the live view's PVs (default: a viewer "
                             "process monitors IMAGE:ARRAY and every LIVEn:VALUE)")
    parser.add_argument("--tmp", default=None, help="where the temp dirs go")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs")
    image = parser.add_argument_group("image-cost")
    image.add_argument("--width", type=int, default=2560)
    image.add_argument("--height", type=int, default=2160)
    image.add_argument("--camera-hz", type=float, default=25.0,
                       help="the camera stream's rate (default: 25)")
    image.add_argument("--seconds", type=float, default=10.0,
                       help="CPU measurement window per round and view state (default: 10)")
    image.add_argument("--buffer-bytes", default="512M", help="IOC --buffer-bytes")
    writers = parser.add_argument_group("writers")
    writers.add_argument("--frames", type=int, default=2000,
                         help="frames of each as-fast-as-they-come acquisition (default: 2000)")
    writers.add_argument("--paced", type=int, default=300,
                         help="messages of each paced acquisition (default: 300)")
    writers.add_argument("--rate", type=float, default=100.0,
                         help="the paced stream's rate, Hz (default: 100)")
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    names = list(SCENARIOS) if opts.scenario == "all" else [opts.scenario]
    os.environ["EPICS_CA_MAX_ARRAY_BYTES"] = MAX_ARRAY_BYTES
    world_args = dict(ports=ca_setup(len(names)), tmp_parent=opts.tmp, keep=opts.keep)
    status = 0
    for name in names:
        detail(f"--- {name}; {load()}")
        try:
            SCENARIOS[name](opts, world_args)
        except ScenarioFailed as error:  # anything else ends the run with its traceback
            failed(name, str(error))
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
