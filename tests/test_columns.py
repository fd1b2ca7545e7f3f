"""Columnar decoding (a run of messages at once) and the direct-chunk path for
bitshuffle_lz4 images: what lands in HDF5 equals what was sent, byte for byte."""
from __future__ import annotations

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle filter for reading)
import numpy as np
import pytest

from sfbw_ioc.protocol import (ChannelSpec, HeaderCache, decode_columns, decode_values,
                               encode_message, is_direct_chunk, parse_main_header)
from sfbw_ioc.writer import FileWriter
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
    writer = FileWriter(path, {})
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
