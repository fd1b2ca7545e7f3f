"""The group's decisions (sfbw_ioc.group.decisions), each transition and edge, without
Channel Access, asyncio or disk: the ``Coordinator`` only carries them out, and
test_group.py drives it end to end."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from sfbw_ioc.group.decisions import (
    Ending, GroupError, Seen, absent_outcome, all_writing, closed_outcome,
    configuration_refused, ending, failed_outcome, idle_stop, master_failed,
    newest_pulse_id, ready_members, refusal_stands, seen, some_started, start_pulse,
    start_refused, started_message, stop_pulse, unready_reason)
from sfbw_ioc.group.master import ABSENT, FAILED, WRITTEN, MasterSummary, MemberOutcome
from sfbw_ioc.group.member import file_name
from sfbw_ioc.vocabulary import State

MASTER = Path("/data/group/run.h5")


@dataclass(frozen=True)
class Monitored:
    """What a member's monitors showed: the ``MemberSeen`` the decisions take."""

    prefix: str
    connected: bool = True
    state: str | None = "IDLE"
    last_pulse_id: int | None = None

    @property
    def name(self) -> str:
        return file_name(self.prefix)


def gone(prefix: str) -> Monitored:
    return Monitored(prefix, connected=False, state=None)


def written(prefix: str) -> MemberOutcome:
    return MemberOutcome(prefix, prefix.rstrip(":"), WRITTEN, f"/m/{prefix}.h5", 10, 0, 0)


def failed(prefix: str) -> MemberOutcome:
    return failed_outcome(Monitored(prefix), "disconnected")


def absent(prefix: str) -> MemberOutcome:
    return absent_outcome(Monitored(prefix), f"member {prefix} not connected")


# ---- which members start -------------------------------------------------------------

@pytest.mark.parametrize("member, reason", [
    (Monitored("A:", state="IDLE"), None),
    (Monitored("A:", state="ERROR"), None),  # an old failure does not keep it from starting
    (Monitored("A:", state="WAITING"), "busy (WAITING): stop it first"),
    (Monitored("A:", state="WRITING"), "busy (WRITING): stop it first"),
    (Monitored("A:", state="CLOSING"), "busy (CLOSING): stop it first"),
    (gone("A:"), "not connected"),
    (Monitored("A:", connected=False, state="IDLE"), "not connected"),
])
def test_unready_reason(member, reason):
    assert unready_reason(member) == reason


def test_all_ready_members_start():
    members = [Monitored("A:"), Monitored("B:", state="ERROR")]
    for allow_partial in (False, True):
        assert ready_members(members, allow_partial) == (members, [])


def test_an_unready_member_refuses_the_start_naming_every_unready_one():
    members = [Monitored("A:"), gone("B:"), Monitored("C:", state="WRITING")]
    with pytest.raises(GroupError) as refused:
        ready_members(members, allow_partial=False)
    assert str(refused.value) == ("member B: not connected; member C: busy (WRITING): "
                                  "stop it first: nothing started")


def test_allow_partial_starts_the_ready_members_and_notes_the_others_absent():
    members = [gone("A:"), Monitored("B:"), Monitored("C:", state="CLOSING")]
    ready, left_out = ready_members(members, allow_partial=True)
    assert ready == [members[1]]
    assert left_out == [
        MemberOutcome("A:", "A", ABSENT, message="member A: not connected"),
        MemberOutcome("C:", "C", ABSENT, message="member C: busy (CLOSING): stop it first")]


@pytest.mark.parametrize("members, reason", [
    ([], "the group has none"),
    ([gone("A:"), gone("B:")], "member A: not connected; member B: not connected"),
    ([Monitored("A:", state="WRITING")], "member A: busy (WRITING): stop it first"),
])
def test_allow_partial_with_no_member_ready_is_refused_saying_why(members, reason):
    with pytest.raises(GroupError, match=f"^no member can start: {re.escape(reason)}$"):
        ready_members(members, allow_partial=True)


# ---- the start pulse -----------------------------------------------------------------

def test_newest_pulse_id_is_the_highest_received():
    members = [Monitored("A:", last_pulse_id=20_000_000_005), Monitored("B:"),
               Monitored("C:", last_pulse_id=20_000_000_007)]
    assert newest_pulse_id(members) == 20_000_000_007


@pytest.mark.parametrize("members", [[], [Monitored("A:"), Monitored("B:")]])
def test_newest_pulse_id_without_any_received_is_refused(members):
    with pytest.raises(GroupError, match="^no member has received a message yet$"):
        newest_pulse_id(members)


def test_start_now_is_the_pulse_after_the_newest():
    ready = [Monitored("A:", last_pulse_id=100), Monitored("B:", last_pulse_id=103)]
    assert start_pulse(None, ready, pending_stop=None) == 104


def test_start_now_before_any_message_is_refused():
    with pytest.raises(GroupError, match="no member has received a message yet"):
        start_pulse(None, [Monitored("A:")], pending_stop=None)


def test_a_start_pulse_given_is_kept_whatever_the_members_received():
    assert start_pulse(50, [Monitored("A:")], pending_stop=None) == 50
    assert start_pulse(50, [Monitored("A:", last_pulse_id=900)], pending_stop=None) == 50


@pytest.mark.parametrize("start, stop", [(100, 100), (100, 150)])
def test_a_start_at_or_before_the_stop_already_set_is_kept(start, stop):
    assert start_pulse(start, [], pending_stop=stop) == start


def test_a_start_after_the_stop_already_set_is_refused():
    with pytest.raises(GroupError) as refused:
        start_pulse(101, [], pending_stop=100)
    assert str(refused.value) == "start 101 is after the stop already set (100)"


def test_start_now_after_the_stop_already_set_is_refused():
    with pytest.raises(GroupError, match=r"^start 104 is after the stop already set \(103\)$"):
        start_pulse(None, [Monitored("A:", last_pulse_id=103)], pending_stop=103)


# ---- members refusing the START ------------------------------------------------------

def test_no_refused_configuration_goes_on():
    configuration_refused([], allow_partial=False)


def test_a_refused_configuration_refuses_the_start_naming_every_refusal():
    refused = [absent_outcome(Monitored("A:"), "A: refused OUTPUT_FILE: exists already"),
               absent_outcome(Monitored("B:"), "B: is not connected")]
    with pytest.raises(GroupError) as error:
        configuration_refused(refused, allow_partial=False)
    assert str(error.value) == ("A: refused OUTPUT_FILE: exists already; "
                                "B: is not connected: nothing started")


def test_allow_partial_goes_on_without_the_members_refusing_their_configuration():
    configuration_refused([absent("A:")], allow_partial=True)


def test_no_refused_start_is_not_rolled_back():
    assert start_refused([], [Monitored("A:")], allow_partial=False) is None


def test_a_refused_start_rolls_back_the_started_members():
    refused = [absent_outcome(Monitored("C:"), "C: refused START_PULSE_ID: after the stop")]
    error = start_refused(refused, [Monitored("A:"), Monitored("B:")], allow_partial=False)
    assert isinstance(error, GroupError)
    assert str(error) == "C: refused START_PULSE_ID: after the stop; rolled back (ABORT): A:, B:"


def test_a_start_refused_by_every_member_has_nothing_to_roll_back():
    refused = [absent_outcome(Monitored("A:"), "A: refused START_PULSE_ID: no"),
               absent_outcome(Monitored("B:"), "B: refused START_PULSE_ID: never")]
    # Only the first refusal is told (see the report: the others are dropped).
    assert str(start_refused(refused, [], allow_partial=False)) == "A: refused START_PULSE_ID: no"


def test_allow_partial_does_not_roll_back_a_refused_start():
    assert start_refused([absent("C:")], [Monitored("A:")], allow_partial=True) is None


def test_some_member_started_goes_on():
    some_started(1, [absent("B:")])


def test_no_member_started_is_refused_naming_why():
    with pytest.raises(GroupError) as refused:
        some_started(0, [absent("A:"), absent_outcome(Monitored("B:"), "B: refused it")])
    assert str(refused.value) == "no member could start: member A: not connected; B: refused it"


def test_started_message():
    assert started_message(3, 104, MASTER, []) == (
        "3 members writing from pulse 104 for /data/group/run.h5")
    assert started_message(1, 104, MASTER, [absent("B:"), absent("C:")]) == (
        "1 members writing from pulse 104 for /data/group/run.h5 (2 absent: B:, C:)")


# ---- STOP ----------------------------------------------------------------------------

def test_a_stop_while_idle_is_kept_for_the_next_start():
    assert idle_stop(500) == "stop 500 set for the next start"


def test_stop_now_while_idle_is_refused():
    with pytest.raises(GroupError, match="^no group acquisition is running: nothing to stop$"):
        idle_stop(None)


@pytest.mark.parametrize("stop", [100, 101, 2**40])
def test_a_stop_at_or_after_the_start_is_kept(stop):
    assert stop_pulse(stop, 100, []) == stop


def test_a_stop_before_the_start_is_refused():
    with pytest.raises(GroupError) as refused:
        stop_pulse(99, 100, [Monitored("A:", last_pulse_id=200)])
    assert str(refused.value) == "stop 99 is before the start 100"


def test_stop_now_is_the_newest_pulse_of_the_running_members():
    running = [Monitored("A:", state="WRITING", last_pulse_id=180),
               Monitored("B:", state="WRITING", last_pulse_id=184)]
    assert stop_pulse(None, 100, running) == 184


def test_stop_now_before_a_start_in_the_future_is_refused():
    running = [Monitored("A:", state="WAITING", last_pulse_id=90)]
    with pytest.raises(GroupError, match="^stop 90 is before the start 100$"):
        stop_pulse(None, 100, running)


def test_stop_now_right_after_start_now_ends_at_the_start():
    """The members' LAST_PULSE_ID (2 Hz) still shows the pulse before the start."""
    running = [Monitored("A:", state="WRITING", last_pulse_id=99)]
    assert stop_pulse(None, 100, running, started_now=True) == 100
    assert stop_pulse(None, 100, [Monitored("A:", last_pulse_id=130)], started_now=True) == 130
    with pytest.raises(GroupError, match="^stop 99 is before the start 100$"):
        stop_pulse(99, 100, running, started_now=True)  # a stop asked for stays checked


@pytest.mark.parametrize("running", [[], [Monitored("A:", state="WRITING")]])
def test_stop_now_without_a_pulse_of_a_running_member_is_refused(running):
    with pytest.raises(GroupError, match="no member has received a message yet"):
        stop_pulse(None, 100, running)


@pytest.mark.parametrize("member, stands", [
    (Monitored("A:", state="WAITING"), True),
    (Monitored("A:", state="WRITING"), True),
    (Monitored("A:", state="CLOSING"), True),
    (Monitored("A:", state="IDLE"), False),
    (Monitored("A:", state="ERROR"), False),
    (gone("A:"), False),
])
def test_a_refused_stop_stands_only_while_the_member_runs(member, stands):
    assert refusal_stands(member) is stands


# ---- a member's close ----------------------------------------------------------------

def test_a_close_with_the_file_put_to_it_is_written():
    outcome = closed_outcome(Monitored("X:CAM:"), "runs/r1/X_CAM.h5",
                             "/sf/member/runs/r1/X_CAM.h5", 60, 2, 1)
    assert outcome == MemberOutcome("X:CAM:", "X_CAM", WRITTEN, "/sf/member/runs/r1/X_CAM.h5",
                                    written=60, missing=2, lost=1)


@pytest.mark.parametrize("last_file", [
    "",  # never wrote one
    "/sf/member/runs/r0/X_CAM.h5",  # an earlier acquisition's
    "/sf/member/otherruns/r1/X_CAM.h5",  # ends alike, but not at a folder boundary
    "/sf/member/runs/r1/X_CAM.h5.partial",
])
def test_a_close_without_the_file_put_to_it_is_no_file(last_file):
    assert closed_outcome(Monitored("X:CAM:"), "runs/r1/X_CAM.h5", last_file, 60, 0, 0) is None


def test_a_failed_member_names_itself_and_why():
    assert failed_outcome(Monitored("X:CAM:"), "disconnected") == MemberOutcome(
        "X:CAM:", "X_CAM", FAILED, message="member X:CAM: failed: disconnected")


# ---- a running member's monitors -----------------------------------------------------

@pytest.mark.parametrize("member, seen_running, change", [
    (gone("A:"), False, Seen.DISCONNECTED),
    (gone("A:"), True, Seen.DISCONNECTED),
    (Monitored("A:", state="WAITING"), False, Seen.WAITING),
    (Monitored("A:", state="WAITING"), True, Seen.WAITING),
    (Monitored("A:", state="WRITING"), False, Seen.WRITING),
    (Monitored("A:", state="CLOSING"), True, Seen.WRITING),
    (Monitored("A:", state="IDLE"), False, Seen.NOTHING),  # before it took the START
    (Monitored("A:", state="IDLE"), True, Seen.NOTHING),  # closed: the STOP tells
    (Monitored("A:", state="ERROR"), False, Seen.NOTHING),  # an ERROR from before
    (Monitored("A:", state="ERROR"), True, Seen.FAILED),
])
def test_what_a_running_members_change_means(member, seen_running, change):
    assert seen(member, seen_running) is change


@pytest.mark.parametrize("state, members, becomes_writing", [
    (State.WAITING, [True, True], True),
    (State.WAITING, [True, False], False),
    (State.WRITING, [True, True], False),  # it is already
    (State.ERROR, [True, True], False),  # an ERROR stays
    (State.CLOSING, [True, True], False),
])
def test_the_group_writes_once_every_member_writes(state, members, becomes_writing):
    assert all_writing(state, iter(members)) is becomes_writing


# ---- the end -------------------------------------------------------------------------

def summary(channels: int = 4, duplicates: tuple[str, ...] = ()) -> MasterSummary:
    return MasterSummary(MASTER, channels, list(duplicates))


def test_every_member_written_ends_idle():
    assert ending([written("A:"), written("B:")], summary()) == Ending(
        State.IDLE, "wrote /data/group/run.h5: 4 channels of 2 of 2 members", "")


def test_absent_members_end_idle_but_are_counted():
    assert ending([written("A:"), absent("B:")], summary(2)) == Ending(
        State.IDLE, "wrote /data/group/run.h5: 2 channels of 1 of 2 members", "")


def test_a_failed_member_ends_in_error_and_leads_the_message():
    end = ending([written("A:"), failed("B:"), failed("C:")], summary(2))
    failures = "member B: failed: disconnected; member C: failed: disconnected"
    assert end == Ending(State.ERROR, failures + "; wrote /data/group/run.h5: 2 channels "
                         "of 1 of 3 members", failures)


def test_channels_linked_once_only_are_told():
    end = ending([written("A:"), written("B:")], summary(3, ("X:T (B:)", "X:U (B:)")))
    assert end.message == ("wrote /data/group/run.h5: 3 channels of 2 of 2 members; "
                           "linked once only: X:T (B:), X:U (B:)")
    assert end.state is State.IDLE


def test_a_master_that_cannot_be_written_ends_in_error():
    error = PermissionError(13, "Permission denied")
    text = "master file /data/group/run.h5 failed: [Errno 13] Permission denied"
    assert master_failed([written("A:"), absent("B:")], MASTER, error) == Ending(
        State.ERROR, text, text)


def test_a_master_that_cannot_be_written_after_a_failed_member_tells_both():
    end = master_failed([failed("A:")], MASTER, OSError("disk full"))
    assert end.failures == end.message == (
        "member A: failed: disconnected; master file /data/group/run.h5 failed: disk full")
