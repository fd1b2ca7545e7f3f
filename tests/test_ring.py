"""The ring buffer: bounds, arrival order, look-up by pulse id, readers that fall behind."""
import os
import threading

import pytest

from sfbw_ioc.bsread import DataHeader
from sfbw_ioc.stream.message import LEND_LIMIT, RawMessage, stack_uniform
from sfbw_ioc.stream.ring import RingBuffer

HEADER = DataHeader("0" * 32, ())


def message(pulse_id: int, nbytes: int = 10) -> RawMessage:
    return RawMessage.pack(pulse_id, 0, HEADER, [b"x" * nbytes])


def filled(pulse_ids, max_messages=100, max_bytes=10**6) -> RingBuffer:
    ring = RingBuffer(max_messages, max_bytes)
    for pulse_id in pulse_ids:
        ring.append(message(pulse_id))
    return ring


def test_bounded_by_count_keeps_the_newest():
    ring = filled(range(100, 125), max_messages=10)
    stats = ring.stats()
    assert (stats.count, stats.oldest_pulse_id, stats.newest_pulse_id) == (10, 115, 124)
    assert stats.dropped == 15 and stats.next_seq == 25


def test_bounded_by_bytes():
    ring = RingBuffer(1000, max_bytes=35)
    for pulse_id in range(10):
        ring.append(message(pulse_id, nbytes=10))
    stats = ring.stats()
    assert stats.count == 3 and stats.nbytes == 30 and stats.oldest_pulse_id == 7


def test_a_message_larger_than_the_byte_budget_is_kept_alone():
    ring = RingBuffer(1000, max_bytes=35)
    ring.append(message(1))
    ring.append(message(2, nbytes=100))
    stats = ring.stats()
    assert (stats.count, stats.nbytes, stats.oldest_pulse_id) == (1, 100, 2)


def test_read_reports_what_the_ring_dropped_before_the_reader_came():
    ring = filled(range(20), max_messages=5)
    result = ring.read(3, 100)
    assert result.first_seq == 15 and result.lost == 12
    assert [m.pulse_id for m in result.messages] == [15, 16, 17, 18, 19]
    assert ring.read(20, 10).messages == [] and ring.read(20, 10).lost == 0


def test_read_takes_no_more_bytes_than_asked_but_always_one_message():
    ring = filled(range(10))  # 10 bytes each
    assert [m.pulse_id for m in ring.read(2, 100, max_bytes=35).messages] == [2, 3, 4]
    assert [m.pulse_id for m in ring.read(2, 100, max_bytes=5).messages] == [2]
    assert len(ring.read(0, 4, max_bytes=1000).messages) == 4


def test_find_start_in_a_monotonic_stream():
    ring = filled(range(100, 200, 10))
    assert ring.find_start(130) == 3
    assert ring.find_start(125) == 3  # between two pulses: the next one
    assert ring.find_start(50) == 0  # older than the buffer: from the oldest
    assert ring.find_start(500) == ring.next_seq  # future: wait for live messages


def test_find_start_takes_the_newest_run_after_a_source_restart():
    # The source restarted and sent the same pulse ids again.
    ring = filled([100, 101, 102, 103, 100, 101, 102])
    assert ring.find_start(101) == 5
    # A restart far below the start: the older run holds the start.
    ring = filled([100, 101, 102, 103, 5, 6])
    assert ring.find_start(101) == 1


def test_find_start_is_not_fooled_by_a_repeated_pulse():
    ring = filled([100, 101, 102, 102, 103])
    assert ring.find_start(101) == 1


def test_typical_pulse_step_ignores_gaps():
    assert filled([0, 10, 20, 30, 60, 70, 80]).typical_pulse_step() == 10
    assert filled([5]).typical_pulse_step() == 1


def test_wait_for_wakes_when_the_message_arrives():
    ring = RingBuffer(10, 1000)
    woke = threading.Event()

    def reader():
        if ring.wait_for(0, timeout=10):
            woke.set()

    thread = threading.Thread(target=reader)
    thread.start()
    ring.append(message(1))
    thread.join(10)
    assert woke.is_set()
    assert ring.wait_for(5, timeout=0.01) is False


def test_wait_for_also_wakes_when_a_pulse_id_arrives():
    ring = filled([100])
    woke = threading.Event()

    def reader():  # waits for seq 50, i.e. 49 more messages, or pulse id 102
        if ring.wait_for(50, timeout=10, pulse_id=102):
            woke.set()

    thread = threading.Thread(target=reader)
    thread.start()
    ring.append(message(101))
    assert not woke.wait(0.05)  # a pulse before 102 does not end the wait
    ring.append(message(102))
    thread.join(10)
    assert woke.is_set()
    assert ring.wait_for(50, timeout=0.01, pulse_id=103) is False


def test_a_message_keeps_its_parts_but_not_the_shared_data_header():
    frames = [b'{"main": 1}', b'{"data header": "parsed once"}', b"value", b"t" * 16, b"", b""]
    packed = RawMessage.pack(7, 0, HEADER, frames)
    assert [bytes(part) for part in packed.frames] == [frames[0], b"", *frames[2:]]
    assert packed.nbytes == sum(map(len, frames)) - len(frames[1])


def test_rejects_a_ring_without_room():
    with pytest.raises(ValueError):
        RingBuffer(0, 100)


def test_bytes_waiting_from_a_cursor_count_only_messages_still_held():
    ring = RingBuffer(4, 10**6)
    for pulse_id, nbytes in zip(range(6), (10, 20, 30, 40, 50, 60)):
        ring.append(message(pulse_id, nbytes))  # seqs 0 and 1 are evicted by count
    each = [packed.nbytes for packed in ring.read(0, 10).messages]
    assert ring.bytes_from(0) == ring.bytes_from(2) == sum(each) == ring.stats().nbytes
    assert ring.bytes_from(4) == each[2] + each[3]
    assert ring.bytes_from(5) == each[3]
    assert ring.bytes_from(6) == 0


def test_wait_for_batch_wakes_on_bytes_before_the_count():
    ring = RingBuffer(100, 10**6)
    woke = threading.Event()

    def reader():  # 50 messages or 250 bytes from seq 0 on
        if ring.wait_for_batch(0, 50, 250, timeout=10):
            woke.set()

    thread = threading.Thread(target=reader)
    thread.start()
    ring.append(message(1, nbytes=100))
    assert not woke.wait(0.05)  # 100 bytes are not yet a batch
    ring.append(message(2, nbytes=200))
    thread.join(10)
    assert woke.is_set()
    assert ring.wait_for_batch(0, 50, 10**6, timeout=0.01) is False
    assert ring.wait_for_batch(0, 2, 10**6, timeout=0.01) is True
    assert ring.wait_for_batch(5, 50, 10**6, timeout=0.01, pulse_id=2) is True


def test_newest_is_the_last_appended_or_the_last_one_accepted():
    assert RingBuffer(10, 1000).newest() is None
    ring = filled(range(100, 125), max_messages=10)
    assert ring.newest().pulse_id == 124
    assert ring.newest(lambda m: m.pulse_id % 5 == 0).pulse_id == 120
    # Only what the ring still holds: 100..114 were evicted.
    assert ring.newest(lambda m: m.pulse_id < 115) is None


def test_a_part_is_the_same_as_in_frames():
    parts = [b"main", b"dh", b"value0", b"ts0", b"", b"", b"value2", b"ts2"]
    raw = RawMessage.pack(1, 0, HEADER, parts)
    for index in range(2, len(parts)):
        assert bytes(raw.part(index)) == bytes(raw.frames[index]) == parts[index]


def test_an_image_is_kept_as_received_and_small_parts_are_packed():
    image = bytearray(os.urandom(LEND_LIMIT + 1))
    parts = [b"main", b"dh", b"v0", b"t" * 16, image, b"t" * 16, b"v2", b"t" * 16]
    raw = RawMessage.pack(1, 0, HEADER, parts)
    assert raw.lent == ((4, image),) and raw.lent[0][1] is image  # not copied
    assert raw.nbytes == sum(map(len, parts)) - len(b"dh")
    assert raw.values_nbytes == raw.nbytes - len(b"main")
    for index in range(2, len(parts)):
        assert bytes(raw.part(index)) == bytes(raw.frames[index]) == bytes(parts[index])
    assert stack_uniform([raw, raw]) is None  # an image is not stacked
