"""One p4p ``SharedPV`` per caproto PV: it follows the PV's every update (a subscription
to the ChannelData, as caproto's own CA server subscribes) and hands a put to the PV's
``write``, which runs its putter: the same checks, refusals and completion as a CA put.
A PV no PVA client has open costs nothing (``ondemand``).
"""
from __future__ import annotations

import logging
from typing import Any

from caproto import AccessRights, ChannelData, ChannelFilter, SubscriptionType
from caproto.server.common import SubscriptionSpec
from p4p.server import ServerOperation
from p4p import Value
from p4p.server.asyncio import SharedPV

from .ondemand import OnDemand
from .peers import Peers
from .values import Shape

log = logging.getLogger(__name__)

_EVERY_CHANGE = SubscriptionType.DBE_VALUE | SubscriptionType.DBE_LOG | SubscriptionType.DBE_ALARM
_NO_FILTER = ChannelFilter(ts=None, dbnd=None, arr=None, sync=None)
# The DBR type the subscription asks caproto for: the alarm acknowledgement, which costs
# no conversion of the value (the mirror reads the ChannelData itself); a value type
# would have caproto convert every frame of IMAGE:ARRAY for nothing.
_CHEAPEST_DBR = "STSACK_STRING"


class MirroredPV(OnDemand):
    """``channel`` over PV Access: ``shared`` is served under its names."""

    def __init__(self, channel: ChannelData, peers: Peers) -> None:
        self._channel = channel
        self._peers = peers
        self._shape = Shape(channel)
        super().__init__()

    @property
    def name(self) -> str:
        return self._channel.pvname

    async def follow(self) -> None:
        """Post every update of the caproto PV from now on."""
        spec = SubscriptionSpec(db_entry=self._channel, data_type_name=_CHEAPEST_DBR,
                                mask=_EVERY_CHANGE, channel_filter=_NO_FILTER)
        await self._channel.subscribe(_Updates(self), spec, None)

    def current(self) -> Value:
        return self._shape.value(self._channel)

    def post_current(self) -> None:
        self.post(self.current)

    # ---- the SharedPV handler ---------------------------------------------------------

    async def put(self, pv: SharedPV, op: ServerOperation) -> None:
        refusal = await self._refusal(op)
        if refusal is not None:
            log.warning("PVA put to %s refused: %s", self.name, refusal)
            op.done(error=refusal)
            return
        try:
            await self._channel.write(self._shape.put_value(self._channel, op.value()))
        except Exception as error:  # every refusal, the putter's or caproto's: the reason
            op.done(error=str(error) or type(error).__name__)
        else:
            op.done()

    async def _refusal(self, op: ServerOperation) -> str | None:
        rights = await self._peers.rights(self._channel, op.peer(), op.account())
        if AccessRights.WRITE in rights:
            return None
        # EPICS's QSRV's words first, then who was refused what.
        return (f"Put not permitted: {op.account() or 'anonymous'} at {op.peer()} may not "
                f"write {self.name}")


class _Updates:
    """What caproto's ChannelData publishes to: a queue, for its CA server."""

    def __init__(self, mirror: MirroredPV) -> None:
        self._mirror = mirror

    async def put(self, update: Any) -> None:
        self._mirror.post_current()
