"""The decisions of an acquisition (sfbw_ioc.acquisition.plan), without a thread, a ring
or a file: which messages of a batch go into the file, when the range is complete, when
a batch is gathered, what is missing, which commands are refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sfbw_ioc.acquisition.plan import (BATCH, BATCH_BYTES, FLUSH_INTERVAL_S, GATHER_S,
                                       STOP_GRACE_S, Bounds, Take, count_missing, flush_due,
                                       keep_gathering, range_message, refuse_start,
                                       runs_of_one_header, stop_while_idle)
from sfbw_ioc.bsread import DataHeader
from sfbw_ioc.stream.message import RawMessage
from sfbw_ioc.vocabulary import AcquisitionError, State, Status

PULSE0 = 10_000_000_000  # SwissFEL pulse ids are beyond 2**31
SEQ0 = 500  # ring seq of a batch's first message


def ids(*offsets: int) -> list[int]:
    return [PULSE0 + offset for offset in offsets]


def written(*offsets: int) -> np.ndarray:
    return np.array(ids(*offsets), dtype=np.int64)


# ---- which messages of a batch go into the file -------------------------------------

def test_a_start_in_the_past_skips_the_older_messages_but_moves_past_them():
    take = Bounds(PULSE0 + 2).take(ids(0, 1, 2, 3), SEQ0)
    assert take == Take(consumed=4, rows=[2, 3], done=None)


def test_start_now_takes_every_message():
    assert Bounds(None).take(ids(0, 1, 2), SEQ0) == Take(3, [0, 1, 2], None)


def test_a_stop_not_yet_reached_takes_everything_and_goes_on():
    bounds = Bounds(PULSE0, stop_pulse_id=PULSE0 + 100)
    assert bounds.take(ids(0, 1, 2), SEQ0) == Take(3, [0, 1, 2], None)


def test_the_stop_pulse_itself_completes_the_range():
    take = Bounds(PULSE0, stop_pulse_id=PULSE0 + 1).take(ids(0, 1, 2, 3), SEQ0)
    assert take == Take(2, [0, 1], f"reached the stop pulse {PULSE0 + 1}")


def test_a_stream_that_skips_the_stop_pulse_ends_before_the_next_message():
    take = Bounds(PULSE0, stop_pulse_id=PULSE0 + 5).take(ids(0, 4, 9), SEQ0)
    assert take == Take(2, [0, 1], f"the stream passed the stop pulse {PULSE0 + 5}")


def test_a_stop_set_before_the_start_while_idle_bounds_the_range():
    bounds = Bounds(PULSE0 + 2, stop_pulse_id=PULSE0 + 4)  # as START makes it
    take = bounds.take(ids(0, 1, 2, 3, 4, 5), SEQ0)
    assert take == Take(5, [2, 3, 4], f"reached the stop pulse {PULSE0 + 4}")


def test_a_start_and_stop_on_one_pulse_writes_that_pulse():
    take = Bounds(PULSE0 + 1, stop_pulse_id=PULSE0 + 1).take(ids(0, 1, 2), SEQ0)
    assert take == Take(2, [1], f"reached the stop pulse {PULSE0 + 1}")


def test_stop_now_writes_up_to_its_ring_seq():
    bounds = Bounds(None).stopping_now(SEQ0 + 1)
    assert bounds.take(ids(0, 1, 2, 3), SEQ0) == Take(2, [0, 1], "stopped")


def test_stop_now_at_the_batch_end_is_complete_with_the_batch():
    bounds = Bounds(None).stopping_now(SEQ0 + 2)
    assert bounds.take(ids(0, 1, 2), SEQ0) == Take(3, [0, 1, 2], "stopped")


def test_stop_now_with_nothing_new_is_complete_on_an_empty_batch():
    assert Bounds(None).stopping_now(SEQ0 - 1).take([], SEQ0) == Take(0, [], "stopped")


def test_stop_now_not_yet_reached_waits_on_an_empty_batch():
    assert Bounds(None).stopping_now(SEQ0 + 3).take([], SEQ0) == Take(0, [], None)


def test_stop_now_wins_over_a_stop_pulse_further_on():
    bounds = Bounds(PULSE0, stop_pulse_id=PULSE0 + 2).stopping_now(SEQ0)
    assert bounds.take(ids(0, 1, 2), SEQ0) == Take(1, [0], "stopped")


def test_an_empty_batch_without_a_stop_goes_on():
    assert Bounds(PULSE0).take([], SEQ0) == Take(0, [], None)


def test_pulse_ids_that_go_back_below_the_start_are_not_written():
    """A source restarted: its repeated low pulse ids are outside the range."""
    take = Bounds(PULSE0 + 10).take(ids(10, 11, 0, 1, 12), SEQ0)
    assert take == Take(5, [0, 1, 4], None)


# ---- a stop that arrives after the rows past it -------------------------------------

def test_rows_written_past_a_late_stop_are_cut():
    bounds = Bounds(PULSE0, stop_pulse_id=PULSE0 + 3)
    rows = written(0, 1, 2, 3, 4, 5)
    assert bounds.written_past_stop(int(rows[-1]))
    assert bounds.rows_before_stop(rows) == 4


def test_a_late_stop_before_every_row_leaves_none():
    bounds = Bounds(None, stop_pulse_id=PULSE0 - 1)
    assert bounds.written_past_stop(PULSE0 + 2)
    assert bounds.rows_before_stop(written(0, 1, 2)) == 0


def test_nothing_is_cut_without_a_stop_or_before_it_or_without_rows():
    assert not Bounds(PULSE0).written_past_stop(PULSE0 + 9)
    assert not Bounds(PULSE0, stop_pulse_id=PULSE0 + 9).written_past_stop(PULSE0 + 9)
    assert not Bounds(PULSE0, stop_pulse_id=PULSE0 + 9).written_past_stop(None)


# ---- stops and starts that are refused ----------------------------------------------

def test_a_stop_before_the_start_pulse_is_refused():
    with pytest.raises(AcquisitionError, match=f"stop {PULSE0 - 1} is before the start {PULSE0}"):
        Bounds(PULSE0).stopping_at(PULSE0 - 1, first_written=None)


def test_a_stop_before_start_nows_first_row_is_refused():
    with pytest.raises(AcquisitionError, match=f"is before the start {PULSE0 + 5}"):
        Bounds(None).stopping_at(PULSE0, first_written=PULSE0 + 5)


def test_a_stop_on_the_start_or_before_any_row_of_start_now_is_taken():
    assert Bounds(PULSE0).stopping_at(PULSE0, None).stop_pulse_id == PULSE0
    assert Bounds(None).stopping_at(PULSE0, None).stop_pulse_id == PULSE0


def test_a_later_stop_replaces_an_earlier_one():
    bounds = Bounds(PULSE0).stopping_at(PULSE0 + 5, None).stopping_at(PULSE0 + 9, None)
    assert bounds == Bounds(PULSE0, stop_pulse_id=PULSE0 + 9)


def test_a_start_is_refused_while_another_opens_its_file_or_one_runs():
    with pytest.raises(AcquisitionError, match="another START is being carried out"):
        refuse_start(True, None, PULSE0, None)
    running = Status(State.WRITING, file="/data/a.h5")
    with pytest.raises(AcquisitionError,
                       match=r"an acquisition is running \(WRITING, /data/a.h5\)"):
        refuse_start(False, running, PULSE0, None)


def test_a_start_after_the_stop_set_while_idle_is_refused():
    with pytest.raises(AcquisitionError,
                       match=f"start {PULSE0 + 1} is after the stop already set"):
        refuse_start(False, None, PULSE0 + 1, PULSE0)


def test_a_start_on_or_before_the_stop_set_while_idle_is_taken():
    refuse_start(False, None, PULSE0, PULSE0)
    refuse_start(False, None, PULSE0 - 5, PULSE0)
    refuse_start(False, None, None, PULSE0)  # START_NOW: the stop bounds what comes
    refuse_start(False, None, PULSE0, None)


def test_a_start_now_after_the_stop_set_while_idle_is_refused():
    # The next message comes after the newest: a stop on or before it leaves no row.
    for newest in (PULSE0, PULSE0 + 10):
        with pytest.raises(AcquisitionError,
                           match=f"start now \\(the stream is at pulse {newest}\\) is "
                                 f"after the stop already set \\({PULSE0}\\)"):
            refuse_start(False, None, None, PULSE0, newest)


def test_a_start_now_before_the_stop_set_while_idle_is_taken():
    refuse_start(False, None, None, PULSE0, PULSE0 - 1)
    refuse_start(False, None, None, PULSE0, None)  # nothing received yet: the stop bounds it
    refuse_start(False, None, None, None, PULSE0)


def test_a_stop_while_idle_is_kept_and_stop_now_is_refused():
    assert stop_while_idle(PULSE0) == PULSE0
    with pytest.raises(AcquisitionError, match="no acquisition is running: nothing to stop"):
        stop_while_idle(None)


def test_an_abort_or_stop_now_ends_the_range_early():
    assert not Bounds(PULSE0, stop_pulse_id=PULSE0 + 5).stopped_early
    assert Bounds(PULSE0).stopping_now(SEQ0).stopped_early
    assert Bounds(PULSE0, aborted=True).stopped_early


# ---- missing pulses -----------------------------------------------------------------

def test_gaps_are_counted_in_the_streams_own_step():
    assert count_missing(written(0, 1, 4, 5), None, None, 1) == 2
    assert count_missing(written(0, 10, 40, 50), None, None, 1) == 2


def test_pulses_before_the_first_row_and_after_the_last_are_missing():
    assert count_missing(written(20, 30), PULSE0, None, 1) == 2
    assert count_missing(written(0, 10), None, PULSE0 + 30, 1) == 2


def test_without_rows_nothing_is_missing():
    assert count_missing(written(), PULSE0, PULSE0 + 100, 1) == 0


def test_a_single_row_counts_in_the_buffers_step():
    assert count_missing(written(20), PULSE0, None, fallback_step=10) == 2


def test_pulse_ids_going_back_count_no_gap():
    assert count_missing(written(10, 11, 0, 1), None, None, 1) == 0


def test_the_stop_counts_only_for_a_complete_file_that_was_not_stopped_early():
    rows = written(0, 1, 2)
    bounds = Bounds(PULSE0, stop_pulse_id=PULSE0 + 5)
    assert bounds.missing(rows, 1, final=False) == 0
    assert bounds.missing(rows, 1, final=True) == 3
    assert bounds.stopping_now(SEQ0).missing(rows, 1, final=True) == 0
    assert Bounds(PULSE0, PULSE0 + 5, aborted=True).missing(rows, 1, final=True) == 0


def test_a_start_before_the_first_row_counts_while_writing():
    assert Bounds(PULSE0 - 2).missing(written(0, 1), 1, final=False) == 2


# ---- when the range ends without the stop pulse --------------------------------------

def test_a_silent_stream_passes_the_stop_by_its_clock_after_the_grace():
    bounds = Bounds(PULSE0, stop_pulse_id=PULSE0 + 10)
    # Last pulse PULSE0 at t=100 s, 100 Hz: PULSE0 + 10 is due at 100.1 s.
    at = 100.0 + 0.1 + STOP_GRACE_S
    assert not bounds.silent_past_stop(PULSE0, 100.0, at, pulse_rate=100.0)
    assert bounds.silent_past_stop(PULSE0, 100.0, at + 0.01, pulse_rate=100.0)


def test_the_clock_needs_a_stop_and_a_pulse_seen():
    assert not Bounds(PULSE0).silent_past_stop(PULSE0, 0.0, 1e6, 100.0)
    assert not Bounds(PULSE0, stop_pulse_id=PULSE0).silent_past_stop(None, 0.0, 1e6, 100.0)


# ---- gathering a batch ------------------------------------------------------------

def test_a_short_young_batch_is_gathered():
    assert keep_gathering(waiting=3, waiting_bytes=300, age=0.1, ending=False)


@pytest.mark.parametrize("waiting, waiting_bytes, age, ending", [
    (0, 0, 0.1, False),  # nothing waits: sleep on the ring instead
    (BATCH, 300, 0.1, False),  # full in messages
    (3, BATCH_BYTES, 0.1, False),  # full in bytes (large images)
    (3, 300, GATHER_S, False),  # old enough
    (3, 300, 0.1, True),  # the end of the range is in the ring: close quickly
])
def test_gathering_ends(waiting, waiting_bytes, age, ending):
    assert not keep_gathering(waiting, waiting_bytes, age, ending)


def test_the_range_is_ending_once_its_end_is_in_the_ring():
    assert Bounds(None).stopping_now(SEQ0).ending(None)
    bounds = Bounds(PULSE0, stop_pulse_id=PULSE0 + 5)
    assert bounds.ending(PULSE0 + 5) and bounds.ending(PULSE0 + 6)
    assert not bounds.ending(PULSE0 + 4)
    assert not bounds.ending(None)
    assert not Bounds(PULSE0).ending(PULSE0 + 100)


def test_a_flush_is_due_after_its_interval():
    assert not flush_due(10.0, 10.0 + FLUSH_INTERVAL_S - 0.01)
    assert flush_due(10.0, 10.0 + FLUSH_INTERVAL_S)


# ---- runs of one data header --------------------------------------------------------

def test_a_new_header_object_starts_a_new_run():
    first, second = DataHeader("a" * 32, ()), DataHeader("b" * 32, ())
    again = DataHeader("a" * 32, ())  # equal, but not the receiver's shared object

    def message(pulse_id: int, header: DataHeader) -> RawMessage:
        return RawMessage.pack(pulse_id, 0, header, [b"main"])

    messages = [message(0, first), message(1, first), message(2, second),
                message(3, first), message(4, again)]
    runs = runs_of_one_header(messages)
    assert [[m.pulse_id for m in run] for run in runs] == [[0, 1], [2], [3], [4]]
    assert runs_of_one_header([]) == []


# ---- what a START says ----------------------------------------------------------------

def test_the_start_message_tells_where_the_file_begins():
    target = Path("/data/f.h5")
    assert range_message(None, target, PULSE0, 1) == f"writing {target} from the next message"
    assert range_message(PULSE0, target, PULSE0, 1) == f"writing {target} from pulse {PULSE0}"
    assert range_message(PULSE0, target, None, 1) == f"writing {target} from pulse {PULSE0}"


def test_a_start_older_than_the_buffer_is_told_not_faked():
    target = Path("/data/f.h5")
    assert range_message(PULSE0, target, PULSE0 + 30, 10) == (
        f"start {PULSE0} is older than the buffer: pulses {PULSE0}..{PULSE0 + 29} are "
        f"gone, writing {target} from {PULSE0 + 30}")
    # Less than one step of the stream: the first pulse is just not on the grid.
    assert range_message(PULSE0, target, PULSE0 + 5, 10) == f"writing {target} from pulse {PULSE0}"
