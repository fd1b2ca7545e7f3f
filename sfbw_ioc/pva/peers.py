"""Who a PV Access client is, for access security: the account its client sends and
its host. PVA gives the peer's address, not the host name a CA client sends, so the host
is the address and the name it resolves back to (once per address, off the loop), and
for a client on the loopback this host's own name too; an ACF's HAG may name any of them.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from caproto import AccessRights, ChannelData

log = logging.getLogger(__name__)


def peer_address(peer: str) -> str:
    """"127.0.0.1:5075" or "[::1]:5075" -> the address alone."""
    return peer.rpartition(":")[0].strip("[]") or peer


def _host_names(address: str) -> tuple[str, ...]:
    names = [address]
    try:
        names.append(socket.getnameinfo((address, 0), socket.NI_NAMEREQD)[0])
    except OSError:  # no name: the address is all there is
        pass
    try:
        if ipaddress.ip_address(address).is_loopback:
            names.append(socket.gethostname())
    except ValueError:
        pass
    return tuple(dict.fromkeys(names))


class Peers:
    """Host names of PVA peers, looked up once per address."""

    def __init__(self) -> None:
        self._names: dict[str, tuple[str, ...]] = {}

    async def hosts(self, peer: str) -> tuple[str, ...]:
        address = peer_address(peer)
        if address not in self._names:
            loop = asyncio.get_running_loop()
            self._names[address] = await loop.run_in_executor(None, _host_names, address)
        return self._names[address]

    async def rights(self, channel: ChannelData, peer: str, account: str) -> AccessRights:
        """What ``account`` at ``peer`` may do with ``channel``: what the PV's
        ``check_access`` (under the ACF, see pvs.access) grants it from any of its host
        names."""
        rights = AccessRights.NO_ACCESS
        for host in await self.hosts(peer):
            rights |= channel.check_access(host, account)
        return rights
