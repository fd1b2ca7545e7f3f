"""sfbw-ioc over PV Access: its pvdb mirrored, and the live view's NTNDArray PVs."""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

from caproto.server import PVGroup

from ..pvs.live import LiveImage, LiveSlot, LiveView
from .frames import FramePair, LiveFrames
from .server import serving


def _frame_pair(group: PVGroup) -> FramePair:
    # "<prefix>IMAGE:" -> "<prefix>IMAGE": the NTNDArray sits beside the group's CA PVs.
    return FramePair(group.prefix.rstrip(":"), lambda: group.NAME.value)


@contextlib.asynccontextmanager
async def serving_ioc(ioc: PVGroup, live: LiveView) -> AsyncIterator[None]:
    """Serve ``ioc``'s PVs and its live view's frames over PVA while the context lasts."""
    groups = list(ioc.groups.values())
    image = next(group for group in groups if isinstance(group, LiveImage))
    frames = LiveFrames(_frame_pair(image),
                        [_frame_pair(group) for group in groups if isinstance(group, LiveSlot)])
    async with serving(ioc.pvdb, frames.served()):
        live.add_listener(frames.on_samples)
        yield
