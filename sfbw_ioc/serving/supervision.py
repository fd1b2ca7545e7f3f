"""The watchdog and its CA self-check wired to a caproto server, and the access security
file checked against them: the same for ``sfbw-ioc`` and ``sfbw-group``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

from caproto import AccessRights

from ..pvs import access
from ..pvs.ca_server import Context
from .caprobe import PROBE_HOST, PROBE_USER, CaProbe, probe_address
from .watchdog import Watchdog

StartupHook = Callable[[Any], Awaitable[None]]


class UnusableAccessSecurity(Exception):
    """The access security file cannot be used; the text says why (for the log)."""


class Supervision:
    """The watchdog and the IOC's own CA client that feeds it (none with
    --watchdog-seconds 0). Stopped first: closing files may take a while once the loop
    is gone, and the watchdog must not fire then."""

    def __init__(self, timeout_s: float) -> None:
        self.watchdog = Watchdog(timeout_s) if timeout_s else None
        self._probe: CaProbe | None = None

    def __enter__(self) -> Supervision:
        if self.watchdog is not None:
            self.watchdog.start()
        return self

    def startup_hook(self, server: Context, pv_name: str) -> StartupHook:
        """caproto's startup hook for ``server``: the self-check reads ``pv_name``
        from then on (a no-op without a watchdog)."""
        async def start_probe(async_lib: Any) -> None:
            # The server listens now: its port is known (caproto takes another when
            # the configured one is in use).
            if self.watchdog is not None:
                self.start_probe(probe_address(next(iter(server.tcp_sockets)), server.port),
                                 pv_name)
        return start_probe

    def start_probe(self, address: tuple[str, int], pv_name: str) -> None:
        assert self.watchdog is not None
        self._probe = CaProbe(address, pv_name, self.watchdog.beat)
        self._probe.start()

    def stop(self) -> None:
        """Stop watching: the CA server has ended on purpose (stopping again does
        nothing). What follows it (the PV Access server, the loop's tasks and executor,
        the files being completed) may take longer than the watchdog's limit."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._probe is not None:
            self._probe.stop()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def load_access_security(path: Path | None, watchdog: bool) -> access.AccessConfig | None:
    """The --access-security file, parsed (None without the option); refused
    (``UnusableAccessSecurity``) when it is invalid or would blind the ``watchdog``,
    whose self-check must read STATE."""
    if path is None:
        return None
    try:
        config = access.load(path)
    except (OSError, ValueError) as error:
        raise UnusableAccessSecurity(f"cannot use the access security file {path}: "
                                     f"{error}") from error
    if watchdog and AccessRights.READ not in config.rights(access.DEFAULT, PROBE_HOST,
                                                           PROBE_USER):
        raise UnusableAccessSecurity(
            f"cannot use the access security file {path}: it denies the watchdog's "
            f"self-check (user {PROBE_USER} on host {PROBE_HOST}) reading STATE, in ASG "
            f"{access.DEFAULT}: allow it, or give --watchdog-seconds 0")
    return config
