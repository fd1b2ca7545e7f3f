"""``sfbw-ioc``: command line, wiring of the threads, and the IOC's life cycle."""
from __future__ import annotations

import os

# Read by caproto at import: without it, two PVs at 100 Hz push the server into "high
# load" batching and monitors arrive up to 1 s late (../shared/EPICS.md).
os.environ.setdefault("CAPROTO_SERVER_HIGH_LOAD_TIMEOUT_SEC", "0.001")

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

from caproto.asyncio.server import run  # noqa: E402
from caproto.server import template_arg_parser  # noqa: E402

from . import epicsdb  # noqa: E402
from .acquisition import AcquisitionController  # noqa: E402
from .ioc import Backend, SfbwIOC  # noqa: E402
from .receiver import MalformedCounter, Receiver  # noqa: E402
from .ring import RingBuffer  # noqa: E402
from .simulator import Simulator  # noqa: E402

log = logging.getLogger("sfbw_ioc")

_SIZE_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def byte_size(text: str) -> int:
    """'1G', '512M', '1000000' -> bytes (binary suffixes)."""
    number, suffix = text.strip().upper().rstrip("IB"), ""
    if number and number[-1] in _SIZE_SUFFIXES:
        number, suffix = number[:-1], number[-1]
    try:
        size = int(float(number) * _SIZE_SUFFIXES[suffix])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def build_parser() -> tuple[argparse.ArgumentParser, object]:
    parser, split = template_arg_parser(
        default_prefix="SFBW:", supported_async_libs=["asyncio"],
        desc="SwissFEL bsread buffer and writer: buffers a bsread stream all the time "
             "and writes pulse-id ranges to HDF5 on request over Channel Access.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--stream", help="bsread source to connect to, tcp://host:port")
    source.add_argument("--simulate", action="store_true",
                        help="run a simulated bsread source inside the IOC (demo)")
    parser.add_argument("--mode", choices=("pull", "sub"), default="pull",
                        help="ZeroMQ pattern of the stream (default: pull)")
    parser.add_argument("--simulate-rate", type=float, default=100.0,
                        help="message rate of --simulate in Hz (default: 100)")
    parser.add_argument("--buffer-length", type=positive_int, default=1000,
                        help="messages kept in the ring buffer (default: 1000)")
    parser.add_argument("--buffer-bytes", type=byte_size, default=2**30,
                        help="bytes kept in the ring buffer, e.g. 512M (default: 1G)")
    parser.add_argument("--output-root", type=Path, default=Path.cwd(),
                        help="directory OUTPUT_FILE is relative to and confined in "
                             "(default: the working directory)")
    parser.add_argument("--pulse-rate", type=float, default=100.0,
                        help="machine pulse rate in Hz, to close a file when a silent "
                             "stream must have passed the stop (default: 100)")
    parser.add_argument("--write-db", type=Path, metavar="FILE",
                        help="write the PV list as an EPICS database file and exit")
    return parser, split


def main(argv: Sequence[str] | None = None) -> int:
    parser, split = build_parser()
    args = parser.parse_args(argv)
    if args.write_db:
        args.write_db.write_text(epicsdb.render(SfbwIOC))
        return 0
    if not (args.stream or args.simulate):
        parser.error("give --stream tcp://host:port or --simulate")
    ioc_options, run_options = split(args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("caproto").propagate = False  # split() gave it a handler already
    args.output_root.mkdir(parents=True, exist_ok=True)

    simulator = None
    stream, mode = args.stream, args.mode
    if args.simulate:
        simulator = Simulator("tcp://127.0.0.1:*", rate_hz=args.simulate_rate)
        simulator.start()
        stream, mode = simulator.endpoint, "pull"
        log.info("simulated bsread source on %s", stream)

    ring = RingBuffer(args.buffer_length, args.buffer_bytes)
    malformed = MalformedCounter()
    receiver = Receiver(stream, ring, malformed, mode=mode)
    controller = AcquisitionController(ring, malformed, args.output_root, args.pulse_rate)
    backend = Backend(ring, receiver, malformed, controller, stream)
    ioc = SfbwIOC(backend=backend, **ioc_options)

    receiver.start()
    controller.start_thread()
    _stop_on_sigterm()
    log.info("IOC %s serving %d PVs; files go to %s", args.prefix, len(ioc.pvdb),
             controller.output_root)
    try:
        run(ioc.pvdb, interfaces=run_options["interfaces"],
            log_pv_names=run_options["log_pv_names"])
    finally:
        # A running acquisition is completed with what has arrived before exiting.
        controller.shutdown()
        receiver.stop()
        if simulator is not None:
            simulator.stop()
    log.info("IOC stopped")
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM (systemd, tests) ends the server like Ctrl-C, so files get closed."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
