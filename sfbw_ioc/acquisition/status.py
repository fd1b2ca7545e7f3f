"""The controller's side of its status: one published, versioned ``Status`` whose every
change reaches the listener once and in order, and the futures its commands return."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..vocabulary import AcquisitionError, Status


class AcquisitionFailed(AcquisitionError):
    """Writing the file failed; ``status`` is the ERROR status that tells why."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a command returns. ``accepted`` resolves with the first status that shows
    the command taken. ``closed`` resolves with the status the acquisition ended with
    (IDLE, with its LAST_FILE; at once when nothing runs), or fails with
    ``AcquisitionFailed``. Neither can be cancelled: a consumer that stops waiting
    changes nothing."""

    accepted: Future[Status]
    closed: Future[Status]

    @classmethod
    def at_once(cls, status: Status, closed: Future[Status] | None = None) -> Ticket:
        """Accepted with ``status``; closed by ``closed`` (None: nothing to close)."""
        return cls(resolved(status), resolved(status) if closed is None else closed)


def pending() -> Future[Status]:
    """A future no consumer can cancel (it runs from the start): giving up waiting for
    it must neither change the acquisition nor fail the thread that resolves it."""
    future: Future[Status] = Future()
    future.set_running_or_notify_cancel()
    return future


def resolved(status: Status) -> Future[Status]:
    future = pending()
    future.set_result(status)
    return future


class PublishedStatus:
    """The current status and whom to hand each new version to. Its owner serialises
    the calls (the controller holds its lock), which keeps the versions in order."""

    def __init__(self) -> None:
        self.current = Status()
        self._listener: Callable[[Status], None] | None = None

    def listen(self, listener: Callable[[Status], None]) -> None:
        """Hand ``listener`` the current status now and every later one."""
        self._listener = listener
        listener(self.current)

    def publish(self, status: Status) -> Status:
        """Make ``status`` the next version and hand it over."""
        self.current = status = replace(status, version=self.current.version + 1)
        if self._listener is not None:
            self._listener(status)
        return status

    def change(self, **fields: Any) -> Status:
        """Publish the current status with ``fields`` changed."""
        return self.publish(replace(self.current, **fields))
