"""A SharedPV open only while PV Access clients have it: nothing is made for nobody.

Made for every update, the PVA value of IMAGE:ARRAY (a frame copied into a p4p Value)
and the NTNDArray frames cost the IOC's event loop their conversion with or without a
PVA client. Here the SharedPV is closed until its first client connects (a client that
connects meanwhile waits), opened then with the current value, closed after its last
client went; updates are made into values only while it is open.
"""
from __future__ import annotations

from typing import Callable

from p4p import Value
from p4p.server.asyncio import SharedPV


class OnDemand:
    """The handler of ``shared``; subclasses give ``current()``. p4p's asyncio flavour
    calls the handler in the loop, in the order PVXS made the calls."""

    def __init__(self) -> None:
        # A SharedPV must be made in the running loop (p4p's asyncio flavour).
        self.shared = SharedPV(handler=self)

    def current(self) -> Value:
        raise NotImplementedError

    def post(self, make: Callable[[], Value]) -> None:
        """Post ``make()`` when a client has the PV."""
        if self.shared.isOpen():
            self.shared.post(make())

    def onFirstConnect(self, pv: SharedPV) -> None:  # noqa: N802 (p4p's name)
        pv.open(self.current())

    def onLastDisconnect(self, pv: SharedPV) -> None:  # noqa: N802 (p4p's name)
        pv.close()
