"""sfbw-group latencies: START -> every member WRITING, and stop pulse -> master complete.

For each member count (default 3 and 10): that many bsread sources with common pulse ids
at 100 Hz, one sfbw-ioc per source and the group IOC, all subprocesses on this machine
(sfbw_ioc.testing), driven over Channel Access with pyepics. Each acquisition:
START_NOW on the group, then the time until every member's STATE monitor shows WRITING;
then STOP_PULSE_ID = a pulse 0.3 s ahead as a put with callback, and the time from the
send of the pulse after the stop (the one that closes the files) to the callback (every
member file closed and the master written). One line per case on stdout.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ca_setup  # first: puts the repository on sys.path
from sfbw_ioc.bsread import ChannelSpec
from sfbw_ioc.testing.ioc import IocProcess, poll, unique_prefix
from sfbw_ioc.testing.sources import BsreadSource, CommonPulseStreams

CHANNELS = (ChannelSpec("B:F64", "float64", ()), ChannelSpec("B:WF", "float32", (16,)))
FIRST_PULSE_ID = 30_000_000_000
STOP_AHEAD_PULSES = 30


def run_case(members: int, acquisitions: int, ports: list[int], tmp: Path) -> str:
    import epics
    sources = [BsreadSource() for _ in range(members)]
    streams = CommonPulseStreams(sources, FIRST_PULSE_ID, channels=CHANNELS)
    streams.start()
    iocs: list[IocProcess] = []
    try:
        for index, source in enumerate(sources):
            iocs.append(IocProcess(ports.pop(), unique_prefix(f"BGM{index}-"),
                                   ["--stream", source.address, "--output-root",
                                    str(tmp / f"member{index}"), "--watchdog-seconds", "0"],
                                   tmp / f"member{index}.log"))
        group = IocProcess(ports.pop(), unique_prefix("BG"),
                           [*(a for ioc in iocs for a in ("--member", ioc.prefix)),
                            "--output-root", str(tmp / "group")],
                           tmp / "group.log", module="sfbw_ioc.group.cli")
        iocs.append(group)
        group.wait_for("MEMBERS_CONNECTED", members, timeout=30)
        states = [epics.PV(ioc.pv("STATE"), auto_monitor=True) for ioc in iocs[:-1]]
        poll(lambda: all(pv.wait_for_connection(5) for pv in states), what="member STATE")
        poll(lambda: all(ioc.get("LAST_PULSE_ID") > FIRST_PULSE_ID + 50 for ioc in iocs[:-1]),
             timeout=30, what="every member receiving")
        starts, stops = [], []
        for number in range(acquisitions):
            group.put("OUTPUT_FILE", f"run{number}.h5")
            began = time.monotonic()
            group.put("START_NOW", 1)
            poll(lambda: all(pv.value == 2 for pv in states), timeout=30, interval=0.002,
                 what="every member WRITING")
            starts.append(time.monotonic() - began)
            stop = streams.pulse_id + STOP_AHEAD_PULSES
            group.put("STOP_PULSE_ID", stop, wait=True)
            done = time.monotonic()
            stops.append(done - streams.sent_at[stop + 1])
            if group.get("STATE") != 0:
                raise RuntimeError(f"group not IDLE: {group.text('MESSAGE')}")
        return (f"group-{members}: start->all WRITING median {_ms(starts)} ms "
                f"(max {_ms([max(starts)])}), stop pulse->master complete median "
                f"{_ms(stops)} ms (max {_ms([max(stops)])}), {acquisitions} acquisitions")
    finally:
        streams.halt()
        for ioc in reversed(iocs):
            ioc.stop()
        for source in sources:
            source.close()


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--acquisitions", type=int, default=5)
    args = parser.parse_args(argv)
    ports = ca_setup(sum(args.members) + len(args.members))
    for members in args.members:
        with tempfile.TemporaryDirectory(prefix=f"group{members}-") as tmp:
            print(run_case(members, args.acquisitions, ports, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
