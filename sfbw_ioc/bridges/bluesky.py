"""An ophyd device for one writer of the IOC, to use as a detector in Bluesky plans.

``SfbwWriter("SFBW:", name="sfbw")`` drives writer 1 (``writer="W2:"`` another one):

- ``stage()`` composes the file name through the file-naming PVs (``FILE_TEMPLATE``,
  ``FILE_PATH``, ``FILE_NAME``, ``AUTO_INCREMENT``, as given; ``FILE_NUMBER`` is the
  IOC's) and ``unstage()`` puts back what they were, after an ``ABORT`` if a file is
  still being written: the IOC is left idle.
- ``trigger()`` writes one file of the configured length (``set_length``): a number of
  pulse ids from the newest one received, a number of seconds (``START_NOW`` ...
  ``STOP_NOW``) or a fixed pulse range. Its status finishes when the file is closed
  (``STATE`` IDLE with a new ``LAST_FILE``) and fails with the IOC's ``MESSAGE`` when
  the start or stop is refused or the writer goes to ``STATE`` ERROR.
- ``read()`` gives the file (``LAST_FILE``), its first and last pulse id and
  ``WRITTEN``, ``MISSING``, ``LOST``.

Refusals fail at once with the IOC's reason on either of ophyd's control layers:
pyepics completes a refused put (without telling), caproto's client never does, so
there a put ends at the monitor update it causes (``_Updates``).

ophyd (the ``bluesky`` extra) is needed only to use the device: without it this module
imports and ``SfbwWriter(...)`` raises ImportError saying what to install.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any

try:
    import ophyd
    from ophyd import Component, Device, DeviceStatus, EpicsSignal, EpicsSignalRO
    from ophyd import FormattedComponent
    from ophyd.status import Status
except ImportError as error:  # the optional extra is not installed
    _OPHYD_MISSING: ImportError | None = error
else:
    _OPHYD_MISSING = None

log = logging.getLogger(__name__)

RUNNING_STATES = ("WAITING", "WRITING", "CLOSING")


class AcquisitionFailed(RuntimeError):
    """The IOC refused a start or stop, or its writer failed; the text says why."""


class AcquisitionLength:
    """What one ``trigger()`` writes: exactly one of a number of pulse ids (from the
    newest received on), a duration in seconds, or an inclusive pulse range."""

    def __init__(self, *, pulses: int | None = None, seconds: float | None = None,
                 pulse_range: tuple[int, int] | None = None) -> None:
        given = [value is not None for value in (pulses, seconds, pulse_range)]
        if sum(given) != 1:
            raise ValueError("give exactly one of pulses, seconds, pulse_range")
        if pulses is not None and (int(pulses) != pulses or pulses < 1):
            raise ValueError(f"pulses must be a whole number of 1 or more, not {pulses!r}")
        if seconds is not None and not seconds > 0:
            raise ValueError(f"seconds must be more than 0, not {seconds!r}")
        if pulse_range is not None:
            first, last = pulse_range
            if int(first) != first or int(last) != last or not 0 <= first <= last:
                raise ValueError(f"pulse_range must be (first, last) pulse ids with "
                                 f"0 <= first <= last, not {pulse_range!r}")
            pulse_range = (int(first), int(last))
        self.pulses = None if pulses is None else int(pulses)
        self.seconds = seconds
        self.pulse_range = pulse_range

    def __repr__(self) -> str:
        if self.pulses is not None:
            return f"AcquisitionLength(pulses={self.pulses})"
        if self.seconds is not None:
            return f"AcquisitionLength(seconds={self.seconds})"
        return f"AcquisitionLength(pulse_range={self.pulse_range})"


if _OPHYD_MISSING is None:

    class _WholeNumber(EpicsSignalRO):
        """A count or pulse id the IOC serves as float64 (CA has no 64-bit integer),
        read as the integer it is."""

        def get(self, **kwargs: Any) -> int:
            return int(super().get(**kwargs))

        def describe(self) -> dict[str, dict[str, Any]]:
            description = super().describe()
            description[self.name]["dtype"] = "integer"  # ophyd infers it from a float
            return description

    class _Updates:
        """The monitor updates of a PV, to end a put at the update it causes.

        caproto's threading client (ophyd's caproto control layer) never completes a
        put the IOC refuses: it drops the server's error. Each put publishes exactly
        one update, though, once the IOC has taken or refused it (after the putter,
        a stop's once the file is closed): on that layer a put is a plain put and the
        next update of its PV is its completion. The updates come on a client context
        of their own, where the subscription is the only one and its first update (the
        value as it is) is sure to come, before any put."""

        _context: Any = None
        _of_pv: dict[str, _Updates] = {}
        _lock = threading.Lock()

        @classmethod
        def of(cls, pvname: str, timeout: float) -> _Updates:
            with cls._lock:
                if cls._context is None:
                    from caproto.threading.client import Context
                    cls._context = Context()
                if pvname not in cls._of_pv:
                    cls._of_pv[pvname] = cls(pvname, timeout)
                return cls._of_pv[pvname]

        def __init__(self, pvname: str, timeout: float) -> None:
            self._pvname = pvname
            self._updates: queue.Queue[object] = queue.Queue()
            (pv,) = self._context.get_pvs(pvname, timeout=timeout)
            pv.wait_for_connection(timeout=timeout)
            self._subscription = pv.subscribe(data_type="time")
            # caproto keeps a weak reference: a method of this object, which is kept
            self._subscription.add_callback(self._on_update)
            self._next(timeout)  # the subscription's first, before any put

        def _on_update(self, subscription: object, update: object) -> None:
            self._updates.put(update)

        def put(self, signal: EpicsSignal, value: Any, timeout: float) -> None:
            # Updates of others' puts before ours are no answer to it (a put of
            # another client's during ours would be taken for its answer: the checks
            # after it still read what the IOC holds).
            while not self._updates.empty():
                self._updates.get_nowait()
            signal.put(value, use_complete=False)
            self._next(timeout)

        def _next(self, timeout: float) -> None:
            try:
                self._updates.get(timeout=timeout)
            except queue.Empty:
                raise AcquisitionFailed(f"{self._pvname}: no answer from the IOC in "
                                        f"{timeout} s") from None

    class _Setting(EpicsSignal):
        """A file-naming PV of the writer. pyepics does not report a put the IOC
        refuses (and the IOC's next command replaces its MESSAGE): ``set`` reads the
        value back and fails with the reason when it was refused."""

        def set(self, value: Any, **kwargs: Any) -> Status:
            checked = Status(self)
            threading.Thread(target=self._set_and_check, args=(value, checked),
                             name=f"{self.name}-set", daemon=True).start()
            return checked

        def _set_and_check(self, value: Any, checked: Status) -> None:
            try:
                self.parent._put(self, value)
                if self.get() != value:
                    raise AcquisitionFailed(f"{self.pvname} refused {value!r}: "
                                            f"{self.parent.message.get()}")
            except Exception as error:  # noqa: BLE001  (the status carries any failure)
                checked.set_exception(error)
            else:
                checked.set_finished()

    def _control(suffix: str, **kwargs: Any) -> Component:
        # Put completion: each put returns when the IOC has taken (or refused) it; a
        # stop's returns when the file is closed.
        return Component(EpicsSignal, suffix, put_complete=True, kind="omitted",
                         auto_monitor=False, **kwargs)

    def _setting(suffix: str) -> Component:
        return Component(_Setting, suffix, string=True, put_complete=True,
                         kind="config", auto_monitor=False)

    def _text(suffix: str, kind: str = "omitted") -> Component:
        return Component(EpicsSignalRO, suffix, string=True, kind=kind, auto_monitor=False)

    def _number(suffix: str, kind: str = "normal") -> Component:
        return Component(_WholeNumber, suffix, kind=kind, auto_monitor=False)

    class SfbwWriter(Device):
        """One writer of an sfbw-ioc (``prefix`` the IOC's, ``writer`` e.g. "W2:"),
        writing one file per ``trigger()``. Every read is a fresh Channel Access read
        (``auto_monitor`` off), so ``read()`` right after a trigger sees its file."""

        file_template = _setting("FILE_TEMPLATE")
        file_path = _setting("FILE_PATH")
        file_name = _setting("FILE_NAME")
        auto_increment = _setting("AUTO_INCREMENT")
        output_file = _text("OUTPUT_FILE")
        start_pulse_id = _control("START_PULSE_ID")
        stop_pulse_id = _control("STOP_PULSE_ID")
        start_now = _control("START_NOW")
        stop_now = _control("STOP_NOW")
        abort = _control("ABORT")
        state = _text("STATE")
        message = _text("MESSAGE")

        last_file = _text("LAST_FILE", kind="normal")
        first_pulse_id = _number("FILE_FIRST_PULSE_ID")
        last_pulse_id = _number("FILE_LAST_PULSE_ID")
        written = _number("WRITTEN")
        missing = _number("MISSING")
        lost = _number("LOST")

        # the stream's newest pulse id: an IOC PV, not the writer's
        stream_pulse_id = FormattedComponent(_WholeNumber, "{_ioc_prefix}LAST_PULSE_ID",
                                             kind="omitted", auto_monitor=False)

        def __init__(self, prefix: str, *, name: str, writer: str = "",
                     length: AcquisitionLength | None = None,
                     file_path: str | None = None, file_name: str | None = None,
                     file_template: str | None = None, auto_increment: bool = True,
                     timeout: float = 600.0, **kwargs: Any) -> None:
            """``length``: see ``set_length`` (default 100 pulses). ``file_*``: the
            naming PVs' values while staged (None: the IOC's as they are).
            ``timeout``: the longest a put may take, a stop's until the file is closed."""
            self._ioc_prefix = prefix
            super().__init__(prefix + writer, name=name, **kwargs)
            self.length = length or AcquisitionLength(pulses=100)
            self.timeout = timeout
            naming = ((self.file_template, file_template), (self.file_path, file_path),
                      (self.file_name, file_name),
                      (self.auto_increment, "Yes" if auto_increment else "No"))
            self.stage_sigs.update((signal, value) for signal, value in naming
                                   if value is not None)
            self._halt = threading.Event()
            self._worker: threading.Thread | None = None

        def set_length(self, *, pulses: int | None = None, seconds: float | None = None,
                       pulse_range: tuple[int, int] | None = None) -> None:
            """What the next triggers write: ``pulses`` pulse ids from the one after the
            newest received (the IOC's ``LAST_PULSE_ID``, which it publishes twice a
            second: the start is then up to half a second in the past, taken from the
            buffer), or ``seconds`` from the next message on, or the inclusive
            ``pulse_range`` (first, last)."""
            self.length = AcquisitionLength(pulses=pulses, seconds=seconds,
                                            pulse_range=pulse_range)

        # ---- the Bluesky interface ---------------------------------------------------

        def trigger(self) -> DeviceStatus:
            status = DeviceStatus(self)
            self._worker = threading.Thread(target=self._acquire, args=(status,),
                                            name=f"{self.name}-trigger", daemon=True)
            self._worker.start()
            return status

        def unstage(self) -> list[object]:
            self._halt.set()  # a trigger waiting out its seconds stops now
            self._abort_if_running()  # ... and one waiting for its stop pulse
            if self._worker is not None:
                self._worker.join(self.timeout)
                self._worker = None
            self._abort_if_running()  # a start put that raced the first abort
            self._halt.clear()
            return super().unstage()

        # ---- one acquisition, in a thread of its own ---------------------------------

        def _acquire(self, status: DeviceStatus) -> None:
            try:
                before = self.last_file.get()
                first = self._start()
                self._check_started(before)
                self._stop(first)
                self._check_closed(before)
                if self._halt.is_set():
                    raise AcquisitionFailed(f"{self.name}: unstaged during the "
                                            f"acquisition; its file was closed early")
            except Exception as error:  # noqa: BLE001  (the status carries any failure)
                log.warning("%s: acquisition failed: %s", self.name, error)
                status.set_exception(error)
            else:
                status.set_finished()

        def _start(self) -> int | None:
            """Start; the first pulse id when the length is counted in pulses."""
            if self._halt.is_set():
                raise AcquisitionFailed(f"{self.name}: unstaged before the start")
            length = self.length
            if length.seconds is not None:
                self._put(self.start_now, 1)
                return None
            if length.pulse_range is not None:
                self._put(self.start_pulse_id, length.pulse_range[0])
                return None
            newest = self.stream_pulse_id.get()
            if newest == 0:
                raise AcquisitionFailed(f"{self.name}: the IOC has received no "
                                        f"stream yet (LAST_PULSE_ID is 0)")
            self._put(self.start_pulse_id, newest + 1)
            return newest + 1

        def _stop(self, first: int | None) -> None:
            length = self.length
            if length.seconds is not None:
                self._halt.wait(length.seconds)  # the acquisition's length
                self._put(self.stop_now, 1)
            elif length.pulse_range is not None:
                self._put(self.stop_pulse_id, length.pulse_range[1])
            else:
                assert first is not None and length.pulses is not None
                self._put(self.stop_pulse_id, first + length.pulses - 1)

        def _put(self, signal: EpicsSignal, value: Any) -> None:
            """Put and wait until the IOC has taken or refused it. Neither control
            layer tells a refused put: the checks after it read what the IOC shows."""
            if ophyd.cl.name != "caproto":
                # EpicsSignal's own: a _Setting's set() is this put and its check
                EpicsSignal.set(signal, value, timeout=self.timeout).wait()
                return
            _Updates.of(signal.setpoint_pvname, self.timeout).put(signal, value, self.timeout)

        def _check_started(self, before: str) -> None:
            state = self.state.get()
            if state in RUNNING_STATES or (state == "IDLE" and self.last_file.get() != before):
                return
            raise AcquisitionFailed(f"{self.name}: start refused: {self.message.get()}")

        def _check_closed(self, before: str) -> None:
            state, message = self.state.get(), self.message.get()
            if state == "ERROR":
                raise AcquisitionFailed(f"{self.name}: writing failed: {message}")
            if state in RUNNING_STATES:  # the stop was refused
                self._abort_if_running()
                raise AcquisitionFailed(f"{self.name}: stop refused: {message}")
            if self.last_file.get() == before:
                raise AcquisitionFailed(f"{self.name}: no file was closed: {message}")

        def _abort_if_running(self) -> None:
            if self.state.get() in RUNNING_STATES:
                log.info("%s: aborting the running acquisition", self.name)
                self._put(self.abort, 1)

else:

    class SfbwWriter:  # type: ignore[no-redef]
        """Stands in for the device when ophyd is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("sfbw_ioc.bluesky.SfbwWriter needs ophyd: "
                              "pip install 'sfbw-ioc[bluesky]'") from _OPHYD_MISSING
