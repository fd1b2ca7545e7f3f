"""``sfbw-group``: command line and life cycle of the group IOC."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from caproto.server import run, template_arg_parser

from ..commandline import configure_logging, prepare_output_root, prompt_monitors
from ..pva.server import startup_hook
from .member import file_name
from .pvs import SfbwGroupIOC

log = logging.getLogger("sfbw_ioc")


def build_parser() -> tuple[argparse.ArgumentParser, object]:
    parser, split = template_arg_parser(
        default_prefix="SFBW-GROUP:", supported_async_libs=["asyncio"],
        desc="One acquisition across many sfbw-ioc members: the same start and stop "
             "pulse id on all, and a master HDF5 file linking every member's data.")
    parser.add_argument("--member", action="append", required=True, metavar="PREFIX",
                        help="PV prefix of a member sfbw-ioc (repeat for each member)")
    parser.add_argument("--output-root", type=Path, default=Path.cwd(),
                        help="directory OUTPUT_FILE (the master file) is relative to and "
                             "confined in (default: the working directory)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="start with the members that can start; the master notes "
                             "the absent ones (default: refuse the START)")
    parser.add_argument("--no-pva", dest="pva", action="store_false",
                        help="serve Channel Access only (default: PV Access too)")
    return parser, split


def check_members(parser: argparse.ArgumentParser, prefixes: Sequence[str]) -> None:
    """Member prefixes must be distinct, also as file names."""
    names: dict[str, str] = {}
    for prefix in prefixes:
        try:
            name = file_name(prefix)
        except ValueError as error:
            parser.error(str(error))
        if name in names:
            parser.error(f"members {names[name]!r} and {prefix!r} would write the same "
                         f"file name {name}.h5")
        names[name] = prefix


def main(argv: Sequence[str] | None = None) -> int:
    parser, split = build_parser()
    args = parser.parse_args(argv)
    check_members(parser, args.member)
    ioc_options, run_options = split(args)
    configure_logging(args.quiet)
    prompt_monitors()
    if not prepare_output_root(args.output_root):
        return 1
    ioc = SfbwGroupIOC(members=args.member, output_root=args.output_root,
                       allow_partial=args.allow_partial, **ioc_options)
    signal.signal(signal.SIGTERM, _interrupt)
    log.info("group IOC %s of %d members; master files go to %s", args.prefix,
             len(args.member), args.output_root)
    try:
        run(ioc.pvdb, startup_hook=_startup(ioc, args.pva), **run_options)
    except KeyboardInterrupt:
        pass
    log.info("group IOC stopped")
    return 0


def _startup(ioc: SfbwGroupIOC, pva: bool) -> Callable[[Any], Awaitable[None]]:
    """The group IOC's own start-up, and (unless --no-pva) its PVs over PV Access, for
    as long as the CA server runs."""
    hooks = [ioc.startup] + ([startup_hook(ioc.pvdb)] if pva else [])

    async def startup(async_lib: Any) -> None:
        await asyncio.gather(*(hook(async_lib) for hook in hooks))
    return startup


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
