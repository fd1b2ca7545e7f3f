"""The PV Access server's life inside the IOC's asyncio loop: every PV of a caproto
pvdb mirrored (``mirror``), plus any other SharedPVs, served by p4p's ``Server`` (PVXS
threads; the SharedPVs' handlers run in this loop) until the context ends. The server
reads the standard EPICS_PVAS_* variables (interface, port, broadcast port)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from caproto import ChannelData
from p4p.server import Server, StaticProvider
from p4p.server.asyncio import SharedPV

from .mirror import MirroredPV
from .peers import Peers

log = logging.getLogger(__name__)


def _mirrors(pvdb: Mapping[str, ChannelData], peers: Peers) -> dict[str, MirroredPV]:
    """A mirror per PV, under each of its names (an alias shares its PV's mirror).
    Record fields (NAME.FIELD) stay Channel Access's: PVA's display and control carry
    their DESC, EGU, PREC and limits."""
    by_channel: dict[int, MirroredPV] = {}
    named = {}
    for name, channel in pvdb.items():
        if "." in name:
            continue
        if id(channel) not in by_channel:
            by_channel[id(channel)] = MirroredPV(channel, peers)
        named[name] = by_channel[id(channel)]
    return named


@contextlib.asynccontextmanager
async def serving(pvdb: Mapping[str, ChannelData],
                  extra: Mapping[str, SharedPV] | None = None) -> AsyncIterator[Server]:
    """Serve ``pvdb`` (and ``extra``) over PV Access while the context lasts; call it
    in the running loop, before or after the CA server starts."""
    named = _mirrors(pvdb, Peers())
    for mirror in {id(mirror): mirror for mirror in named.values()}.values():
        await mirror.follow()
    provider = StaticProvider("sfbw")
    for name, mirror in named.items():
        provider.add(name, mirror.shared)
    for name, shared in (extra or {}).items():
        provider.add(name, shared)
    with Server(providers=[provider]) as server:
        conf = server.conf()
        log.info("PV Access: %d PVs on %s (UDP %s)", len(named) + len(extra or {}),
                 conf.get("EPICS_PVAS_INTF_ADDR_LIST"), conf.get("EPICS_PVAS_BROADCAST_PORT"))
        yield server



def startup_hook(pvdb: Mapping[str, ChannelData]) -> Callable[[Any], Awaitable[None]]:
    """A caproto startup hook serving ``pvdb`` over PVA until the CA server ends (it
    cancels its hooks' tasks then)."""
    async def serve(async_lib: Any) -> None:
        async with serving(pvdb):
            await asyncio.get_running_loop().create_future()
    return serve
