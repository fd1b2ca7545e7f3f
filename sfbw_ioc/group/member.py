"""One member IOC as the group sees it: a Channel Access client of its PVs.

Everything runs on the group IOC's own asyncio loop (caproto's asyncio client): puts
with callback, and monitors of STATE, LAST_FILE and LAST_PULSE_ID instead of polling.

caproto's asyncio client never reports a refused put: the server answers a failed
put-with-callback with an ErrorResponse (ECA_PUTFAIL), which the client ignores, so the
put would wait for its timeout. ``Client`` hands such an answer to the waiting put, and
``Member.put`` raises ``MemberRefused`` with the reason the member gave.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import caproto as ca
import numpy as np
from caproto.asyncio.client import Context

from ..output.root import safe_name
from ..vocabulary import State

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 10.0  # a put that is not a STOP: the member answers at once
_MONITORED = ("STATE", "LAST_FILE", "LAST_PULSE_ID")
_PVS = ("OUTPUT_FILE", "USER", "PROCESS", "INSTRUMENT", "FILE_UID", "FILE_GID",
        "START_PULSE_ID", "STOP_PULSE_ID", "ABORT", "STATE", "MESSAGE", "LAST_FILE",
        "LAST_PULSE_ID", "WRITTEN", "MISSING", "LOST")
_TEXT = frozenset(("OUTPUT_FILE", "USER", "PROCESS", "INSTRUMENT", "MESSAGE", "LAST_FILE"))
_NOTIFY_REQUESTS = (ca.WriteNotifyRequest.ID, ca.ReadNotifyRequest.ID)


class MemberError(Exception):
    """A member could not carry out a command; the text names the member."""


class MemberRefused(MemberError):
    """The member answered the put with a failure (the reason is its MESSAGE)."""


class MemberUnreachable(MemberError):
    """The member is disconnected, or went away while a put waited."""


class Client(Context):
    """caproto's asyncio client, with refused puts reported to the put that waits."""

    def get_circuit_manager(self, address, priority):
        manager = super().get_circuit_manager(address, priority)
        if not getattr(manager, "_reports_refusals", False):
            manager._reports_refusals = True
            process = manager._process_command

            async def process_command(command):
                if isinstance(command, ca.ErrorResponse):
                    _answer_request(manager, command)
                await process(command)

            manager._process_command = process_command
        return manager


def _answer_request(manager, error: ca.ErrorResponse) -> None:
    request = error.original_request
    if request.command not in _NOTIFY_REQUESTS:
        return
    pending = manager.ioids.pop(request.parameter2, None)  # parameter2 is the ioid
    if pending is not None and pending.get("event") is not None:
        pending["response"] = error
        pending["event"].set()


def file_name(prefix: str) -> str:
    """A member's file name (without .h5) from its PV prefix: trailing colons dropped,
    other colons and anything unsafe in a file name become '_'
    ('SARES11-SFBW1:' -> 'SARES11-SFBW1', 'X:CAM:' -> 'X_CAM')."""
    name = safe_name(prefix.rstrip(":"))
    if name is None:
        raise ValueError(f"member prefix {prefix!r} gives no usable file name")
    return name


class Member:
    """The PVs of one member IOC; ``on_change(member)`` is called on the loop whenever
    a monitored PV or the connection changes."""

    def __init__(self, context: Context, prefix: str,
                 on_change: Callable[["Member"], None]) -> None:
        self.prefix = prefix
        self.name = file_name(prefix)
        self._context = context
        self._on_change = on_change
        self._pvs: dict[str, Any] = {}
        self.values: dict[str, Any] = {}
        self.connected = False
        self._disconnected = asyncio.Event()
        self._disconnected.set()

    @property
    def state(self) -> str | None:
        return self.values.get("STATE") if self.connected else None

    @property
    def last_pulse_id(self) -> int | None:
        value = self.values.get("LAST_PULSE_ID")
        return int(value) if self.connected and value else None

    async def connect(self) -> None:
        """Search its PVs and monitor them; connections come and go by themselves."""
        pvs = await self._context.get_pvs(*(self.prefix + name for name in _PVS),
                                          timeout=CONNECT_TIMEOUT_S)
        self._pvs = dict(zip(_PVS, pvs))
        self._pvs["STATE"].connection_state_callback.add_callback(self._connection_changed,
                                                                  run=True)
        for name in _MONITORED:
            self._pvs[name].subscribe(data_type="native").add_callback(self._value_changed)

    async def _connection_changed(self, pv, state: str) -> None:
        self.connected = state == "connected"
        if self.connected:
            self._disconnected.clear()
        else:
            self._disconnected.set()
            log.warning("member %s disconnected", self.prefix)
        self._on_change(self)

    async def _value_changed(self, subscription, response) -> None:
        name = subscription.pv.name[len(self.prefix):]
        # An empty CHAR waveform comes without a payload: no .data to decode.
        self.values[name] = _python_value(name, response.data if response.data_count else ())
        self._on_change(self)

    async def put(self, name: str, value: Any, timeout: float | None = COMMAND_TIMEOUT_S) -> None:
        """Put with callback; returns when the member completed it (a STOP: the file is
        closed). Raises ``MemberRefused`` or ``MemberUnreachable``."""
        if not self.connected:
            raise MemberUnreachable(f"{self.prefix} is not connected")
        pv = self._pvs[name]
        if isinstance(value, str):
            value = value.encode()
        write = asyncio.ensure_future(pv.write(value, wait=True, timeout=timeout))
        # caproto would re-send the put once the member is back (a new IOC: never).
        gone = asyncio.ensure_future(self._disconnected.wait())
        try:
            await asyncio.wait((write, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        gone_during_put = MemberUnreachable(f"{self.prefix} disconnected during the put "
                                            f"to {name}")
        if not write.done():
            write.cancel()
            raise gone_during_put
        try:
            response = write.result()
        except KeyError as error:
            # caproto wakes a put whose circuit died, then looks up the answer that never
            # came (its read checks for a dead circuit there; its write does not).
            raise gone_during_put from error
        except (ca.CaprotoTimeoutError, ca.CaprotoError, OSError) as error:
            raise MemberUnreachable(f"{self.prefix}{name}: {error}") from error
        if isinstance(response, ca.ErrorResponse):
            raise MemberRefused(f"{self.prefix} refused {name}: {_reason(response)}")

    async def read(self, name: str) -> Any:
        if not self.connected:
            raise MemberUnreachable(f"{self.prefix} is not connected")
        try:
            response = await self._pvs[name].read(data_type="native",
                                                  timeout=COMMAND_TIMEOUT_S)
        except (ca.CaprotoError, OSError) as error:
            raise MemberUnreachable(f"{self.prefix}{name}: {error}") from error
        return _python_value(name, response.data if response.data_count else ())

    async def message(self) -> str:
        """The member's MESSAGE (its reason for a refusal or failure), or why not."""
        try:
            return await self.read("MESSAGE")
        except MemberUnreachable as error:
            return f"(MESSAGE unreadable: {error})"


def _reason(error: ca.ErrorResponse) -> str:
    """The text of the exception the member's putter raised (its MESSAGE as well)."""
    text = bytes(error.error_message).split(b"\0")[0].decode("utf-8", "replace")
    for prefix in ("Python exception: PutRejected ", "Python exception: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _python_value(name: str, data: Any) -> Any:
    if len(data) == 0:
        return "" if name in _TEXT else None
    if name == "STATE":
        return State(int(data[0])).name  # an enum read natively is its index
    if name in _TEXT:
        return bytes(np.asarray(data, dtype=np.uint8)).split(b"\0")[0].decode("utf-8", "replace")
    return float(data[0])
