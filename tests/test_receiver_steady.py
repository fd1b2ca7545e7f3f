"""A steady stream (every part of an exact length) and what departs from its layout: stored
right, or counted as malformed, and the stream goes on; a message ends where ZeroMQ ends
it, never by the lengths the layout leads to expect."""
from __future__ import annotations

from sfbw_ioc.testing.ioc import IocProcess, poll, unique_prefix
from sfbw_ioc.testing.sources import BsreadSource, timestamp_for, value_for
from sfbw_ioc.testing.files import assert_rows
from sfbw_ioc.bsread import ChannelSpec, encode_message

STEADY = (
    ChannelSpec("ST:F64", "float64", ()),
    ChannelSpec("ST:I32", "int32", ()),
    ChannelSpec("ST:WF", "uint16", (64,)),
)
BASE = 40_000_000_000


def frames_for(pulse_id: int, absent: tuple[str, ...] = ()) -> list[bytes]:
    parts = [(spec, None if spec.name in absent else value_for(spec, pulse_id),
              timestamp_for(pulse_id)) for spec in STEADY]
    return encode_message(pulse_id, timestamp_for(pulse_id), parts)


def test_departures_from_a_steady_layout_are_stored_right_or_counted(tmp_path, ca_ports):
    source = BsreadSource()
    ioc = IocProcess(ca_ports(), unique_prefix("STEADY"),
                     ["--stream", source.address, "--output-root", str(tmp_path)],
                     tmp_path / "ioc.log")
    try:
        ioc.put("OUTPUT_FILE", "steady.h5")
        ioc.put("START_PULSE_ID", BASE)
        for pulse_id in range(BASE, BASE + 5):
            source.send_frames(frames_for(pulse_id))
        source.send_frames(frames_for(BASE + 5, absent=("ST:I32",)))  # shorter parts
        longer = frames_for(BASE + 6)
        longer[4] += b"\0\0\0\0"  # a 4-byte int32 value of 8 bytes
        source.send_frames(longer)
        source.send_frames(frames_for(BASE + 7))
        source.send_frames([*frames_for(BASE + 8), b"extra"])  # one part too many
        source.send_frames(frames_for(BASE + 9))
        # One part too few, with nothing queued behind it: the receiver must not wait
        # for the missing part (nor take it from the next message).
        source.send_frames(frames_for(BASE + 10)[:-1])
        poll(lambda: ioc.get("MALFORMED") == 3, what="three malformed messages")
        # One part too few with the next message right behind it: that one must be
        # stored whole (the receiver reads ZeroMQ's end-of-message flag, not lengths).
        source.send_frames(frames_for(BASE + 11)[:-1])
        source.send_frames(frames_for(BASE + 12))
        ioc.put("STOP_PULSE_ID", BASE + 12)
        ioc.wait_for("STATE", 0)
        ioc.wait_for("MALFORMED", 4)  # published twice a second
        ioc.wait_for("RECEIVED", 9)  # published twice a second
        stored = [*range(BASE, BASE + 6), BASE + 7, BASE + 9, BASE + 12]
        assert_rows(tmp_path / "steady.h5", stored, channels=STEADY,
                    absent=lambda name, pulse_id: (name, pulse_id) == ("ST:I32", BASE + 5))
        log = ioc.log()
        assert "ST:I32: 8 bytes, expected 4" in log
        assert "part_count" in log or "parts, expected" in log
    finally:
        source.close()
        assert ioc.stop() == 0, ioc.log()
