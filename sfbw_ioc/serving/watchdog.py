"""A watchdog for the IOC's Channel Access server: exit when it stops answering.

A deaf server in a live process (its event loop stuck writing to a stalled log pipe,
its accept loop out of file descriptors, a caproto task dead) looks healthy to a
supervisor. ``Watchdog`` is a plain thread that expects ``beat()`` at least every
``timeout_s`` seconds; the beats come from ``caprobe.CaProbe``, a real CA read of the
IOC's own PV. When they stop, the watchdog calls ``on_stale`` — by default
``exit_process``: a CRITICAL log line (best effort) and ``os._exit(EXIT_STALLED)``, so
that systemd (``Restart=on-failure``) starts the IOC again.

The watchdog cannot rely on anything the stalled server might hold: it never waits for
the event loop, and it does not wait more than a second for its own log line (the log
stream may be what is blocked).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

EXIT_STALLED = 70  # EX_SOFTWARE: an internal error, the supervisor should restart
_LOG_GRACE_S = 1.0


def exit_process(age_s: float, timeout_s: float) -> None:
    """Log a CRITICAL line if the log stream takes it within a second, then exit."""
    logger = threading.Thread(
        target=log.critical, daemon=True, name="watchdog-log",
        args=("Channel Access has not answered for %.1f s (limit %.1f s): exiting "
              "with status %d so that the supervisor restarts the IOC",
              age_s, timeout_s, EXIT_STALLED))
    logger.start()
    logger.join(_LOG_GRACE_S)
    os._exit(EXIT_STALLED)


class Watchdog:
    """Calls ``on_stale(age_s, timeout_s)`` once when no ``beat()`` came for
    ``timeout_s`` seconds (counted from ``start()`` until the first beat)."""

    def __init__(self, timeout_s: float,
                 on_stale: Callable[[float, float], None] = exit_process,
                 check_interval_s: float | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self.timeout_s = timeout_s
        self._on_stale = on_stale
        self._check_interval_s = check_interval_s or min(0.5, timeout_s / 4)
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-watchdog", daemon=True)
        self.fired = threading.Event()

    def beat(self) -> None:
        """Called from the watched loop: it is alive now. (A float store: no lock.)"""
        self._last_beat = time.monotonic()

    @property
    def age_s(self) -> float:
        return time.monotonic() - self._last_beat

    def start(self) -> None:
        self._last_beat = time.monotonic()
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop watching (e.g. when the loop ends on purpose, before a long shutdown)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._check_interval_s):
            age = self.age_s
            if age > self.timeout_s:
                self.fired.set()
                self._on_stale(age, self.timeout_s)
                return

