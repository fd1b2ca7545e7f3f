"""What PV Access costs the writer: a paced camera stream (100 Hz, 2 MiB incompressible
uint16 frames, bitshuffle_lz4) written while PVA clients watch, against the same stream
with --no-pva and no PVA clients.

Both runs show the camera in the live view (IMAGE:NAME the camera, IMAGE:RATE 10 Hz), so
that the difference is PVA's own: the NTNDArray frames (plain and as in the ring), the
mirrors of every PV and the clients' traffic. With PVA, 4 clients monitor IMAGE and 20
monitor a handful of scalars each, every client its own p4p context (own connection) in
one client process. Figures per run: writer lag (p50, max), LOST, IOC CPU; then the
ratios with/without. LOST must stay 0 (the run fails otherwise).

    python benchmarks/pva_cost.py --seconds 10
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time

from bench import (BASE_PULSE_ID, PacedFigures, ScenarioFailed, World, detail, paced_case,
                   paced_messages)
from common import ca_setup
from sfbw_ioc.testing.pva import PvaPorts

SIZE, RATE_HZ = "2MiB", 100.0
IMAGE_HZ = 10.0
IMAGE_CLIENTS, SCALAR_CLIENTS = 4, 20
SCALARS = ("LAST_PULSE_ID", "RECEIVED", "WRITTEN", "LOST", "STATE", "MISSING")
CAMERA = "PACED:FRAME"  # IncompressibleCamera's channel


def watch(environment: dict[str, str], prefix: str, stop, counts) -> None:
    """The PVA clients (a child process): count every update until ``stop`` is set."""
    from p4p.client.thread import Context
    contexts = [Context("pva", conf=environment, useenv=False, nt=False)
                for _ in range(IMAGE_CLIENTS + SCALAR_CLIENTS)]
    seen = {"image": 0, "scalar": 0}

    def counter(kind: str):
        def count(value) -> None:
            if not isinstance(value, Exception):
                seen[kind] += 1
        return count

    subscriptions = [context.monitor(prefix + "IMAGE", counter("image"))
                     for context in contexts[:IMAGE_CLIENTS]]
    subscriptions += [context.monitor(prefix + name, counter("scalar"))
                      for context in contexts[IMAGE_CLIENTS:] for name in SCALARS]
    stop.wait()
    for subscription in subscriptions:
        subscription.close()
    for context in contexts:
        context.close()
    counts.put(seen)


def run(pva: bool, seconds: float, world_args: dict, first: int) -> PacedFigures:
    with World("pva" if pva else "no-pva", **world_args) as world:
        ports = PvaPorts()
        ioc = world.start_ioc([] if pva else ["--no-pva"], wrapper=ports.server_wrapper())
        ioc.put("IMAGE:NAME", CAMERA)
        ioc.put("IMAGE:RATE", IMAGE_HZ)
        spawn = multiprocessing.get_context("spawn")
        stop, counts = spawn.Event(), spawn.Queue()
        clients = spawn.Process(target=watch, args=(ports.client_environment(),
                                                    ioc.pv(""), stop, counts))
        if pva:
            clients.start()
            world.children.append(clients)
        began = time.monotonic()
        figures = paced_case(ioc, world.source, world.out, SIZE, RATE_HZ, seconds, first)
        if pva:
            stop.set()
            seen = counts.get(timeout=60)
            clients.join(30)
            elapsed = time.monotonic() - began
            detail(f"PVA clients: {seen['image'] / IMAGE_CLIENTS / elapsed:.1f} IMAGE "
                   f"updates/s per client, {seen['scalar'] / SCALAR_CLIENTS / elapsed:.1f} "
                   f"scalar updates/s per client ({len(SCALARS)} PVs each)")
            if seen["image"] < IMAGE_CLIENTS * IMAGE_HZ * seconds / 2:
                raise ScenarioFailed(f"IMAGE monitors got {seen['image']} updates in "
                                     f"{elapsed:.0f} s")
        if figures.lost:
            raise ScenarioFailed(f"LOST {figures.lost} with{'' if pva else 'out'} PVA")
        return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="length of each paced acquisition (default 20)")
    args = parser.parse_args(argv)
    world_args = dict(ports=ca_setup(3), tmp_parent=None, keep=False)
    paced_messages(SIZE)  # encoded once, before any measurement
    first = BASE_PULSE_ID + 40_000_000
    try:
        without = run(False, args.seconds, world_args, first)
        print(f"without PVA: {without.line()}", flush=True)
        with_pva = run(True, args.seconds, world_args, first + 10_000_000)
        print(f"with PVA ({IMAGE_CLIENTS} IMAGE + {SCALAR_CLIENTS} scalar clients): "
              f"{with_pva.line()}", flush=True)
    except ScenarioFailed as error:
        print(f"pva-cost: FAILED {error}", flush=True)
        return 1
    print(f"pva-cost: IOC CPU ratio {with_pva.cpu_percent / without.cpu_percent:.2f}, "
          f"lag p50 {without.lag_p50_ms:.0f} -> {with_pva.lag_p50_ms:.0f} ms, "
          f"max {without.lag_max_ms:.0f} -> {with_pva.lag_max_ms:.0f} ms, "
          f"LOST {without.lost} / {with_pva.lost}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
