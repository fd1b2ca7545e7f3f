"""The controller's published status and its tickets, with a real ring, a real acquisition
thread and real files in tmp_path (no IOC): every change reaches the listener once and in
order, the figures with it, and the tickets resolve with the statuses that tell them."""
from __future__ import annotations

import asyncio
import threading

import h5py
import pytest

from sfbw_ioc.acquisition.controller import AcquisitionController
from sfbw_ioc.acquisition.status import PublishedStatus, Ticket, pending
from sfbw_ioc.bsread import ChannelSpec, HeaderCache, encode_message, parse_main_header
from sfbw_ioc.stream.malformed import MalformedCounter
from sfbw_ioc.stream.message import RawMessage
from sfbw_ioc.stream.ring import RingBuffer
from sfbw_ioc.vocabulary import State, Status

PULSE0 = 10_000_000_000
GENERAL = {"user": "tester", "process": "pytest", "instrument": "SF-TEST"}
SPEC = ChannelSpec("SAR:VALUE", "float64", ())
TIMEOUT_S = 10


class Listener:
    """Collects the statuses handed over (from whatever thread)."""

    def __init__(self) -> None:
        self.statuses: list[Status] = []
        self._lock = threading.Lock()

    def __call__(self, status: Status) -> None:
        with self._lock:
            self.statuses.append(status)

    def seen(self) -> list[Status]:
        with self._lock:
            return list(self.statuses)


@pytest.fixture
def ring() -> RingBuffer:
    return RingBuffer(1000, 10**8)


@pytest.fixture
def controller(ring, tmp_path):
    controller = AcquisitionController(ring, MalformedCounter(), tmp_path, name="acquisition-7")
    controller.start_thread()
    yield controller
    controller.shutdown()


def send(ring: RingBuffer, first: int, last: int) -> None:
    cache = HeaderCache()
    for pulse_id in range(first, last + 1):
        frames = encode_message(pulse_id, pulse_id * 10, [(SPEC, float(pulse_id), 0)])
        header = cache.get(parse_main_header(frames[0]), frames[1])
        ring.append(RawMessage.pack(pulse_id, pulse_id * 10, header, frames))


def test_every_change_is_handed_over_once_in_order_with_the_figures(controller, ring, tmp_path):
    listener = Listener()
    controller.publish_to(listener)
    send(ring, PULSE0, PULSE0 + 599)  # more than a batch: figures come batch by batch
    controller.stop(PULSE0 + 599)  # while idle: kept for the start
    ticket = controller.start(PULSE0, "in_order.h5", GENERAL)
    closed = ticket.closed.result(TIMEOUT_S)

    statuses = listener.seen()
    assert [s.version for s in statuses] == list(range(statuses[0].version,
                                                       statuses[0].version + len(statuses)))
    assert statuses[-1] == closed == controller.status()
    states = [s.state for s in statuses]
    assert states[0] is State.IDLE and states[-2:] == [State.CLOSING, State.IDLE]
    writing = [s for s in statuses if s.state is State.WRITING]
    assert len(writing) >= 3  # 600 rows in batches of 256 at most
    assert [s.written for s in writing] == sorted(s.written for s in writing)
    assert all(s.first_pulse_id == PULSE0 for s in writing)
    assert writing[-1].last_pulse_id == PULSE0 + 599
    assert writing[-1].last_timestamp_ns == (PULSE0 + 599) * 10
    assert closed.written == 600 and closed.last_file == str(tmp_path / "in_order.h5")
    assert closed.file_bytes == (tmp_path / "in_order.h5").stat().st_size
    assert closed.missing == 0 and "reached the stop pulse" in closed.message
    with h5py.File(tmp_path / "in_order.h5") as f:
        assert f["data/SAR:VALUE/pulse_id"].shape[0] == 600


def test_a_stop_is_accepted_at_once_and_closed_with_its_file(controller, ring, tmp_path):
    ticket = controller.start(None, "stop.h5", GENERAL)
    assert ticket.accepted.result(0).state is State.WAITING
    send(ring, PULSE0, PULSE0 + 4)
    stop = controller.stop(PULSE0 + 9)
    accepted = stop.accepted.result(0)
    assert accepted.message == f"stopping at {PULSE0 + 9}"
    assert accepted.stop_pulse_id == PULSE0 + 9
    assert not stop.closed.done()
    send(ring, PULSE0 + 5, PULSE0 + 12)
    closed = stop.closed.result(TIMEOUT_S)
    assert ticket.closed.result(0) is closed  # one file, one end for every command of it
    assert closed.state is State.IDLE and closed.written == 10
    assert closed.version > accepted.version


def test_stop_now_carries_its_time(controller, ring):
    controller.start(None, "stop_now.h5", GENERAL)
    send(ring, PULSE0, PULSE0 + 2)
    stop = controller.stop(None)
    assert stop.accepted.result(0).stop_time is not None
    assert stop.closed.result(TIMEOUT_S).message.startswith("stopped")


def test_commands_while_idle_are_closed_at_once(controller):
    stop = controller.stop(PULSE0)
    assert stop.accepted.result(0) is stop.closed.result(0)
    assert stop.closed.result(0).stop_pulse_id == PULSE0
    abort = controller.abort()
    assert abort.closed.result(0) == controller.status()


def test_a_waiter_that_gives_up_does_not_cancel_the_ticket(controller, ring):
    ticket = controller.start(None, "given_up.h5", GENERAL)

    async def give_up() -> None:
        waiting = asyncio.ensure_future(asyncio.wrap_future(ticket.closed))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(give_up())
    assert not ticket.closed.cancelled()
    closed = controller.abort().closed.result(TIMEOUT_S)
    assert closed.state is State.IDLE and "aborted" in closed.message


def test_the_thread_is_named_for_the_acquisitions(controller):
    assert "acquisition-7" in [thread.name for thread in threading.enumerate()]


def test_a_listener_gets_the_current_status_first_then_each_version():
    published, listener = PublishedStatus(), Listener()
    published.change(message="before")
    published.listen(listener)
    published.change(state=State.WAITING)
    published.publish(Status(State.WRITING, written=3))
    assert [(s.version, s.state, s.message, s.written) for s in listener.seen()] == [
        (1, State.IDLE, "before", 0), (2, State.WAITING, "before", 0),
        (3, State.WRITING, "", 3)]


def test_a_ticket_of_nothing_to_close_and_futures_that_cannot_be_cancelled():
    status = Status(message="idle")
    ticket = Ticket.at_once(status)
    assert ticket.accepted.result(0) is status and ticket.closed.result(0) is status
    future = pending()
    assert not future.cancel()
    future.set_result(status)
    assert future.result(0) is status
