"""``sfbw-ioc``: the command line. What runs is ``service.run``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from caproto.server import template_arg_parser

from .commandline import (add_serving_options, byte_size, dir_mode, file_mode, port_number,
                          positive_int)
from .live.sampler import DEFAULT_IMAGE_MAX_PIXELS
from .output import ownership
from .pvs import epicsdb
from .pvs.ioc import ALIASED_WRITER, DEFAULT_WRITERS, check_stream_address, ioc_class
from .pvs.live import IMAGE_ARRAY_LENGTH
from .service.run import run


def image_pixels(text: str) -> int:
    value = positive_int(text)
    if value > IMAGE_ARRAY_LENGTH:
        raise argparse.ArgumentTypeError(
            f"at most {IMAGE_ARRAY_LENGTH} (IMAGE:ARRAY's length): {text!r}")
    return value


DEFAULT_PREFIX = "SFBW:"
DB_FILE = "db/sfbw.db"
DESCRIPTION = ("SwissFEL bsread buffer and writer: buffers a bsread stream all the time "
               "and writes pulse-id ranges to HDF5 on request over Channel Access.")


def build_parser() -> tuple[argparse.ArgumentParser, object]:
    caproto_parser, split = template_arg_parser(
        default_prefix=DEFAULT_PREFIX, supported_async_libs=["asyncio"], desc=DESCRIPTION)
    # caproto's --prefix has no help text. argparse lets a parser built on another
    # (parents=) define an option again when conflict_handler="resolve"; the parser
    # below is built on that one, so that any other clash is still an error.
    prefixed = argparse.ArgumentParser(parents=[caproto_parser], add_help=False,
                                       conflict_handler="resolve")
    prefixed.add_argument("--prefix", default=DEFAULT_PREFIX, metavar="PREFIX",
                          help="prefix of every PV name, e.g. SARES11-SFBW: "
                               f"(default: {DEFAULT_PREFIX})")
    parser = argparse.ArgumentParser(parents=[prefixed], add_help=False,
                                     description=DESCRIPTION, epilog=caproto_parser.epilog,
                                     formatter_class=caproto_parser.formatter_class)
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
    parser.add_argument("--image-max-pixels", type=image_pixels,
                        default=DEFAULT_IMAGE_MAX_PIXELS,
                        help="pixels IMAGE:ARRAY may have; a larger frame is binned by the "
                             "smallest integer factor that fits (default and most: "
                             f"{IMAGE_ARRAY_LENGTH}, the PV's length)")
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
    parser.add_argument("--no-pva", dest="pva", action="store_false",
                        help="serve Channel Access only; by default every PV is served "
                             "over PV Access too (EPICS_PVAS_* set its interface and port)")
    parser.add_argument("--record-pvs", type=Path, metavar="FILE",
                        help="EPICS PVs recorded into every file under /epics: one PV name "
                             "a line, optionally followed by an alias, # comments (each "
                             "writer's RECORD_PVS changes its list)")
    parser.add_argument("--swmr", action="store_true",
                        help="write files readable while written (HDF5 SWMR): the default "
                             "of each writer's SWMR PV")
    add_serving_options(parser, DB_FILE)
    return parser, split


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
    return run(args, ioc_options, run_options)


if __name__ == "__main__":
    sys.exit(main())
