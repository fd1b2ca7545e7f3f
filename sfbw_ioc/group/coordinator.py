"""One acquisition across many member IOCs: the same start and stop pulse id on every
member, and the master file once all member files are closed.

Runs on the group IOC's asyncio loop; members are reached only through ``Member``
(Channel Access puts with callback, monitors). Disk work (the master file) goes to an
executor. What to do (which members, which pulses, what a close means, how it ended) is
decided in ``decisions``; this carries it out.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Mapping, Sequence

from ..output.ownership import KEEP
from ..output.root import OutputPathError, OutputRoot
from ..vocabulary import NOT_GIVEN, State
from .decisions import (GroupError, Seen, absent_outcome, all_writing, closed_outcome,
                        configuration_refused, ending, failed_outcome, idle_stop,
                        master_failed, ready_members, refusal_stands, seen, some_started,
                        start_pulse, start_refused, started_message, stop_pulse)
from .master import MemberOutcome, write_master
from .member import Member, MemberError, MemberRefused, MemberUnreachable

log = logging.getLogger(__name__)

_DO = 1  # a command PV's "Do", as its enum index


@dataclass(frozen=True, slots=True)
class GroupStatus:
    state: State = State.IDLE
    message: str = ""
    last_file: str = ""


@dataclass(frozen=True, slots=True)
class FileOwner:
    """FILE_UID and FILE_GID put to every member (-1: the member's own)."""

    uid: int = KEEP
    gid: int = KEEP


@dataclass(eq=False)
class _MemberRun:
    member: Member
    relative_file: str  # OUTPUT_FILE put to the member
    closed: asyncio.Future  # -> MemberOutcome
    seen_running: bool = False  # its STATE showed this acquisition (an old ERROR is not it)
    writing: bool = False


@dataclass(eq=False)
class _Run:
    master: Path
    general: Mapping[str, str]
    start_pulse_id: int
    members: list[_MemberRun]
    absent: list[MemberOutcome]
    started_now: bool = False  # the start was the newest pulse + 1 (START_NOW)
    stop_pulse_id: int | None = None
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def running(self) -> list[_MemberRun]:
        return [run for run in self.members if not run.closed.done()]


class Coordinator:
    """START/STOP/ABORT of the group; ``on_status`` is called on every change."""

    def __init__(self, members: Sequence[Member], output_root: Path, allow_partial: bool,
                 on_status: Callable[[], None]) -> None:
        self.members = list(members)
        self._root = OutputRoot(output_root)
        self.output_root = self._root.path
        self.allow_partial = allow_partial
        self._on_status = on_status
        self.status = GroupStatus()
        self._run: _Run | None = None
        self._starting = False
        self._pending_stop: int | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- status ----------------------------------------------------------------------

    def _set(self, state: State | None = None, message: str | None = None,
             last_file: str | None = None) -> None:
        status = self.status
        self.status = GroupStatus(status.state if state is None else state,
                                  status.message if message is None else message,
                                  status.last_file if last_file is None else last_file)
        if message:
            log.info("%s", message)
        self._on_status()

    def note(self, message: str) -> None:
        """Tell the operator (MESSAGE) without changing the state: a refused command."""
        self._set(message=message)

    def connected_count(self) -> int:
        return sum(member.connected for member in self.members)

    def _active(self) -> _Run | None:
        run = self._run
        return run if run is not None and not run.done.done() else None

    # ---- START -----------------------------------------------------------------------

    async def start(self, start_pulse_id: int | None, output_file: str,
                    general: Mapping[str, str], owner: FileOwner) -> None:
        """Start every member on the same pulse (None: the newest LAST_PULSE_ID of the
        members + 1), its files given to ``owner``. Raises ``GroupError`` when refused;
        nothing is left started then."""
        if self._starting or self._active() is not None:
            raise GroupError("a group acquisition is running: STOP or ABORT it first")
        self._starting = True
        try:
            await self._start(start_pulse_id, output_file, general, owner)
        finally:
            self._starting = False

    async def _start(self, start_pulse_id: int | None, output_file: str,
                     general: Mapping[str, str], owner: FileOwner) -> None:
        master, stem = await self.check_master(output_file)
        ready, absent = ready_members(self.members, self.allow_partial)
        start = start_pulse(start_pulse_id, ready, self._pending_stop)
        runs, refused = await self._start_members(ready, stem, start, general, owner)
        absent += refused
        self._run = run = _Run(master, dict(general), start, runs, absent,
                               started_now=start_pulse_id is None)
        self._spawn(self._finish(run))
        self._set(State.WAITING, started_message(len(runs), start, master, absent))
        if self._pending_stop is not None:
            stop, self._pending_stop = self._pending_stop, None
            self._spawn(self.stop(stop))

    async def check_master(self, output_file: str) -> tuple[Path, str]:
        """``resolve_master`` off the loop: the output root may be a slow shared file system."""
        return await asyncio.get_running_loop().run_in_executor(None, self.resolve_master,
                                                                output_file)

    async def _start_members(self, ready: list[Member], stem: str, start_pulse_id: int,
                             general: Mapping[str, str], owner: FileOwner
                             ) -> tuple[list[_MemberRun], list[MemberOutcome]]:
        """Configure, then start, every ready member: those started, and those left out
        (only with --allow-partial; otherwise a refusal is a GroupError, rolled back)."""
        loop = asyncio.get_running_loop()
        runs = [_MemberRun(member, f"{stem}/{member.name}.h5", loop.create_future())
                for member in ready]
        runs, refused = await self._each(runs, self._configure(general, owner))
        configuration_refused(refused, self.allow_partial)
        absent = refused
        runs, refused = await self._each(runs, self._start_member(start_pulse_id))
        refusal = start_refused(refused, [run.member for run in runs], self.allow_partial)
        if refusal is not None:
            await self._roll_back(runs)
            raise refusal
        absent += refused
        some_started(len(runs), absent)
        return runs, absent

    def resolve_master(self, output_file: str) -> tuple[Path, str]:
        """The master's absolute path and the members' file stem (relative), or why not."""
        try:
            return self._root.master(output_file)
        except OutputPathError as error:
            raise GroupError(str(error)) from error

    def _configure(self, general: Mapping[str, str], owner: FileOwner):
        async def configure(run: _MemberRun) -> None:
            await run.member.put("OUTPUT_FILE", run.relative_file)
            for key in ("USER", "PROCESS", "INSTRUMENT"):
                # caproto's server fails an empty CHAR waveform put; the member writes
                # NOT_GIVEN for an empty one anyway.
                await run.member.put(key, general.get(key.lower()) or NOT_GIVEN)
            # Always both, -1 too: what a member was given by hand must not last.
            await run.member.put("FILE_UID", owner.uid)
            await run.member.put("FILE_GID", owner.gid)
        return configure

    def _start_member(self, start_pulse_id: int):
        async def start(run: _MemberRun) -> None:
            await run.member.put("START_PULSE_ID", float(start_pulse_id))
        return start

    async def _each(self, runs: list[_MemberRun],
                    action: Callable[[_MemberRun], Awaitable[None]]
                    ) -> tuple[list[_MemberRun], list[MemberOutcome]]:
        """``action`` on every member at once: those that did it, and those that did
        not (why, naming the member)."""
        results = await asyncio.gather(*(action(run) for run in runs), return_exceptions=True)
        done, refused = [], []
        for run, result in zip(runs, results):
            if isinstance(result, MemberError):
                refused.append(absent_outcome(run.member, str(result)))
            elif isinstance(result, BaseException):
                raise result
            else:
                done.append(run)
        return done, refused

    async def _roll_back(self, runs: list[_MemberRun]) -> None:
        results = await asyncio.gather(*(run.member.put("ABORT", _DO) for run in runs),
                                       return_exceptions=True)
        for run, result in zip(runs, results):
            if isinstance(result, Exception):
                log.error("could not abort %s in the roll-back: %s", run.member.prefix, result)

    # ---- STOP, ABORT -----------------------------------------------------------------

    async def stop(self, stop_pulse_id: int | None) -> None:
        """Put the same stop to every running member (None: the newest LAST_PULSE_ID of
        them); returns when the master file is written. Idle: kept for the next START."""
        run = self._active()
        if run is None:
            message = idle_stop(stop_pulse_id)
            self._pending_stop = stop_pulse_id
            self._set(message=message)
            return
        stop = stop_pulse(stop_pulse_id, run.start_pulse_id,
                          [r.member for r in run.running()], run.started_now)
        run.stop_pulse_id = stop
        self._set(message=f"stopping at {stop}")
        await self._close_members(run, "STOP_PULSE_ID", float(stop))
        await self._until_done(run)

    async def abort(self) -> None:
        self._pending_stop = None
        run = self._active()
        if run is None:
            return
        self._set(message="aborting")
        await self._close_members(run, "ABORT", _DO)
        await self._until_done(run)

    async def _close_members(self, run: _Run, name: str, value) -> None:
        refusals = await asyncio.gather(*(self._close_member(run, member_run, name, value)
                                          for member_run in run.running()))
        refused = [text for text in refusals if text]
        if refused:
            raise GroupError("; ".join(refused))

    async def _close_member(self, run: _Run, member_run: _MemberRun, name: str,
                            value) -> str | None:
        """Put STOP or ABORT and wait for the member's file; a refusal of a member that
        still runs is returned (the put fails, the acquisition goes on)."""
        member = member_run.member
        try:
            await member.put(name, value, timeout=None)
        except MemberRefused as error:
            if refusal_stands(member):
                return str(error)
            self._member_failed(run, member_run, str(error))
            return None
        except MemberUnreachable as error:
            self._member_failed(run, member_run, str(error))
            return None
        await self._member_closed(run, member_run)
        return None

    async def _member_closed(self, run: _Run, member_run: _MemberRun) -> None:
        member = member_run.member
        try:
            last_file = await member.read("LAST_FILE")
            figures = [int(await member.read(n)) for n in ("WRITTEN", "MISSING", "LOST")]
        except MemberUnreachable as error:
            self._member_failed(run, member_run, str(error))
            return
        outcome = closed_outcome(member, member_run.relative_file, last_file, *figures)
        if outcome is None:
            self._member_failed(run, member_run, f"no file ({await member.message()})")
        elif not member_run.closed.done():
            member_run.closed.set_result(outcome)

    def _member_failed(self, run: _Run, member_run: _MemberRun, reason: str) -> None:
        if member_run.closed.done():
            return
        outcome = failed_outcome(member_run.member, reason)
        log.error("%s", outcome.message)
        member_run.closed.set_result(outcome)
        self._set(State.ERROR, outcome.message)

    async def _until_done(self, run: _Run) -> None:
        failures = await asyncio.shield(run.done)
        if failures:
            raise GroupError(failures)

    async def _finish(self, run: _Run) -> None:
        """Once every member is closed or failed: the master file, then IDLE or ERROR.
        ``run.done`` gets the failures' text ("" when all went well)."""
        outcomes = [*await asyncio.gather(*(r.closed for r in run.members)), *run.absent]
        if self.status.state is not State.ERROR:
            self._set(State.CLOSING)
        loop = asyncio.get_running_loop()
        try:
            summary = await loop.run_in_executor(None, write_master, run.master,
                                                 run.general, outcomes)
        except OSError as error:
            end = master_failed(outcomes, run.master, error)
            self._set(end.state, end.message)
        else:
            end = ending(outcomes, summary)
            self._set(end.state, end.message, str(summary.path))
        run.done.set_result(end.failures)

    # ---- member monitors -------------------------------------------------------------

    def member_changed(self, member: Member) -> None:
        """A member's STATE, LAST_FILE, LAST_PULSE_ID or connection changed (on the loop)."""
        self._on_status()
        run = self._active()
        if run is None:
            return
        for member_run in run.running():
            if member_run.member is member:
                self._follow(run, member_run)
        if all_writing(self.status.state, (r.writing or r.closed.done() for r in run.members)):
            self._set(State.WRITING)

    def _follow(self, run: _Run, member_run: _MemberRun) -> None:
        change = seen(member_run.member, member_run.seen_running)
        if change is Seen.DISCONNECTED:
            self._member_failed(run, member_run, "disconnected")
        elif change is Seen.FAILED:
            self._spawn(self._failed_with_reason(run, member_run))
        elif change is not Seen.NOTHING:
            member_run.seen_running = True
            member_run.writing = member_run.writing or change is Seen.WRITING

    async def _failed_with_reason(self, run: _Run, member_run: _MemberRun) -> None:
        self._member_failed(run, member_run, await member_run.member.message())

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            if isinstance(error, GroupError):
                self._set(message=str(error))
            else:
                log.error("group task failed", exc_info=error)
