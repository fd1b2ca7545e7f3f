"""``PARTIAL_FILES`` and ``PARTIAL_FILES_NEWEST``: the ``.partial`` files left in the
output root by acquisitions that never completed, found once at start-up
(``output.leftovers``, in a thread) and reported in the log. Shared by the IOC and the
group IOC (its master files)."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from caproto.server import PVGroup, pvproperty

from ..output.leftovers import find_partials
from .kinds import text_pv

log = logging.getLogger(__name__)


class LeftoverPVs(PVGroup):
    """The left-over ``.partial`` files of ``leftovers_root()``'s tree: how many, and
    the newest one's path."""

    PARTIAL_FILES = pvproperty(value=0, dtype=int, record="longin", read_only=True,
                               alarm_group="leftovers",
                               doc="Left-over .partial files at start-up")
    PARTIAL_FILES_NEWEST = text_pv("Newest left-over .partial file", read_only=True,
                                   alarm_group="leftovers")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A .partial changed after this is one of this IOC's own, not left over.
        self._built_at = time.time()

    def leftovers_root(self) -> Path:
        """The output root whose tree is scanned: the subclass's."""
        raise NotImplementedError

    @PARTIAL_FILES.startup
    async def PARTIAL_FILES(self, instance, async_lib: Any) -> None:
        leftovers = await asyncio.get_running_loop().run_in_executor(
            None, find_partials, self.leftovers_root(), self._built_at)
        (log.warning if leftovers.count or leftovers.stopped_at else log.info)(
            "%s", leftovers.report())
        await self.PARTIAL_FILES_NEWEST.write(str(leftovers.newest or ""))
        await instance.write(leftovers.count)
