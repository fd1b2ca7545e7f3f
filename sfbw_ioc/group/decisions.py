"""The group's decisions, apart from carrying them out: which members can start, on which
pulse, whether a stop fits the start, what a member's close means, when a refused START
is rolled back, and the group's state and message at the end.

Pure: no Channel Access, no asyncio, no disk. The ``Coordinator`` asks, then acts; the
members are seen through what their monitors last told (``MemberSeen``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence, TypeVar

from ..vocabulary import State
from .master import ABSENT, FAILED, WRITTEN, MasterSummary, MemberOutcome

_STARTABLE = ("IDLE", "ERROR")  # member states from which a member can start
_RUNNING = ("WAITING", "WRITING", "CLOSING")


class GroupError(Exception):
    """A refused group command; the text is for the operator and names the member."""


class MemberSeen(Protocol):
    """A member as its monitors last showed it (a ``Member`` is one)."""

    @property
    def prefix(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def state(self) -> str | None: ...  # its STATE's name; None while disconnected

    @property
    def last_pulse_id(self) -> int | None: ...  # None: nothing received, or disconnected


_M = TypeVar("_M", bound=MemberSeen)


# ---- START ---------------------------------------------------------------------------

def unready_reason(member: MemberSeen) -> str | None:
    """Why the member cannot start now; None when it can."""
    if not member.connected:
        return "not connected"
    if member.state not in _STARTABLE:
        return f"busy ({member.state}): stop it first"
    return None


def absent_outcome(member: MemberSeen, message: str) -> MemberOutcome:
    """A member left out of the acquisition; ``message`` names it and says why."""
    return MemberOutcome(member.prefix, member.name, ABSENT, message=message)


def ready_members(members: Sequence[_M], allow_partial: bool
                  ) -> tuple[list[_M], list[MemberOutcome]]:
    """The members that can start, and the others as absent. Refused when one cannot
    start (unless ``allow_partial``), or none can."""
    ready, absent = [], []
    for member in members:
        why = unready_reason(member)
        if why is None:
            ready.append(member)
        else:
            absent.append(absent_outcome(member, f"member {member.prefix} {why}"))
    if absent and not allow_partial:
        raise GroupError(_messages(absent) + ": nothing started")
    if not ready:
        raise GroupError("no member can start: " + (_messages(absent) or "the group has none"))
    return ready, absent


def newest_pulse_id(members: Iterable[MemberSeen]) -> int:
    """The newest LAST_PULSE_ID of the members: what "now" is for START_NOW and STOP_NOW."""
    pulse_ids = [m.last_pulse_id for m in members if m.last_pulse_id is not None]
    if not pulse_ids:
        raise GroupError("no member has received a message yet")
    return max(pulse_ids)


def start_pulse(requested: int | None, ready: Sequence[MemberSeen],
                pending_stop: int | None) -> int:
    """The pulse every member starts on: the one asked for, or (None: START_NOW) the one
    after the newest any ready member received. Refused when after a stop already set."""
    start = newest_pulse_id(ready) + 1 if requested is None else requested
    if pending_stop is not None and pending_stop < start:
        raise GroupError(f"start {start} is after the stop already set ({pending_stop})")
    return start


def configuration_refused(refused: Sequence[MemberOutcome], allow_partial: bool) -> None:
    """Members that refused their OUTPUT_FILE or /general refuse the START (nothing is
    started yet), unless ``allow_partial``: then they are absent."""
    if refused and not allow_partial:
        raise GroupError(_messages(refused) + ": nothing started")


def start_refused(refused: Sequence[MemberOutcome], started: Sequence[MemberSeen],
                  allow_partial: bool) -> GroupError | None:
    """Members that refused START_PULSE_ID: the refusal of the whole START, to raise once
    the ``started`` ones are rolled back (ABORT); None when the START goes on (none
    refused, or ``allow_partial``: the refused ones are absent)."""
    if not refused or allow_partial:
        return None
    rolled = f"; rolled back (ABORT): {_names(started)}" if started else ""
    return GroupError(f"{refused[0].message}{rolled}")


def some_started(started: int, absent: Sequence[MemberOutcome]) -> None:
    """Refused when, with ``allow_partial``, every member was left out."""
    if not started:
        raise GroupError("no member could start: " + _messages(absent))


def started_message(started: int, start: int, master: Path,
                    absent: Sequence[MemberOutcome]) -> str:
    missing = f" ({len(absent)} absent: {_names(absent)})" if absent else ""
    return f"{started} members writing from pulse {start} for {master}{missing}"


# ---- STOP ----------------------------------------------------------------------------

def idle_stop(requested: int | None) -> str:
    """A stop while no acquisition runs: kept for the next START (the message to show);
    STOP_NOW (None) is refused."""
    if requested is None:
        raise GroupError("no group acquisition is running: nothing to stop")
    return f"stop {requested} set for the next start"


def stop_pulse(requested: int | None, start: int, running: Sequence[MemberSeen],
               started_now: bool = False) -> int:
    """The pulse every running member stops after: the one asked for, or (None:
    STOP_NOW) the newest any running member received. Refused when before the start,
    except a STOP_NOW after a START_NOW: the members' LAST_PULSE_ID, published twice a
    second, may not show the start (the newest + 1) yet, and the file then ends at it."""
    stop = newest_pulse_id(running) if requested is None else requested
    if requested is None and started_now:
        stop = max(stop, start)
    if stop < start:
        raise GroupError(f"stop {stop} is before the start {start}")
    return stop


def refusal_stands(member: MemberSeen) -> bool:
    """A member refused STOP or ABORT: if it still runs, the refusal goes to the operator
    and the acquisition goes on; if not, the member failed."""
    return member.connected and member.state in _RUNNING


def closed_outcome(member: MemberSeen, relative_file: str, last_file: str, written: int,
                   missing: int, lost: int) -> MemberOutcome | None:
    """A member whose STOP or ABORT completed: written if its LAST_FILE is the file put
    to it; None if not (it went idle before: its file failed, or someone else closed
    it)."""
    if not last_file.endswith("/" + relative_file):
        return None
    return MemberOutcome(member.prefix, member.name, WRITTEN, last_file, written, missing,
                         lost)


def failed_outcome(member: MemberSeen, reason: str) -> MemberOutcome:
    return MemberOutcome(member.prefix, member.name, FAILED,
                         message=f"member {member.prefix} failed: {reason}")


# ---- a running member's monitors -----------------------------------------------------

class Seen(enum.Enum):
    """What a change of a running member's monitors means."""

    NOTHING = enum.auto()  # not running yet, or an ERROR from before this acquisition
    WAITING = enum.auto()  # running, its start pulse not yet received
    WRITING = enum.auto()  # running, past its start pulse (writing or closing)
    DISCONNECTED = enum.auto()  # failed: gone
    FAILED = enum.auto()  # ERROR after it ran: its MESSAGE tells why


def seen(member: MemberSeen, seen_running: bool) -> Seen:
    """``seen_running``: its STATE already showed this acquisition."""
    if not member.connected:
        return Seen.DISCONNECTED
    if member.state in _RUNNING:
        return Seen.WAITING if member.state == "WAITING" else Seen.WRITING
    if member.state == "ERROR" and seen_running:
        return Seen.FAILED
    return Seen.NOTHING


def all_writing(state: State, writing_or_closed: Iterable[bool]) -> bool:
    """Whether the group goes from WAITING to WRITING: once every member writes (or is
    closed already); an ERROR stays."""
    return state is State.WAITING and all(writing_or_closed)


# ---- the end -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ending:
    """The group's state and message once the acquisition is over, and the failures'
    text for a STOP or ABORT that waited ("" when all went well)."""

    state: State
    message: str
    failures: str


def ending(outcomes: Sequence[MemberOutcome], summary: MasterSummary) -> Ending:
    """The master file is written: IDLE, or ERROR if a member failed (absent ones do not
    make an error: they were left out on purpose)."""
    failed = _failures(outcomes)
    written = sum(o.status == WRITTEN for o in outcomes)
    message = (f"wrote {summary.path}: {summary.channels} channels of {written} of "
               f"{len(outcomes)} members")
    if summary.duplicates:
        message += f"; linked once only: {', '.join(summary.duplicates)}"
    if failed:
        message = "; ".join(failed) + "; " + message
    return Ending(State.ERROR if failed else State.IDLE, message, "; ".join(failed))


def master_failed(outcomes: Sequence[MemberOutcome], master: Path,
                  error: Exception) -> Ending:
    text = "; ".join([*_failures(outcomes), f"master file {master} failed: {error}"])
    return Ending(State.ERROR, text, text)


def _names(items: Iterable[MemberSeen | MemberOutcome]) -> str:
    """The prefixes of members or outcomes, for a message."""
    return ", ".join(item.prefix for item in items)


def _messages(outcomes: Iterable[MemberOutcome]) -> str:
    return "; ".join(o.message for o in outcomes)


def _failures(outcomes: Iterable[MemberOutcome]) -> list[str]:
    return [o.message for o in outcomes if o.status == FAILED]
