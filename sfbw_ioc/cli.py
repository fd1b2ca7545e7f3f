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
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import asyncio  # noqa: E402

import zmq  # noqa: E402

from caproto import AccessRights  # noqa: E402
from caproto.asyncio.server import Context  # noqa: E402
from caproto.server import template_arg_parser  # noqa: E402

from . import access, epicsdb, live, memory, ownership  # noqa: E402
from .acquisition import AcquisitionController  # noqa: E402
from .forward import Forwarder  # noqa: E402
from .ioc import ALIASED_WRITER, DEFAULT_WRITERS, Backend, check_stream_address, ioc_class  # noqa: E402
from .receiver import MalformedCounter, Receiver  # noqa: E402
from .rest import RestApi  # noqa: E402
from .ring import RingBuffer  # noqa: E402
from .simulator import Simulator  # noqa: E402
from .caprobe import PROBE_HOST, PROBE_USER, CaProbe, probe_address  # noqa: E402
from .watchdog import Watchdog  # noqa: E402

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


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def image_pixels(text: str) -> int:
    value = positive_int(text)
    if value > live.IMAGE_ARRAY_LENGTH:
        raise argparse.ArgumentTypeError(
            f"at most {live.IMAGE_ARRAY_LENGTH} (IMAGE:ARRAY's length): {text!r}")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return value


def file_mode(text: str) -> int:
    return _mode(text, ownership.FILE_MODE_BITS)


def dir_mode(text: str) -> int:
    return _mode(text, ownership.DIR_MODE_BITS)


def _mode(text: str, allowed: int) -> int:
    try:
        return ownership.parse_mode(text, allowed)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not an octal mode within {allowed:o}: {text!r} "
                                         f"({error})") from None


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
    parser.add_argument("--file-mode", type=file_mode, default=ownership.DEFAULT_FILE_MODE,
                        metavar="OCTAL",
                        help="mode of the files written (default: "
                             f"{ownership.DEFAULT_FILE_MODE:04o})")
    parser.add_argument("--dir-mode", type=dir_mode, default=ownership.DEFAULT_DIR_MODE,
                        metavar="OCTAL",
                        help="mode of the directories the IOC creates for them, e.g. 2770 "
                             f"for a group-shared tree (default: {ownership.DEFAULT_DIR_MODE:04o})")
    parser.add_argument("--pulse-rate", type=float, default=100.0,
                        help="machine pulse rate in Hz, to close a file when a silent "
                             "stream must have passed the stop (default: 100)")
    parser.add_argument("--watchdog-seconds", type=non_negative_float, default=10.0,
                        help="exit with status 70 when Channel Access has not answered "
                             "for this long (the IOC reads its own STATE as a new client "
                             "twice a second), so that a supervisor restarts it "
                             "(0: off; default: 10)")
    parser.add_argument("--access-security", type=Path, metavar="FILE",
                        help="EPICS access security file (ACF): control PVs are in ASG "
                             "CONTROL, all others in DEFAULT (default: everybody may "
                             "write)")
    parser.add_argument("--image-max-pixels", type=image_pixels,
                        default=live.DEFAULT_IMAGE_MAX_PIXELS,
                        help="pixels IMAGE:ARRAY may have; a larger frame is binned by the "
                             "smallest integer factor that fits (default and most: "
                             f"{live.IMAGE_ARRAY_LENGTH}, the PV's length)")
    parser.add_argument("--rest-port", type=port_number, metavar="PORT",
                        help="serve the predecessor's (sf_bsread_writer's) REST API on "
                             "this port; it has no access control (default: off)")
    parser.add_argument("--rest-host", default="127.0.0.1", metavar="HOST",
                        help="address the REST API listens on (default: 127.0.0.1)")
    parser.add_argument("--writers", type=positive_int, default=DEFAULT_WRITERS,
                        help="independent writers sharing the buffer, with their PVs "
                             "under W1:, W2:, ...; writer 1's also without W1: "
                             f"(default: {DEFAULT_WRITERS})")
    parser.add_argument("--output-port", type=port_number, metavar="PORT",
                        help="re-publish every intact message received, parts unchanged, "
                             "on this port (default: off)")
    parser.add_argument("--output-mode", choices=("pub", "push"), default="pub",
                        help="ZeroMQ pattern of --output-port (default: pub)")
    parser.add_argument("--write-db", type=Path, metavar="FILE",
                        help="write the PV list as an EPICS database file and exit")
    return parser, split


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("caproto").propagate = False  # split() gave it a handler already


def prepare_output_root(output_root: Path) -> bool:
    """Create the output root; False (logged CRITICAL) when it cannot be used."""
    try:
        output_root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.critical("cannot use the output root %s: %s", output_root, error)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser, split = build_parser()
    args = parser.parse_args(argv)
    if args.write_db:
        args.write_db.write_text(epicsdb.render(ioc_class(args.writers), aliased=ALIASED_WRITER))
        return 0
    if not (args.stream or args.simulate):
        parser.error("give --stream tcp://host:port or --simulate")
    if args.stream:
        try:
            check_stream_address(args.stream)
        except ValueError as error:
            parser.error(str(error))
    ioc_options, run_options = split(args)
    configure_logging(args.quiet)
    if not prepare_output_root(args.output_root):
        return 1
    try:
        access_config = _access_security(args)
    except (OSError, ValueError) as error:
        log.critical("cannot use the access security file %s: %s", args.access_security,
                     error)
        return 1

    simulator = None
    stream, mode = args.stream, args.mode
    if args.simulate:
        simulator = Simulator("tcp://127.0.0.1:*", rate_hz=args.simulate_rate)
        simulator.start()
        stream, mode = simulator.endpoint, "pull"
        log.info("simulated bsread source on %s", stream)

    memory.tune_allocator()
    ring = RingBuffer(args.buffer_length, args.buffer_bytes)
    trimmer = memory.HeapTrimmer(ring=ring)
    malformed = MalformedCounter()
    try:
        forwarder = (Forwarder(args.output_port, args.output_mode)
                     if args.output_port else None)
    except zmq.ZMQError as error:
        log.critical("cannot re-publish on port %s: %s", args.output_port, error)
        return 1
    receiver = Receiver(stream, ring, malformed, mode=mode, forward=forwarder)
    owner = ownership.Owner(file_mode=args.file_mode, dir_mode=args.dir_mode)
    controllers = tuple(AcquisitionController(ring, malformed, args.output_root, args.pulse_rate,
                                              owner)
                        for _ in range(args.writers))
    backend = Backend(ring, receiver, malformed, controllers, args.image_max_pixels, forwarder)
    ioc = ioc_class(args.writers)(backend=backend, **ioc_options)
    if access_config is not None:
        access.apply(access_config, ioc.pvdb)

    receiver.start()
    for controller in controllers:
        controller.start_thread()
    trimmer.start()
    stop_requested = _stop_on_signals()
    watchdog = Watchdog(args.watchdog_seconds) if args.watchdog_seconds else None
    probe: CaProbe | None = None

    async def serve() -> None:
        server = Context(ioc.pvdb, run_options["interfaces"])  # in the loop it runs in

        async def start_probe(async_lib) -> None:
            """The server is listening now: its port is known (caproto takes another
            when the configured one is in use)."""
            nonlocal probe
            assert watchdog is not None
            probe = CaProbe(probe_address(next(iter(server.tcp_sockets)), server.port),
                            ioc.first_writer.STATE.pvname, watchdog.beat)
            probe.start()

        rest = RestApi(ioc.first_writer, controllers[0]) if args.rest_port else None
        if rest is not None:
            try:
                await rest.start(args.rest_host, args.rest_port)
            except OSError as error:
                raise RestUnavailable(f"cannot serve the REST API on {args.rest_host}:"
                                      f"{args.rest_port}: {error}") from error
        try:
            await server.run(log_pv_names=run_options["log_pv_names"],
                             startup_hook=start_probe if watchdog is not None else None)
        finally:
            if rest is not None:
                await rest.stop()

    log.info("IOC %s serving %d PVs; files go to %s", args.prefix, len(ioc.pvdb),
             controllers[0].output_root)
    status = 0
    try:
        if watchdog is not None:
            watchdog.start()
        asyncio.run(serve())
        if not stop_requested.is_set():
            log.critical("the Channel Access server ended by itself")
            status = 1
    except KeyboardInterrupt:
        if not stop_requested.is_set():
            raise
    except RestUnavailable as error:
        log.critical("%s", error)
        status = 1
    except Exception:
        log.critical("the Channel Access server failed", exc_info=True)
        status = 1
    finally:
        # Closing a file may take a while: the loop is gone, the watchdog must not fire.
        if watchdog is not None:
            watchdog.stop()
        if probe is not None:
            probe.stop()
        # Running acquisitions are completed with what has arrived before exiting.
        for controller in controllers:
            controller.shutdown()
        receiver.stop()
        if forwarder is not None:
            forwarder.close()
        trimmer.stop()
        if simulator is not None:
            simulator.stop()
    log.info("IOC stopped" if status == 0 else "IOC stopped after a failure")
    return status


def _access_security(args: argparse.Namespace) -> access.AccessConfig | None:
    """The --access-security file, parsed (None without the option); ValueError when it
    is invalid or would blind the watchdog, whose self-check must read STATE."""
    if args.access_security is None:
        return None
    config = access.load(args.access_security)
    if (args.watchdog_seconds
            and AccessRights.READ not in config.rights(access.DEFAULT, PROBE_HOST, PROBE_USER)):
        raise ValueError(f"it denies the watchdog's self-check (user {PROBE_USER} on host "
                         f"{PROBE_HOST}) reading STATE, in ASG {access.DEFAULT}: allow it, "
                         f"or give --watchdog-seconds 0")
    return config


class RestUnavailable(Exception):
    """The REST API cannot listen where it was told to: start-up fails."""


def _stop_on_signals() -> threading.Event:
    """SIGTERM (systemd, tests) and Ctrl-C end the server as KeyboardInterrupt, so
    files get closed; the event tells a requested stop from a server that died. Only
    the first signal interrupts: a second one (Ctrl-C twice, `timeout` signalling the
    process and then its group) must not break off the closing of the file."""
    requested = threading.Event()

    def interrupt(signum, frame):
        if requested.is_set():
            log.warning("%s again: still completing the open file", signal.Signals(signum).name)
            return
        requested.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    # A SIGINT ignored by the parent (background jobs) stays ignored.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)
    return requested


if __name__ == "__main__":
    sys.exit(main())
