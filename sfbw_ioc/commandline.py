"""What the entry points share: argument types, the options of serving (watchdog,
access security, database file), logging, the output root, and the caproto server's
monitor latency."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from caproto import Forbidden
from caproto._data import CannotExceedLimits  # not re-exported by caproto

from .output import ownership
from .pvs.kinds import PutRejected
from .serving import duplicate

log = logging.getLogger("sfbw_ioc")

_SIZE_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_HIGH_LOAD_VARIABLE = "CAPROTO_SERVER_HIGH_LOAD_TIMEOUT_SEC"
_HIGH_LOAD_TIMEOUT_S = 0.001


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


def add_serving_options(parser: argparse.ArgumentParser, db_file: str) -> None:
    """--watchdog-seconds, --access-security, --allow-duplicate-prefix and --write-db,
    alike for both IOCs (``db_file``: the shipped database file, for the help)."""
    parser.add_argument("--watchdog-seconds", type=non_negative_float, default=10.0,
                        help="exit with status 70 when Channel Access has not answered "
                             "for this long (the IOC reads its own STATE as a new client "
                             "twice a second), so that a supervisor restarts it "
                             "(0: off; default: 10)")
    parser.add_argument("--access-security", type=Path, metavar="FILE",
                        help="EPICS access security file (ACF): control PVs are in ASG "
                             "CONTROL, all others in DEFAULT; as in EPICS, a client no "
                             "rule applies to has no access (default: everybody may read "
                             "and write)")
    parser.add_argument("--allow-duplicate-prefix", action="store_true",
                        help="serve even if another server already answers for this "
                             f"prefix's {', '.join(duplicate.SEARCHED)} (by default the IOC "
                             f"searches for them for {duplicate.SEARCH_DEADLINE_S:g} s "
                             "before serving and, if one answers, exits with status "
                             f"{duplicate.EXIT_DUPLICATE_PREFIX})")
    parser.add_argument("--write-db", type=Path, metavar="FILE",
                        help=f"write the PV list as an EPICS database file (as {db_file}) "
                             "and exit")


# caproto's server logs these at INFO for every client, also for each short-lived caget.
_CONNECTION_LINES = ("Connected to new client", "Disconnected from client")
# What caproto itself refuses before a putter sees the value.
_CAPROTO_REFUSALS = (Forbidden, CannotExceedLimits)


def configure_logging(quiet: bool) -> None:
    """Our lines at INFO (WARNING with --quiet); of caproto's, the ones its ``split()``
    chose, with client connections at DEBUG (shown with -v) and a refused put as one
    line, not as a traceback."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("caproto").propagate = False  # split() gave it a handler already
    logging.getLogger("caproto.ctx").addFilter(_connections_at_debug)
    logging.getLogger("caproto.circ").addFilter(_refusals_in_one_line)


def _connections_at_debug(record: logging.LogRecord) -> bool:
    """A client's connect or disconnect as a DEBUG record: caproto's handlers at INFO
    leave it out."""
    if isinstance(record.msg, str) and record.msg.startswith(_CONNECTION_LINES):
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
    return True


def _refusals_in_one_line(record: logging.LogRecord) -> bool:
    """caproto logs every put that raised with its traceback. A refusal is no bug: a
    PutRejected was logged by the putter that raised it, caproto's own refusals are
    logged here in one line; any other exception keeps its traceback."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, _CAPROTO_REFUSALS):
        log.warning("put refused: %s", error)
    return not isinstance(error, (PutRejected, *_CAPROTO_REFUSALS))


def prepare_output_root(output_root: Path) -> bool:
    """Create the output root; False (logged CRITICAL) when it cannot be used."""
    try:
        output_root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.critical("cannot use the output root %s: %s", output_root, error)
        return False
    return True


def prompt_monitors() -> None:
    """With caproto's default, two PVs at 100 Hz push its server into "high load"
    batching and monitors arrive up to 1 s late (../shared/EPICS.md); 1 ms unless the
    environment says otherwise. caproto reads the variable once, at import; the module's
    value is what its server uses, whenever caproto was imported."""
    import caproto.server.common

    caproto.server.common.HIGH_LOAD_TIMEOUT = float(
        os.environ.get(_HIGH_LOAD_VARIABLE, _HIGH_LOAD_TIMEOUT_S))
