"""The live view end to end: a real source streaming while the IOC (a subprocess) shows
chosen channels and a camera frame as PVs, read back through pyepics and caproto's client.

Every PV of the live view carries the message's global timestamp, so a read tells which
pulse it shows: each read is checked against what was sent for exactly that pulse.
"""
from __future__ import annotations

import bisect
import threading
import time

import epics
import numpy as np
import pytest
from caproto.threading.client import Context

from sfbw_ioc.testing.ioc import IocProcess, caput_binary, poll, unique_prefix
from sfbw_ioc.testing.sources import (BsreadSource, PacedSender, PreEncoded, timestamp_for,
                                      value_for)
from sfbw_ioc.bsread import ChannelSpec, Encoder

SCALAR = ChannelSpec("L:SCALAR", "float64", ())
WAVEFORM = ChannelSpec("L:WAVE", "float32", (16,), compression="lz4")
TEXT = ChannelSpec("L:TEXT", "string", ())
SOMETIMES = ChannelSpec("L:ODD", "int32", ())  # absent in even pulses
SMALL_CAMERA = ChannelSpec("L:CAM", "uint16", (20, 30), compression="bitshuffle_lz4")
BIG_CAMERA = ChannelSpec("L:BIGCAM", "uint16", (64, 80), compression="bitshuffle_lz4")
CHANNELS = (SCALAR, WAVEFORM, TEXT, SOMETIMES, SMALL_CAMERA, BIG_CAMERA)
MAX_PIXELS = 1000  # the small camera fits (600), the big one (5120) is binned by 3
RATE_HZ = 2.0
SEND_HZ = 50.0
FIRST_PULSE = 1_000


def pulse_of(timestamp_s: float) -> int:
    """The pulse id whose global timestamp is ``timestamp_s`` (sfbw_ioc.testing.sources.timestamp_for)."""
    return round((timestamp_s * 1e9 - timestamp_for(0)) / 1e7)


class Streamer:
    """Sends a message per 1/SEND_HZ from a thread and remembers when each went out."""

    def __init__(self) -> None:
        self.source = BsreadSource()
        self._sent: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        pulse_id = FIRST_PULSE
        while not self._stop.wait(1 / SEND_HZ):
            self.source.send(pulse_id, CHANNELS,
                             absent=[SOMETIMES.name] if pulse_id % 2 == 0 else [])
            self._sent.append((time.monotonic(), pulse_id))
            pulse_id += 1

    def newest_sent_before(self, moment: float) -> int:
        index = bisect.bisect_right(self._sent, (moment, float("inf")))
        return self._sent[index - 1][1] if index else 0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.source.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory, ca_ports):
    streamer = Streamer()
    ioc = IocProcess(ca_ports(), unique_prefix("LIVE"),
                     ["--stream", streamer.source.address, "--buffer-length", "200",
                      "--image-max-pixels", str(MAX_PIXELS),
                      "--output-root", str(tmp_path_factory.mktemp("out"))],
                     tmp_path_factory.mktemp("log") / "live.log")
    streamer.start()
    context = Context()
    yield ioc, streamer, context
    context.disconnect()
    streamer.stop()
    assert ioc.stop() == 0, ioc.log()


def test_each_slot_shows_the_newest_message_within_one_period_and_a_half_second(live):
    ioc, streamer, context = live
    for slot, spec in enumerate((SCALAR, WAVEFORM, TEXT, SOMETIMES), start=1):
        ioc.put(f"LIVE{slot}:NAME", spec.name)
    pvs = dict(zip(("scalar", "wave", "text", "odd", "present"), context.get_pvs(
        *(ioc.pv(name) for name in ("LIVE1:VALUE", "LIVE2:VALUE", "LIVE3:TEXT",
                                    "LIVE4:VALUE", "LIVE4:PRESENT")), timeout=5)))
    poll(lambda: ioc.get("LIVE3:PULSE_ID") > FIRST_PULSE, 10, what="slots in use")
    allowed = 1 / RATE_HZ + 0.5
    for _ in range(6):
        asked = time.monotonic()
        # pyepics (libca)
        for name, spec in (("LIVE1:VALUE", SCALAR), ("LIVE2:VALUE", WAVEFORM)):
            read = epics.get_pv(ioc.pv(name)).get_with_metadata(
                form="time", use_monitor=False, timeout=5)
            pulse_id = pulse_of(read["timestamp"])
            assert pulse_id >= streamer.newest_sent_before(asked - allowed), name
            assert np.array_equal(np.atleast_1d(read["value"]),
                                  np.atleast_1d(value_for(spec, pulse_id)).astype(float)), name
        # caproto's client
        for key, spec in (("scalar", SCALAR), ("wave", WAVEFORM)):
            reading = pvs[key].read(data_type="time")
            pulse_id = pulse_of(reading.metadata.timestamp)
            assert pulse_id >= streamer.newest_sent_before(asked - allowed), key
            assert np.array_equal(reading.data, np.atleast_1d(value_for(spec, pulse_id)))
        reading = pvs["text"].read(data_type="time")
        pulse_id = pulse_of(reading.metadata.timestamp)
        assert pulse_id >= streamer.newest_sent_before(asked - allowed)
        assert bytes(reading.data).rstrip(b"\0").decode() == value_for(TEXT, pulse_id)
        present = pvs["present"].read(data_type="time")
        assert present.data[0] == pulse_of(present.metadata.timestamp) % 2
        time.sleep(0.3)  # spread the reads over several sampling rounds


def test_a_slot_tells_the_channel_time_and_pulse_id(live):
    ioc, _, _ = live
    ioc.put("LIVE5:NAME", SCALAR.name)
    pulse_id = poll(lambda: ioc.get("LIVE5:PULSE_ID"), 10, what="LIVE5 in use")
    read = epics.get_pv(ioc.pv("LIVE5:TIMESTAMP")).get_with_metadata(
        form="time", use_monitor=False, timeout=5)
    assert read["value"] == pytest.approx(timestamp_for(pulse_of(read["timestamp"])) / 1e9)
    assert pulse_id >= FIRST_PULSE
    # The waveform's length is that of the channel; a scalar has one element.
    assert len(ioc.get("LIVE5:VALUE")) == 1
    assert len(ioc.get("LIVE2:VALUE")) == WAVEFORM.shape[0]


def test_a_name_the_stream_does_not_carry_gets_a_minor_alarm_and_a_message(live):
    ioc, _, _ = live
    ioc.put("LIVE6:NAME", "NOT:IN:STREAM")
    poll(lambda: ioc.severity("LIVE6:NAME") == 1, 10, what="LIVE6:NAME MINOR")
    message = ioc.text("MESSAGE")
    assert "LIVE6:NAME" in message and "NOT:IN:STREAM" in message and "not carry" in message
    ioc.put("LIVE6:NAME", SCALAR.name)
    poll(lambda: ioc.severity("LIVE6:NAME") == 0, 10, what="alarm cleared")
    ioc.put("IMAGE:NAME", "NOT:A:CAMERA")
    poll(lambda: ioc.severity("IMAGE:NAME") == 1, 10, what="IMAGE:NAME MINOR")


def test_a_rate_out_of_range_is_refused(live):
    ioc, _, _ = live
    for pv in ("LIVE_RATE", "IMAGE:RATE"):
        for bad in ("0", "-1", "10.5"):
            done = caput_binary("-c", "--", ioc.pv(pv), bad, ca_timeout=5)
            assert done.returncode != 0, (pv, bad, done.stdout)
    assert ioc.get("LIVE_RATE") == RATE_HZ and ioc.get("IMAGE:RATE") == 1.0
    assert "live rate" in ioc.text("MESSAGE")


def _image(ioc: IocProcess) -> tuple[int, np.ndarray]:
    """(pulse id, array as height x width) of one read of IMAGE:ARRAY."""
    read = epics.get_pv(ioc.pv("IMAGE:ARRAY")).get_with_metadata(
        form="time", use_monitor=False, timeout=5)
    return pulse_of(read["timestamp"]), read["value"].reshape(
        ioc.get("IMAGE:HEIGHT"), ioc.get("IMAGE:WIDTH"))


def test_a_frame_that_fits_comes_back_as_sent(live):
    ioc, _, context = live
    ioc.put("IMAGE:NAME", SMALL_CAMERA.name)
    poll(lambda: ioc.get("IMAGE:WIDTH") == 30 and ioc.severity("IMAGE:NAME") == 0, 10,
         what="the small camera")
    assert (ioc.get("IMAGE:HEIGHT"), ioc.get("IMAGE:BINNING")) == (20, 1)
    pulse_id, image = _image(ioc)
    assert image.dtype == np.float32
    assert np.array_equal(image, value_for(SMALL_CAMERA, pulse_id))
    array, = context.get_pvs(ioc.pv("IMAGE:ARRAY"), timeout=5)
    reading = array.read(data_type="time")
    assert np.array_equal(reading.data.reshape(20, 30),
                          value_for(SMALL_CAMERA, pulse_of(reading.metadata.timestamp)))


def test_a_frame_larger_than_the_limit_comes_back_binned(live):
    ioc, _, _ = live
    ioc.put("IMAGE:NAME", BIG_CAMERA.name)
    poll(lambda: ioc.get("IMAGE:BINNING") == 3, 10, what="the big camera binned")
    # 64 x 80 by 3: 21 x 26 = 546 <= 1000 pixels (by 2: 32 x 40 = 1280, too many)
    assert (ioc.get("IMAGE:HEIGHT"), ioc.get("IMAGE:WIDTH")) == (21, 26)
    pulse_id, image = _image(ioc)
    sent = value_for(BIG_CAMERA, pulse_id).astype(np.float64)[:63, :78]
    expected = sent.reshape(21, 3, 26, 3).mean(axis=(1, 3)).astype(np.float32)
    assert np.array_equal(image, expected)


def test_a_monitor_on_the_image_gets_at_most_rate_updates_a_second(live):
    ioc, _, _ = live
    ioc.put("IMAGE:NAME", SMALL_CAMERA.name)
    ioc.put("IMAGE:RATE", 4.0)
    stamps: list[float] = []
    pv = epics.PV(ioc.pv("IMAGE:ARRAY"), form="time", auto_monitor=True,
                  callback=lambda timestamp=None, **_: stamps.append(timestamp))
    try:
        poll(lambda: len(stamps) >= 2, 10, what="image monitor updates")
        start, first = time.monotonic(), len(stamps)
        poll(lambda: time.monotonic() - start >= 3.0, 5, what="3 s of monitoring")
        updates = len(stamps) - first
    finally:
        pv.clear_callbacks()
        pv.disconnect()
        ioc.put("IMAGE:RATE", 1.0)
    assert 3 <= updates <= 4.0 * 3.0 + 1, updates
    # Each update is a newer frame.
    assert all(later > earlier for earlier, later in zip(stamps, stamps[1:]))


def test_no_frame_is_published_once_the_image_is_switched_off(tmp_path, ca_ports):
    """A frame takes tens of ms to decode and bin: one in flight when IMAGE:NAME is
    emptied must not show up after the put (it did, before samples of a channel no longer
    chosen were dropped)."""
    camera = ChannelSpec("L:HUGECAM", "uint16", (2048, 2048), compression="bitshuffle_lz4")
    rng = np.random.default_rng(3)
    encoder = Encoder()
    block = PreEncoded([encoder.encode(p, timestamp_for(p), [(camera, np.clip(
        rng.normal(1000, 35, camera.shape), 0, 65535).astype(np.uint16), timestamp_for(p))])
        for p in range(2)])
    source = BsreadSource()
    ioc = IocProcess(ca_ports(), unique_prefix("LIVEOFF"),
                     ["--stream", source.address, "--buffer-bytes", "200M",
                      "--output-root", str(tmp_path)], tmp_path / "ioc.log")
    sender = PacedSender(source, FIRST_PULSE, rate_hz=20.0, frames=block.frames)
    sender.start()

    def pulse_id() -> float:  # a fresh read: answered after the puts before it
        return epics.caget(ioc.pv("IMAGE:PULSE_ID"), use_monitor=False, timeout=5)

    try:
        ioc.put("IMAGE:RATE", 10.0)
        late = []
        for delay in np.arange(20) * 0.005:
            before = pulse_id()
            ioc.put("IMAGE:NAME", camera.name)
            poll(lambda: pulse_id() != before, 10, what="a published frame")
            # Pacing, not synchronisation: the puts spread over the 0.1 s sampling
            # period, so that some land while the next frame is being decoded.
            time.sleep(delay)
            ioc.put("IMAGE:NAME", "")
            shown, start = pulse_id(), time.monotonic()
            poll(lambda: time.monotonic() - start >= 0.3, 5, what="0.3 s switched off")
            late.append(pulse_id() != shown)
    finally:
        sender.finish()
        assert ioc.stop() == 0, ioc.log()
        source.close()
    assert not any(late), late
