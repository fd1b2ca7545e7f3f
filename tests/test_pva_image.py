"""The camera frame over PV Access: a p4p monitor of <prefix>IMAGE receives frames equal
to the file's, in their own type and full size (uint8, uint16, float32), and
<prefix>IMAGE:COMPRESSED the ring's bitshuffle_lz4 chunk as areaDetector's "bslz4" codec
carries it, which decompresses to it as areaDetector's viewers decompress it."""
from __future__ import annotations

import queue
import time

import bitshuffle
import numpy as np
import pytest

from p4p.client.thread import Context

from sfbw_ioc.testing.files import assert_rows, read_file
from sfbw_ioc.testing.ioc import poll
from sfbw_ioc.testing.sources import streaming_ioc, value_for
from pva_clients import PvaPorts
from sfbw_ioc.bsread import ChannelSpec

SHAPE = (48, 64)
CAMERAS = (ChannelSpec("CAM:U8", "uint8", SHAPE, compression="bitshuffle_lz4"),
           ChannelSpec("CAM:U16", "uint16", SHAPE, compression="bitshuffle_lz4"),
           ChannelSpec("CAM:F32", "float32", SHAPE, compression="bitshuffle_lz4"),
           ChannelSpec("CAM:RAW", "uint16", SHAPE))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ca_ports):
    root = tmp_path_factory.mktemp("output")
    ports = PvaPorts()
    with streaming_ioc(ca_ports(), "PVI", root, tmp_path_factory.mktemp("log") / "ioc.log",
                       wrapper=ports.server_wrapper()) as (ioc, source):
        context = ports.context()
        # p4p's NTNDArray unwrapping reshapes the value to the dimensions: not a
        # compressed chunk's. This context hands over the Values as they come.
        raw_context = Context("pva", conf=ports.client_environment(), useenv=False, nt=False)
        try:
            yield ioc, source, root, context, raw_context
        finally:
            raw_context.close()
            context.close()


def raw(frame):
    return getattr(frame, "raw", frame)


def pulse_id_of(frame) -> int:
    return next(a.value for a in raw(frame).attribute if a.name == "pulse_id")


# pvData's ScalarType codes: what ntndArrayConverter puts in codec.parameters.
SCALAR_TYPES = {"uint8": 5, "uint16": 6, "float32": 9}


def decompressed(frame, dtype: np.dtype) -> np.ndarray:
    """As the ImageJ NTNDA viewer and c2dataviewer decompress "bslz4": the whole value
    through bshuf_decompress_lz4 with the default block size (0)."""
    assert frame.compressedSize == frame.value.size
    return bitshuffle.decompress_lz4(frame.value, (frame.uncompressedSize // dtype.itemsize,),
                                     dtype, 0)


def assert_codec_parameters(frame, spec) -> None:
    """The uncompressed type as an int32, which the pvData viewers require (PVInt)."""
    assert frame.codec.parameters == SCALAR_TYPES[spec.type]
    assert "any parameters int32_t" in frame.codec.tostr()


@pytest.mark.parametrize("spec", CAMERAS, ids=lambda spec: spec.name)
def test_monitored_frames_equal_the_files(setup, spec):
    ioc, source, root, context, raw_context = setup
    base = 1000 * (CAMERAS.index(spec) + 1)
    plain, packed = queue.Queue(), queue.Queue()
    context.put(ioc.pv("IMAGE:NAME"), spec.name, wait=True)
    context.put(ioc.pv("IMAGE:RATE"), 10.0, wait=True)
    subscriptions = [context.monitor(ioc.pv("IMAGE"), plain.put),
                     raw_context.monitor(ioc.pv("IMAGE:COMPRESSED"), packed.put)]
    try:
        context.put(ioc.pv("OUTPUT_FILE"), f"{spec.name[4:]}.h5", wait=True)
        context.put(ioc.pv("START_PULSE_ID"), base, wait=True)
        received: dict[int, object] = {}
        received_packed: dict[int, object] = {}
        pulse_id = base
        while len(received) < 3 or len(received_packed) < 3:
            source.send(pulse_id, channels=CAMERAS)
            pulse_id += 1
            drain(plain, received, base)
            drain(packed, received_packed, base)
            assert pulse_id < base + 900, (len(received), len(received_packed))
            time.sleep(0.01)  # pacing: a 100 Hz stream, not synchronisation
        poll(lambda: ioc.get("LAST_PULSE_ID") == pulse_id - 1, what="all received")
        context.put(ioc.pv("STOP_PULSE_ID"), pulse_id - 1, wait=True, timeout=30)
    finally:
        for subscription in subscriptions:
            subscription.close()
    path = root / f"{spec.name[4:]}.h5"
    assert_rows(path, list(range(base, pulse_id)), channels=CAMERAS)
    with read_file(path) as f:
        data = f["data"][spec.name]["data"]
        for number, frame in received.items():
            expected = data[number - base]
            assert frame.dtype == np.dtype(spec.type) and frame.shape == SHAPE
            assert np.array_equal(frame, expected)
            assert np.array_equal(frame, value_for(spec, number))
            assert frame.raw.uniqueId == number
            assert frame.raw.codec.name == ""
            assert_codec_parameters(frame.raw, spec)
            assert [d.size for d in frame.raw.dimension] == [SHAPE[1], SHAPE[0]]
        for number, frame in received_packed.items():
            expected = data[number - base]
            assert_codec_parameters(frame, spec)
            assert frame.uncompressedSize == expected.nbytes
            if spec.compression == "bitshuffle_lz4":
                assert frame.codec.name == "bslz4"
                array = decompressed(frame, np.dtype(spec.type))
            else:  # uncompressed in the ring: served as it is
                assert frame.codec.name == ""
                array = frame.value
            assert np.array_equal(array.reshape(SHAPE), expected)


def drain(updates: queue.Queue, into: dict, first: int) -> None:
    """The frames of pulses from ``first`` on (not connection events, nor the empty
    value before any frame, nor the newest frame of the previous test's messages)."""
    while not updates.empty():
        frame = updates.get()
        if not isinstance(frame, Exception) and raw(frame).dimension \
                and pulse_id_of(frame) >= first:
            into[pulse_id_of(frame)] = frame
