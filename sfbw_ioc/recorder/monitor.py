"""A monitor on every recorded PV, all the time, feeding its history: Channel Access
here, PV Access (``pva://`` names) in ``pva``.

caproto's threading client runs the sockets and the callbacks in its own threads: the
IOC's asyncio loop and the writer threads never wait on it. A connection is described
(type, units, DESC) by a thread of this module, which then subscribes: DBR_TIME of the
native type, enums as their strings (the server converts), so a file needs no state
strings. caproto subscribes again by itself after a reconnection.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence

import numpy as np
from caproto import ChannelType
from caproto.threading.client import PV, Context

from .history import PvHistory, PvInfo, Update
from .names import RecordedPv
from .pva import PvaMonitor

log = logging.getLogger(__name__)

_EPICS_EPOCH_S = 631_152_000  # 1990-01-01 in POSIX seconds
_READ_TIMEOUT_S = 2.0
_DTYPES = {ChannelType.DOUBLE: "float64", ChannelType.FLOAT: "float32",
           ChannelType.LONG: "int32", ChannelType.INT: "int16", ChannelType.CHAR: "uint8",
           ChannelType.ENUM: "string", ChannelType.STRING: "string"}


def update_of(response, dtype: str) -> Update:
    """A DBR_TIME response as an ``Update`` (the values copied: caproto's buffers)."""
    metadata = response.metadata
    stamp = metadata.stamp
    timestamp_ns = (stamp.secondsSinceEpoch + _EPICS_EPOCH_S) * 1_000_000_000 + stamp.nanoSeconds
    if dtype == "string":
        raw = response.data[0] if len(response.data) else b""
        value: np.ndarray | str = raw.decode("utf-8", "replace") if isinstance(raw, bytes) \
            else str(raw)
    else:
        value = np.array(response.data, dtype=dtype)
    return Update(value, int(timestamp_ns), int(metadata.severity), int(metadata.status))


class Recorder:
    """Keeps a monitor on each PV it was asked to watch, for as long as it runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._histories: dict[str, PvHistory] = {}
        self._pvs: dict[str, PV] = {}
        self._context: Context | None = None
        self._pva = PvaMonitor()
        self._connections: queue.Queue[tuple[PV, str] | None] = queue.Queue()
        self._describer = threading.Thread(target=self._describe_connections,
                                           name="pv-recorder", daemon=True)
        # caproto holds callbacks weakly: these are the strong references.
        self._callbacks: dict[str, object] = {}

    def watch(self, pvs: Sequence[RecordedPv]) -> tuple[tuple[RecordedPv, PvHistory], ...]:
        """Monitor every PV of ``pvs`` (from now on, if not yet); their histories."""
        with self._lock:
            new = {pv.name: pv for pv in pvs if pv.name not in self._histories}
            for name in new:
                self._histories[name] = PvHistory(name)
            if ca := [name for name, pv in new.items() if not pv.is_pva]:
                self._connect(ca)
            if pva := [(pv.channel, self._histories[name]) for name, pv in new.items()
                       if pv.is_pva]:
                self._pva.watch(pva)
            return tuple((pv, self._histories[pv.name]) for pv in pvs)

    def not_connected(self, pvs: Sequence[RecordedPv]) -> list[str]:
        with self._lock:
            return [pv.name for pv in pvs
                    if pv.name not in self._histories or not self._histories[pv.name].connected]

    def stop(self) -> None:
        """End every monitor (the files being written keep the histories they have)."""
        self._connections.put(None)
        with self._lock:
            context, self._context = self._context, None
            self._pva.stop()
        if context is not None:
            context.disconnect()

    def _connect(self, names: list[str]) -> None:
        if self._context is None:
            self._context = Context()
            self._describer.start()
        log.info("monitoring %d PVs to record: %s", len(names), ", ".join(names[:10]) +
                 (", ..." if len(names) > 10 else ""))
        for pv in self._context.get_pvs(*names, connection_state_callback=self._on_state):
            self._pvs[pv.name] = pv

    def _on_state(self, pv: PV, state: str) -> None:
        # In caproto's callback thread: reading here could wait for its own responses.
        self._connections.put((pv, state))

    def _describe_connections(self) -> None:
        while (item := self._connections.get()) is not None:
            pv, state = item
            history = self._histories[pv.name]
            try:
                if state == "connected":
                    self._connected(pv, history)
                elif state == "disconnected":
                    log.warning("recorded PV %s disconnected", pv.name)
                    history.disconnect()
            except Exception:  # one PV must not end the recording of the others
                log.exception("cannot take the connection of %s", pv.name)

    def _connected(self, pv: PV, history: PvHistory) -> None:
        channel = pv.channel
        native = ChannelType(channel.native_data_type)
        dtype = _DTYPES.get(native)
        if dtype is None:
            log.error("recorded PV %s has type %s, which cannot be recorded", pv.name,
                      native.name)
            return
        history.connect(PvInfo(dtype, channel.native_data_count, *self._fields(pv, native)))
        if pv.name in self._callbacks:
            return  # caproto subscribes again itself

        def on_update(subscription, response) -> None:
            history.add(update_of(response, dtype))

        self._callbacks[pv.name] = on_update
        data_type = ChannelType.TIME_STRING if dtype == "string" else "time"
        pv.subscribe(data_type=data_type).add_callback(on_update)
        log.info("recording %s (%s[%d])", pv.name, dtype, channel.native_data_count)

    def _fields(self, pv: PV, native: ChannelType) -> tuple[str, str]:
        """The PV's units (from DBR_CTRL) and its record's DESC, "" when not at hand."""
        units = description = ""
        try:
            if native not in (ChannelType.STRING, ChannelType.ENUM):
                control = pv.read(data_type="control", timeout=_READ_TIMEOUT_S)
                units = control.metadata.units.decode("utf-8", "replace")
            if "." not in pv.name:
                desc, = self._context.get_pvs(f"{pv.name}.DESC", timeout=_READ_TIMEOUT_S)
                description = desc.read(timeout=_READ_TIMEOUT_S).data[0].decode(
                    "utf-8", "replace")
        except Exception as error:  # a server without the field: recorded without it
            log.info("no units or description for %s: %s", pv.name, error)
        return units, description
