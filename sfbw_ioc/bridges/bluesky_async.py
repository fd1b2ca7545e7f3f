"""An ophyd-async device for one writer of the IOC, whose documents lead a reader (tiled,
through bluesky's TiledWriter) to the data written, not only to the file.

``SfbwDetector("SFBW:", name="sfbw")`` drives writer 1 (``writer="W2:"`` another one),
over Channel Access (ophyd-async's aioca signals). It takes the arguments of the classic
``SfbwWriter`` and, like it:

- ``stage()`` sets the file-naming PVs given, ``unstage()`` puts back what they (and
  ``CHANNELS``) were, after an ``ABORT`` if a file is still being written;
- ``trigger()`` writes one file of the configured length (``AcquisitionLength``): one
  event of a step scan, whose every data key holds all the file's rows.

As a flyer, ``prepare(SfbwFlyInfo(...))`` sets the channels, naming and length,
``kickoff()`` starts the file, ``complete()`` ends it at the stop pulse and waits until
it is closed; then the stream can be declared and collected, one event per pulse row,
and each of ``earlier_definitions`` into a stream of its own (``fly_scan`` is that
plan). The documents are ``streamed``'s: a StreamResource per dataset and its
StreamDatum.

Every length ends at a stop pulse: ``seconds=T`` is the ``PULSE_RATE`` × T pulse ids
from the file's first row (started with ``START_NOW``), so that every step of a step
scan on a steady stream has the same rows, which its one descriptor needs.

Every refusal of the IOC (a naming PV, a start, a stop) fails at once with the IOC's
``MESSAGE``. The put's completion comes back at once, but not always its failure:
aioca's CANothing is false as a bool, and the retry wrapper of ophyd-async's
``Signal.set`` (stamina over tenacity over a ``concurrent.futures.Future``, which tests
an exception by truth) drops it. So every put is checked by what the IOC shows after it,
as the classic device does for pyepics.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from aioca import CANothing
from bluesky import plan_stubs as bps
from bluesky import preprocessors as bpp
from bluesky.protocols import Reading, StreamAsset
from bluesky.utils import MsgGenerator
from event_model import DataKey
from ophyd_async.core import AsyncStatus, Device, SignalR, SignalRW, SignalW
from ophyd_async.core import observe_signals_value
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw, epics_signal_w

from .bluesky import RUNNING_STATES, AcquisitionFailed, AcquisitionLength
from .streamed import (EarlierDefinition, Mode, StoredArray, by_stream, resource_documents,
                       stored_arrays)

log = logging.getLogger(__name__)

__all__ = ["SfbwDetector", "SfbwFlyInfo", "fly_scan"]


@dataclass(frozen=True)
class SfbwFlyInfo:
    """What ``prepare`` sets for the next fly scan; None leaves a setting as it is."""

    length: AcquisitionLength | None = None
    channels: Sequence[str] | None = None  # names or shell patterns; () : every channel
    file_name: str | None = None
    file_path: str | None = None


@dataclass(frozen=True)
class _Started:
    """An acquisition started, as its stop needs to know it."""

    last_file: str  # LAST_FILE before the start: the file closed must be another
    first: int | None  # the first pulse id, of a length in pulses
    previous_first: int  # FILE_FIRST_PULSE_ID before the start (the last file's)


class SfbwDetector(Device):
    """One writer of an sfbw-ioc as a Bluesky detector (step scans) and flyer."""

    def __init__(self, prefix: str, *, name: str = "", writer: str = "",
                 length: AcquisitionLength | None = None,
                 file_path: str | None = None, file_name: str | None = None,
                 file_template: str | None = None, auto_increment: bool = True,
                 timeout: float = 600.0) -> None:
        """``length``: what a trigger or fly scan writes (default 100 pulses).
        ``file_*``: the naming PVs' values while staged (None: the IOC's as they are).
        ``timeout``: the longest a put may take, a stop's until the file is closed."""
        pv = prefix + writer
        self.file_template = epics_signal_rw(str, pv + "FILE_TEMPLATE")
        self.file_path = epics_signal_rw(str, pv + "FILE_PATH")
        self.file_name = epics_signal_rw(str, pv + "FILE_NAME")
        self.auto_increment = epics_signal_rw(str, pv + "AUTO_INCREMENT")
        self.channels = epics_signal_rw(str, pv + "CHANNELS")
        self.start_pulse_id = epics_signal_rw(int, pv + "START_PULSE_ID")
        self.stop_pulse_id = epics_signal_rw(int, pv + "STOP_PULSE_ID")
        self.start_now = epics_signal_w(str, pv + "START_NOW")
        self.abort = epics_signal_w(str, pv + "ABORT")
        self.state = epics_signal_r(str, pv + "STATE")
        self.message = epics_signal_r(str, pv + "MESSAGE")
        self.last_file = epics_signal_r(str, pv + "LAST_FILE")
        self.first_pulse_id = epics_signal_r(int, pv + "FILE_FIRST_PULSE_ID")
        self.last_pulse_id = epics_signal_r(int, pv + "FILE_LAST_PULSE_ID")
        self.written = epics_signal_r(int, pv + "WRITTEN")
        self.missing = epics_signal_r(int, pv + "MISSING")
        self.lost = epics_signal_r(int, pv + "LOST")
        self.stream_pulse_id = epics_signal_r(int, prefix + "LAST_PULSE_ID")  # the IOC's
        self.pulse_rate = epics_signal_r(float, prefix + "PULSE_RATE")
        self.length = length or AcquisitionLength(pulses=100)
        self.timeout = timeout
        self._staged_naming = {signal: value for signal, value in (
            (self.file_template, file_template), (self.file_path, file_path),
            (self.file_name, file_name),
            (self.auto_increment, "Yes" if auto_increment else "No")) if value is not None}
        self._restore: dict[SignalRW, Any] = {}
        self._pending: list[StreamAsset] = []
        self._step_arrays: list[StoredArray] | None = None
        self._fly_arrays: list[StoredArray] | None = None
        self._earlier: tuple[EarlierDefinition, ...] = ()
        self._kicked_off: _Started | None = None
        super().__init__(name=name)

    # ---- stage, unstage, prepare -----------------------------------------------------

    @AsyncStatus.wrap
    async def stage(self) -> None:
        self._step_arrays = self._fly_arrays = self._kicked_off = None
        self._earlier = ()
        self._pending.clear()
        try:
            for signal, value in self._staged_naming.items():
                await self._change(signal, value)
        except BaseException:
            await self._put_back()
            raise

    @AsyncStatus.wrap
    async def unstage(self) -> None:
        await self._abort_if_running()
        await self._put_back()

    @AsyncStatus.wrap
    async def prepare(self, value: SfbwFlyInfo) -> None:
        if value.channels is not None:
            await self._change(self.channels, " ".join(value.channels))
        for signal, setting in ((self.file_name, value.file_name),
                                (self.file_path, value.file_path)):
            if setting is not None:
                await self._change(signal, setting)
        if value.length is not None:
            self.length = value.length
        self._fly_arrays = self._kicked_off = None
        self._earlier = ()

    async def _change(self, signal: SignalRW, value: Any) -> None:
        """Set a setting for the time the device is staged (``unstage`` puts it back)."""
        if signal not in self._restore:
            self._restore[signal] = await signal.get_value()
        await self._set(signal, value)

    async def _put_back(self) -> None:
        restore, self._restore = self._restore, {}
        for signal, value in restore.items():
            await self._set(signal, value)

    async def _set(self, signal: SignalRW, value: Any) -> None:
        await self._put(signal, value, "refused")
        if await signal.get_value() != value:
            await self._refused(signal, value, "refused")

    # ---- step scans: a file per trigger ------------------------------------------------

    @AsyncStatus.wrap
    async def trigger(self) -> None:
        path = await self._stop(await self._start())
        arrays = stored_arrays(path, self.name, Mode.STEP)
        if self._step_arrays is None:
            self._step_arrays = arrays
        else:
            _check_same_keys(self.name, path, self._step_arrays, arrays)
        self._pending = list(resource_documents(path, arrays, Mode.STEP))

    async def describe(self) -> dict[str, DataKey]:
        keys = await self._describe_signals()
        if self._step_arrays is None:
            raise AcquisitionFailed(f"{self.name}: describe() before the first trigger(): "
                                    f"the data keys are those of the file it writes")
        keys.update(self._data_keys(self._step_arrays, Mode.STEP))
        return keys

    async def read(self) -> dict[str, Reading]:
        readings: dict[str, Reading] = {}
        for signal in self._read_signals():
            readings.update(await signal.read(cached=False))
        return readings

    def _read_signals(self) -> list[SignalR]:
        return [self.last_file, self.first_pulse_id, self.last_pulse_id, self.written,
                self.missing, self.lost]

    async def _describe_signals(self) -> dict[str, DataKey]:
        keys: dict[str, DataKey] = {}
        for signal in self._read_signals():
            keys.update(await signal.describe())
        return keys

    def _data_keys(self, arrays: list[StoredArray], mode: Mode) -> dict[str, DataKey]:
        source = self.last_file.source
        return {array.data_key: array.data_key_description(mode, source) for array in arrays}

    async def describe_configuration(self) -> dict[str, DataKey]:
        keys: dict[str, DataKey] = {}
        for signal in self._configuration_signals():
            keys.update(await signal.describe())
        return keys

    async def read_configuration(self) -> dict[str, Reading]:
        readings: dict[str, Reading] = {}
        for signal in self._configuration_signals():
            readings.update(await signal.read(cached=False))
        return readings

    def _configuration_signals(self) -> list[SignalR]:
        return [self.file_template, self.file_path, self.file_name, self.auto_increment,
                self.channels]

    # ---- fly scans: a file, an event per row ---------------------------------------

    @AsyncStatus.wrap
    async def kickoff(self) -> None:
        self._fly_arrays = None
        self._earlier = ()
        self._kicked_off = await self._start()

    @AsyncStatus.wrap
    async def complete(self) -> None:
        if self._kicked_off is None:
            raise AcquisitionFailed(f"{self.name}: complete() without kickoff()")
        started, self._kicked_off = self._kicked_off, None
        path = await self._stop(started)
        streams = by_stream(stored_arrays(path, self.name, Mode.FLY))
        self._fly_arrays = streams.pop("", [])
        self._pending = list(resource_documents(path, self._fly_arrays, Mode.FLY))
        self._earlier = tuple(EarlierDefinition(self.name, suffix, path, arrays,
                                                self.last_file.source)
                              for suffix, arrays in streams.items())

    @property
    def earlier_definitions(self) -> tuple[EarlierDefinition, ...]:
        """The last fly scan's earlier definitions of channels (``data(k)``), each to be
        collected into an event stream of its own."""
        return self._earlier

    async def describe_collect(self) -> dict[str, DataKey]:
        if self._fly_arrays is None:
            raise AcquisitionFailed(
                f"{self.name}: describe_collect() before complete(): the data keys are "
                f"those of the file, known once it is closed (declare the stream after "
                f"complete, as fly_scan does)")
        return self._data_keys(self._fly_arrays, Mode.FLY)

    async def collect_asset_docs(self, index: int | None = None
                                 ) -> AsyncIterator[StreamAsset]:
        pending, self._pending = self._pending, []
        for document in pending:
            yield document

    async def get_index(self) -> int:
        if not self._fly_arrays:
            return 0
        return self._fly_arrays[0].rows

    # ---- one acquisition: start, stop, the file closed ---------------------------------

    async def _start(self) -> _Started:
        """Start as the length says: at a pulse id, or with ``START_NOW``."""
        started = _Started(last_file=await self.last_file.get_value(), first=None,
                           previous_first=await self.first_pulse_id.get_value())
        length = self.length
        if length.seconds is not None:
            signal, value = self.start_now, "Do"
        elif length.pulse_range is not None:
            signal, value = self.start_pulse_id, length.pulse_range[0]
        else:
            newest = await self.stream_pulse_id.get_value()
            if newest == 0:
                raise AcquisitionFailed(f"{self.name}: the IOC has received no stream "
                                        f"yet (LAST_PULSE_ID is 0)")
            signal, value = self.start_pulse_id, newest + 1
            started = replace(started, first=value)
        await self._put(signal, value, "start refused")
        state = await self.state.get_value()
        if state not in RUNNING_STATES and not (
                state == "IDLE" and await self.last_file.get_value() != started.last_file):
            await self._refused(signal, value, "start refused")
        return started

    async def _stop(self, started: _Started) -> Path:
        """Stop at the last pulse id of the length; the file, once closed."""
        length = self.length
        if length.seconds is not None:
            first = await self._first_row(started.previous_first)
            rate = await self.pulse_rate.get_value()
            last = first + max(1, round(length.seconds * rate)) - 1
        elif length.pulse_range is not None:
            last = length.pulse_range[1]
        else:
            assert started.first is not None and length.pulses is not None
            last = started.first + length.pulses - 1
        await self._put(self.stop_pulse_id, last, "stop refused")
        state, last_file = await self.state.get_value(), await self.last_file.get_value()
        if state == "ERROR":
            raise AcquisitionFailed(f"{self.name}: writing failed: "
                                    f"{await self.message.get_value()}")
        if state in RUNNING_STATES:
            message = await self.message.get_value()
            await self._abort_if_running()
            raise AcquisitionFailed(f"{self.name}: stop refused: {message}")
        if last_file == started.last_file:
            raise AcquisitionFailed(f"{self.name}: no file was closed: "
                                    f"{await self.message.get_value()}")
        return Path(last_file)

    async def _first_row(self, previous: int) -> int:
        """The pulse id of the running file's first row, once it has one (until then
        ``FILE_FIRST_PULSE_ID`` is 0; ``previous``, its value before the start, may
        still come from a monitor that had not heard of the start)."""
        updates = observe_signals_value(self.first_pulse_id, self.state,
                                        done_timeout=self.timeout)
        try:
            async with aclosing(updates):
                async for signal, value in updates:
                    if signal is self.first_pulse_id and value not in (0, previous):
                        return int(value)
                    # A monitor's value may be older than the start: read it again.
                    if signal is self.state and value not in RUNNING_STATES and \
                            await self.state.get_value(cached=False) not in RUNNING_STATES:
                        break
        except TimeoutError:
            await self._abort_if_running()
            raise AcquisitionFailed(f"{self.name}: no row written in {self.timeout} s: "
                                    f"{await self.message.get_value()}") from None
        raise AcquisitionFailed(f"{self.name}: the acquisition ended before its first "
                                f"row: {await self.message.get_value()}")

    async def _put(self, signal: SignalW, value: Any, refusal: str) -> None:
        """Put and wait for its completion (a stop's: the file closed); a refusal
        fails with the IOC's reason."""
        try:
            await signal.set(value, timeout=self.timeout)
        except CANothing as error:
            await self._refused(signal, value, refusal, error)

    async def _refused(self, signal: SignalW, value: Any, refusal: str,
                       error: Exception | None = None) -> NoReturn:
        reason = await self.message.get_value()
        log.warning("%s: %s %s %r: %s", self.name, signal.source, refusal, value, reason)
        raise AcquisitionFailed(f"{signal.source.removeprefix('ca://')} {refusal} "
                                f"{value!r}: {reason}") from error

    async def _abort_if_running(self) -> None:
        if await self.state.get_value() in RUNNING_STATES:
            log.info("%s: aborting the running acquisition", self.name)
            await self._put(self.abort, "Do", "abort refused")


def _check_same_keys(name: str, path: Path, described: list[StoredArray],
                     arrays: list[StoredArray]) -> None:
    """A step scan's events share one descriptor: every file must give its keys."""
    if set(described) != set(arrays):
        differ = sorted({a.data_key for a in set(described) ^ set(arrays)})
        raise AcquisitionFailed(f"{name}: {path} differs from the run's first file in "
                                f"the data keys, their types or rows: {', '.join(differ)} "
                                f"(a step scan's files need the same channels and rows)")


def fly_scan(detector: SfbwDetector, info: SfbwFlyInfo | None = None, *,
             stream: str = "primary", md: dict[str, Any] | None = None) -> MsgGenerator:
    """One file as a fly scan: an event per pulse row in ``stream``, and an event per
    row of each earlier definition of a channel in ``<stream>-<channel>(k)``."""

    @bpp.stage_decorator([detector])
    @bpp.run_decorator(md=md)
    def inner() -> MsgGenerator:
        yield from bps.prepare(detector, info or SfbwFlyInfo(), wait=True)
        yield from bps.kickoff(detector, wait=True)
        yield from bps.complete(detector, wait=True)
        # The data keys are the file's: known once it is closed.
        yield from bps.declare_stream(detector, name=stream, collect=True)
        yield from bps.collect(detector, name=stream)
        for earlier in detector.earlier_definitions:
            name = f"{stream}-{earlier.suffix}"
            yield from bps.declare_stream(earlier, name=name, collect=True)
            yield from bps.collect(earlier, name=name)

    return (yield from inner())
