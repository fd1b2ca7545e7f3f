"""``sfbw-group``: command line and life cycle of the group IOC."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from caproto.server import template_arg_parser

from ..commandline import (add_serving_options, configure_logging, prepare_output_root,
                           prompt_monitors)
from ..pva.server import startup_hook
from ..pvs import access, epicsdb
from ..pvs.ca_server import Context
from ..serving import duplicate
from ..serving.supervision import Supervision, UnusableAccessSecurity, load_access_security
from .member import file_name
from .pvs import SfbwGroupIOC

log = logging.getLogger("sfbw_ioc")

DB_FILE = "db/sfbw-group.db"


def build_parser() -> tuple[argparse.ArgumentParser, object]:
    parser, split = template_arg_parser(
        default_prefix="SFBW-GROUP:", supported_async_libs=["asyncio"],
        desc="One acquisition across many sfbw-ioc members: the same start and stop "
             "pulse id on all, and a master HDF5 file linking every member's data.")
    parser.add_argument("--member", action="append", default=[], metavar="PREFIX",
                        help="PV prefix of a member sfbw-ioc (repeat for each member; "
                             "at least one)")
    parser.add_argument("--output-root", type=Path, default=Path.cwd(),
                        help="directory OUTPUT_FILE (the master file) is relative to and "
                             "confined in (default: the working directory)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="start with the members that can start; the master notes "
                             "the absent ones (default: refuse the START)")
    parser.add_argument("--no-pva", dest="pva", action="store_false",
                        help="serve Channel Access only (default: PV Access too)")
    add_serving_options(parser, DB_FILE)
    return parser, split


def check_members(parser: argparse.ArgumentParser, prefixes: Sequence[str]) -> None:
    """At least one member; prefixes must be distinct, also as file names."""
    if not prefixes:
        parser.error("give --member PREFIX for each member IOC")
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
    if args.write_db:
        args.write_db.write_text(epicsdb.render(
            SfbwGroupIOC, command=f"python -m sfbw_ioc.group.cli --write-db {DB_FILE}"))
        return 0
    check_members(parser, args.member)
    ioc_options, run_options = split(args)
    configure_logging(args.quiet)
    prompt_monitors()
    if not (args.allow_duplicate_prefix or duplicate.prefix_free(args.prefix, args.pva)):
        return duplicate.EXIT_DUPLICATE_PREFIX
    if not prepare_output_root(args.output_root):
        return 1
    try:
        access_config = load_access_security(args.access_security,
                                             bool(args.watchdog_seconds))
    except UnusableAccessSecurity as error:
        log.critical("%s", error)
        return 1
    ioc = SfbwGroupIOC(members=args.member, output_root=args.output_root,
                       allow_partial=args.allow_partial, **ioc_options)
    if access_config is not None:
        access.apply(access_config, ioc.pvdb)
    signal.signal(signal.SIGTERM, _interrupt)
    log.info("group IOC %s of %d members; master files go to %s", args.prefix,
             len(args.member), args.output_root)
    status = _run(ioc, run_options, args)
    log.info("group IOC stopped" if status == 0 else "group IOC stopped after a failure")
    return status


def _run(ioc: SfbwGroupIOC, run_options: dict[str, Any], args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C (0), or until the server fails (1)."""
    with Supervision(args.watchdog_seconds) as supervision:
        try:
            asyncio.run(_serve(ioc, run_options, supervision, args.pva))
        except KeyboardInterrupt:
            return 0
        except Exception:
            log.critical("the Channel Access server failed", exc_info=True)
            return 1
    log.critical("the Channel Access server ended by itself")
    return 1


async def _serve(ioc: SfbwGroupIOC, run_options: dict[str, Any], supervision: Supervision,
                 pva: bool) -> None:
    """The group's PVs on the server that enforces READ as EPICS does; its own start-up,
    the watchdog's self-check and (unless --no-pva) PV Access as startup hooks."""
    server = Context(ioc.pvdb, run_options["interfaces"])  # in the loop it runs in
    hooks = [ioc.startup, supervision.startup_hook(server, ioc.STATE.pvname)]
    if pva:
        hooks.append(startup_hook(ioc.pvdb))

    async def startup(async_lib: Any) -> None:
        await asyncio.gather(*(hook(async_lib) for hook in hooks))
    try:
        await server.run(log_pv_names=run_options["log_pv_names"], startup_hook=startup)
    finally:
        supervision.stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
