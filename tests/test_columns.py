"""Columnar decoding (a run of messages at once) and the direct-chunk path for
bitshuffle_lz4 images: what lands in HDF5 equals what was sent, byte for byte."""
from __future__ import annotations

import ctypes
import os

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle filter for reading)
import numpy as np
import pytest

from sfbw_ioc.bsread import ChannelSpec, HeaderCache, decode_columns, decode_uniform_columns, decode_values, encode_message, is_direct_chunk, parse_main_header
from sfbw_ioc.testing.ioc import poll
from sfbw_ioc.testing.sources import BsreadSource
from sfbw_ioc.stream.malformed import MalformedCounter
from sfbw_ioc.stream.receiver import Receiver
from sfbw_ioc.stream.message import RawMessage, stack_uniform
from sfbw_ioc.stream.ring import RingBuffer
from sfbw_ioc.hdf5.file import OutputFile
from sfbw_ioc.hdf5.writeback import WriteBehind
from vectors import CASES, load_case

PULSE0 = 10_000_000_000


def runs_of_one_header(messages):
    """(header, [frames...]) for consecutive messages with the same data header."""
    cache, runs = HeaderCache(), []
    for frames in messages:
        header = cache.get(parse_main_header(frames[0]), frames[1])
        if runs and runs[-1][0] is header:
            runs[-1][1].append(frames)
        else:
            runs.append((header, [frames]))
    return runs


@pytest.mark.parametrize("case", CASES)
def test_columns_hold_exactly_what_decoding_one_message_at_a_time_gives(case):
    messages, _, _ = load_case(case)
    for header, run in runs_of_one_header(messages):
        columns, errors = decode_columns(header, run)
        assert errors == []
        for row, frames in enumerate(run):
            values, _ = decode_values(header, frames)
            for index, (column, value) in enumerate(zip(columns, values)):
                assert column.present[row] == (value.value is not None)
                if value.value is None:
                    continue
                assert column.timestamps[row] == value.timestamp_ns
                if column.chunked:
                    assert bytes(column.values[row]) == bytes(frames[2 + 2 * index])
                elif isinstance(value.value, str):
                    assert column.values[row] == value.value
                else:
                    assert column.values[row].dtype == value.value.dtype
                    assert np.array_equal(column.values[row], value.value)


def assert_same_columns(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.spec == b.spec and a.chunked == b.chunked
        assert a.present.tolist() == b.present.tolist()
        assert a.timestamps.tolist() == b.timestamps.tolist()
        if a.chunked or isinstance(b.values, list):
            assert [None if v is None else bytes(v) if a.chunked else v for v in a.values] \
                == [None if v is None else bytes(v) if b.chunked else v for v in b.values]
        else:
            assert a.values.dtype == b.values.dtype and a.values.shape == b.values.shape
            assert np.array_equal(a.values, b.values)


def packed(header, run):
    return [RawMessage.pack(parse_main_header(frames[0]).pulse_id, 0, header, frames)
            for frames in run]


@pytest.mark.parametrize("case", CASES)
def test_a_run_of_equal_part_lengths_sliced_from_one_array_decodes_the_same(case):
    messages, _, _ = load_case(case)
    compared = 0
    for header, run in runs_of_one_header(messages):
        for message in packed(header, run):  # every message alone is a uniform run,
            if message.lent:  # unless an image of it is kept as received
                assert stack_uniform([message]) is None
                compared += 1
                continue
            columns, errors = decode_uniform_columns(header, *stack_uniform([message]))
            assert_same_columns(columns, decode_columns(header, [message.frames])[0])
            assert errors == []
            compared += 1
        stacked = stack_uniform(packed(header, run))
        if stacked is not None:
            columns, errors = decode_uniform_columns(header, *stacked)
            assert_same_columns(columns, decode_columns(header, run)[0])
    assert compared == len(messages)


def test_uniform_columns_of_every_kind_of_value():
    specs = [ChannelSpec("F", "float64", ()), ChannelSpec("B", "bool", (3,)),
             ChannelSpec("U", "uint32", (2, 2), "big"), ChannelSpec("S", "string", ()),
             ChannelSpec("L", "int16", (64,), compression="lz4"),
             ChannelSpec("I", "uint16", (8, 8), compression="bitshuffle_lz4"),
             ChannelSpec("A", "int8", ())]
    rows = []
    for row in range(5):
        values = [np.float64(row / 3), np.array([row & 1, 0, 2], np.uint8).astype(bool),
                  np.full((2, 2), row, np.uint32), f"s{row}", np.zeros(64, np.int16),
                  np.full((8, 8), 7, np.uint16), None]
        rows.append(encode_message(PULSE0 + row, 0, [(spec, value, 10**9 * row + 5)
                                                     for spec, value in zip(specs, values)]))
    header = HeaderCache().get(parse_main_header(rows[0][0]), rows[0][1])
    stacked = stack_uniform(packed(header, rows))
    assert stacked is not None
    columns, errors = decode_uniform_columns(header, *stacked)
    assert errors == []
    assert_same_columns(columns, decode_columns(header, rows)[0])
    assert columns[0].values.tolist() == [row / 3 for row in range(5)]
    assert columns[2].values.dtype == np.dtype("=u4") and columns[2].values[4].max() == 4
    assert columns[6].present.tolist() == [False] * 5


def test_runs_whose_part_lengths_differ_are_not_stacked():
    spec = ChannelSpec("S", "string", ())
    rows = [encode_message(PULSE0 + i, 0, [(spec, "x" * i, 0)]) for i in (1, 2)]
    header = HeaderCache().get(parse_main_header(rows[0][0]), rows[0][1])
    assert stack_uniform(packed(header, rows)) is None
    assert stack_uniform(packed(header, rows[:1])) is not None


def test_main_headers_of_different_lengths_do_not_prevent_stacking():
    spec = ChannelSpec("F", "float64", ())
    rows = [encode_message(pulse_id, 10**18 + pulse_id, [(spec, pulse_id / 2, 0)])
            for pulse_id in (9, 10, 12345)]
    assert len({len(frames[0]) for frames in rows}) == 3
    header = HeaderCache().get(parse_main_header(rows[0][0]), rows[0][1])
    columns, _ = decode_uniform_columns(header, *stack_uniform(packed(header, rows)))
    assert columns[0].values.tolist() == [4.5, 5.0, 6172.5]


def test_batches_appended_one_after_another_are_written_as_sent(tmp_path):
    specs = [ChannelSpec("F", "float64", ()), ChannelSpec("S", "string", ()),
             ChannelSpec("I", "uint16", (4, 8), compression="bitshuffle_lz4")]
    rows = []
    for row in range(7):
        values = [row * 1.5, f"r{row}", np.full((4, 8), row, np.uint16)]
        frames = encode_message(PULSE0 + row, 0, [(spec, value, 10**9 * row + 1)
                                                  for spec, value in zip(specs, values)])
        for index in {3: [0], 5: [2]}.get(row, []) + ([] if row % 2 else [1]):
            frames[2 + 2 * index] = frames[3 + 2 * index] = b""  # absent in this pulse
        rows.append(frames)
    header = HeaderCache().get(parse_main_header(rows[0][0]), rows[0][1])
    writer = OutputFile(tmp_path / "f.h5", {}, batch_rows=100)
    for first, end in ((0, 2), (2, 3), (3, 7)):  # three batches, one write at close
        columns, errors = decode_columns(header, rows[first:end])
        assert errors == []
        writer.append_columns([PULSE0 + row for row in range(first, end)], columns)
    writer.close()
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["data/F/is_data_present"][:].tolist() == [1, 1, 1, 0, 1, 1, 1]
        assert f["data/F/data"][:, 0].tolist() == [0, 1.5, 3, 0, 6, 7.5, 9]
        assert [v.decode() for v in f["data/S/data"][:, 0]] == ["", "r1", "", "r3", "", "r5", ""]
        assert f["data/S/timestamp"][:].tolist() == [0, 10**9 + 1, 0, 3 * 10**9 + 1, 0,
                                                     5 * 10**9 + 1, 0]
        assert f["data/I/is_data_present"][:].tolist() == [1, 1, 1, 1, 1, 0, 1]
        assert [int(image.max()) for image in f["data/I/data"][:]] == [0, 1, 2, 3, 4, 0, 6]
        assert f["data/I/pulse_id"][:].tolist() == [PULSE0 + row for row in range(7)]


def image_messages(shapes, corrupt_rows=()):
    spec_of = {shape: ChannelSpec("CAM:IMG", "uint16", shape, compression="bitshuffle_lz4")
               for shape in set(shapes)}
    rng = np.random.default_rng(7)
    sent, messages = [], []
    for row, shape in enumerate(shapes):
        image = (rng.normal(1000, 30, shape)).astype(np.uint16)
        frames = encode_message(PULSE0 + row, 0, [(spec_of[shape], image, 5)])
        if row in corrupt_rows:
            body = bytearray(frames[2])
            body[20:40] = b"\xff" * 20  # inside the first LZ4 block
            frames[2] = bytes(body)
        sent.append(image)
        messages.append(frames)
    return spec_of, sent, messages


def write_runs(path, messages):
    writer = OutputFile(path, {})
    errors = []
    row = 0
    for header, run in runs_of_one_header(messages):
        columns, run_errors = decode_columns(header, run)
        errors += [(row + r, e) for r, e in run_errors]
        writer.append_columns([PULSE0 + row + i for i in range(len(run))], columns)
        row += len(run)
    writer.close()
    return errors


def test_images_go_to_hdf5_chunks_as_they_came(tmp_path):
    spec_of, sent, messages = image_messages([(48, 64)] * 5)
    assert is_direct_chunk(spec_of[(48, 64)])
    assert write_runs(tmp_path / "f.h5", messages) == []
    with h5py.File(tmp_path / "f.h5") as f:
        data = f["data/CAM:IMG/data"]
        assert data.chunks == (1, 48, 64) and data.dtype == np.uint16
        for row, frames in enumerate(messages):
            assert np.array_equal(data[row], sent[row])
            _, stored = data.id.read_direct_chunk((row, 0, 0))
            assert stored == frames[2]  # the wire bytes, not recompressed


def test_frames_of_different_sizes_each_get_their_own_dataset(tmp_path):
    shapes = [(48, 64), (48, 64), (100, 30), (100, 30), (48, 64)]
    _, sent, messages = image_messages(shapes)
    write_runs(tmp_path / "f.h5", messages)
    with h5py.File(tmp_path / "f.h5") as f:
        group = f["data/CAM:IMG"]
        assert group["data(1)"].shape == (2, 48, 64)
        assert group["data(2)"].shape == (4, 100, 30)
        assert group["data"].shape == (5, 48, 64) and group["data"].attrs["first_row"] == 4
        assert np.array_equal(group["data(1)"][1], sent[1])
        assert np.array_equal(group["data(2)"][3], sent[3])
        assert np.array_equal(group["data"][4], sent[4])


def test_a_corrupt_image_is_left_out_not_stored(tmp_path):
    _, sent, messages = image_messages([(48, 64)] * 4, corrupt_rows={2})
    errors = write_runs(tmp_path / "f.h5", messages)
    assert [row for row, _ in errors] == [2] and errors[0][1].kind == "compression"
    with h5py.File(tmp_path / "f.h5") as f:
        group = f["data/CAM:IMG"]
        assert group["is_data_present"][:].tolist() == [1, 1, 0, 1]
        for row in (0, 1, 3):
            assert np.array_equal(group["data"][row], sent[row])
        assert not group["data"][2].any()


def test_the_camera_vector_is_stored_byte_for_byte(tmp_path):
    messages, expected, npz = load_case("camera_bslz4")
    write_runs(tmp_path / "f.h5", messages)
    with h5py.File(tmp_path / "f.h5") as f:
        data = f["data/CAM:FPICTURE/data"]
        for row, message in enumerate(expected["messages"]):
            want = npz[message["channels"]["CAM:FPICTURE"]["npz"]]
            assert np.array_equal(data[row], want)


def test_big_endian_and_lz4_images_are_decoded_not_chunked():
    for spec in (ChannelSpec("I", "uint16", (4, 8), "big", "bitshuffle_lz4"),
                 ChannelSpec("I", "uint16", (4, 8), "little", "lz4"),
                 ChannelSpec("I", "uint16", (32,), "little", "bitshuffle_lz4")):
        assert not is_direct_chunk(spec)
        image = np.arange(32, dtype=np.uint16).reshape(spec.shape)
        frames = encode_message(PULSE0, 0, [(spec, image, 0)])
        header = HeaderCache().get(parse_main_header(frames[0]), frames[1])
        columns, errors = decode_columns(header, [frames, frames])
        assert errors == [] and not columns[0].chunked
        assert np.array_equal(columns[0].values[1], image)


def _resident_pages(path, offset: int, length: int) -> tuple[int, int]:
    """(resident, total) of the pages wholly inside [offset, offset + length) of a file."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    start, end = -(-offset // page) * page, (offset + length) // page * page
    if end <= start:
        return 0, 0
    pages = (end - start) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, end - start, 1, 1, fd, start)  # PROT_READ, MAP_SHARED
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vector = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(address, end - start, vector) == 0
        finally:
            libc.munmap(address, end - start)
    finally:
        os.close(fd)
    return sum(byte & 1 for byte in vector), pages


def _page_cache_can_be_dropped(directory) -> bool:
    """False on file systems whose pages are the file (tmpfs): nothing to drop there."""
    probe = directory / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    resident, _ = _resident_pages(probe, 0, 1 << 20)
    probe.unlink()
    return resident == 0


def test_written_images_leave_the_page_cache_one_flush_later(tmp_path):
    """The write-behind: direct-chunk images are written back at a flush and dropped
    from the cache at the next; the newest stay, and everything reads back exact."""
    if not _page_cache_can_be_dropped(tmp_path):
        pytest.skip("this file system keeps its pages in memory (tmpfs)")
    _, sent, messages = image_messages([(256, 256)] * 30)
    header = HeaderCache().get(parse_main_header(messages[0][0]), messages[0][1])
    writer = OutputFile(tmp_path / "f.h5", {})
    for first, last in ((0, 20), (20, 25), (25, 30)):  # flushed after each
        columns, errors = decode_columns(header, messages[first:last])
        assert errors == []
        writer.append_columns([PULSE0 + row for row in range(first, last)], columns)
        writer.flush()
    with h5py.File(writer.partial, "r") as f:  # reads metadata only, not chunks
        data = f["data/CAM:IMG/data"]
        chunks = [data.id.get_chunk_info_by_coord((row, 0, 0)) for row in range(30)]
    residency = [_resident_pages(writer.partial, c.byte_offset, c.size) for c in chunks]
    writer.close()
    assert all(total >= 4 for _, total in residency)  # ~100 kB each
    # Rows 0-19 were dropped at the second flush, rows 20-24 at the third; 25-29 are
    # on their way to the disk, still cached. A chunk HDF5 put next to new metadata
    # (the first one, with the chunk index) is left to the kernel.
    dropped = [resident == 0 for resident, _ in residency[:25]]
    assert sum(dropped) >= 22, residency
    assert all(resident == total for resident, total in residency[25:]), residency
    with h5py.File(tmp_path / "f.h5") as f:
        data = f["data/CAM:IMG/data"]
        for row, frames in enumerate(messages):
            assert data.id.read_direct_chunk((row, 0, 0))[1] == frames[2]
            assert np.array_equal(data[row], sent[row])


def test_write_behind_refused_by_the_file_system_only_ends_the_dropping(tmp_path, caplog):
    """A descriptor sync_file_range refuses (here a pipe: ESPIPE) logs once and
    leaves the data alone; only a failed write to disk (EIO, ENOSPC) is an error."""
    read_end, write_end = os.pipe()
    try:
        write_behind = WriteBehind(None, write_end)
        write_behind._written(0, 1 << 20)
        write_behind.cycle()
        write_behind._written(1 << 20, 1 << 20)
        write_behind.cycle()
    finally:
        os.close(read_end)
        os.close(write_end)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "page cache not managed" in warnings[0], warnings


@pytest.mark.parametrize("edit, kind", [
    (lambda body: body[:20] + b"\xff" * 20 + body[40:], "compression"),  # in the first block
    (lambda body: body[:12] + b"\x7f\xf0\x00\x00" + body[16:], "value_size"),  # past the end
    (lambda body: body[:12] + b"\x00\x00\x00\x08" + body[16:], "value_size"),  # too short
    (lambda body: body[:-10], "value_size"),
    (lambda body: body + b"\0", "value_size"),
])
def test_images_are_checked_block_by_block(edit, kind):
    """Stored as chunks or decoded, an image whose LZ4 blocks do not decode exactly is
    left out with an error; the images around it are intact."""
    spec_of, sent, messages = image_messages([(48, 64)] * 3)
    messages[1][2] = edit(messages[1][2])
    header = HeaderCache().get(parse_main_header(messages[0][0]), messages[0][1])
    columns, errors = decode_columns(header, messages)
    assert [(row, error.kind) for row, error in errors] == [(1, kind)]
    assert columns[0].chunked and columns[0].present.tolist() == [True, False, True]
    for row in (0, 2):
        values, row_errors = decode_values(header, messages[row])
        assert row_errors == [] and np.array_equal(values[0].value, sent[row])
    assert [e.kind for e in decode_values(header, messages[1])[1]] == [kind]


def test_the_receiver_checks_images_on_arrival():
    """A corrupt image is counted when it arrives and kept out of the ring (the message
    stays, with the image absent): no acquisition can write it, none checks it again."""
    image = ChannelSpec("CAM:IMG", "uint16", (48, 64), compression="bitshuffle_lz4")
    scalar = ChannelSpec("CAM:GAIN", "float64", ())
    rng = np.random.default_rng(3)
    images = [rng.normal(1000, 30, image.shape).astype(np.uint16) for _ in range(3)]
    messages = [encode_message(PULSE0 + row, 0, [(image, images[row], 5),
                                                 (scalar, np.float64(row), 5)])
                for row in range(3)]
    body = bytearray(messages[1][2])
    body[20:40] = b"\xff" * 20  # inside the first LZ4 block
    messages[1][2] = bytes(body)
    source, ring, malformed = BsreadSource(), RingBuffer(100, 1 << 30), MalformedCounter()
    receiver = Receiver(source.address, ring, malformed)
    receiver.start()
    try:
        for frames in messages:
            source.send_frames(frames)
        poll(lambda: ring.next_seq == 3, timeout=10, what="three messages in the ring")
    finally:
        receiver.stop()
        source.close()
    assert malformed.by_kind() == {"compression": 1}
    stored = ring.read(0, 3).messages
    assert [bytes(m.frames[2]) for m in stored] == [messages[0][2], b"", messages[2][2]]
    assert [bytes(m.frames[4]) for m in stored] == [frames[4] for frames in messages]
    columns, errors = decode_columns(stored[0].header, [m.frames for m in stored],
                                     chunks_checked=True)
    assert errors == [] and columns[0].present.tolist() == [True, False, True]
    assert columns[1].values.tolist() == [0.0, 1.0, 2.0]
