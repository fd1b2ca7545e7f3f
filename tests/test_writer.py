"""OutputFile: real files in tmp_path, read back with h5py."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import textwrap
import threading
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest

from sfbw_ioc.bsread import BSREAD_TYPES, ChannelSpec, ChannelValue
from sfbw_ioc.vocabulary import NOT_GIVEN
from sfbw_ioc.hdf5.file import OutputFile

PULSE0 = 10_000_000_000  # SwissFEL pulse ids are beyond 2**31
GENERAL = {"user": "tester", "process": "pytest", "instrument": "SF-TEST"}
BITSHUFFLE_ID = 32008


def present(name: str, value, bsread_type: str | None = None, ts: int = 0) -> ChannelValue:
    if isinstance(value, str):
        return ChannelValue(ChannelSpec(name, "string", ()), value, ts)
    array = np.asarray(value)
    spec = ChannelSpec(name, bsread_type or array.dtype.name, array.shape)
    return ChannelValue(spec, array, ts)


def absent(name: str) -> ChannelValue:
    # What the reference sender declares for a channel without a value.
    return ChannelValue(ChannelSpec(name, "float64", (1,)), None, 0)


def write(path: Path, messages: list[list[ChannelValue]], **kwargs) -> Path:
    writer = OutputFile(path, GENERAL, **kwargs)
    for row, values in enumerate(messages):
        writer.append(PULSE0 + 10 * row, values)
    return writer.close()


def pulse_ids(rows: int) -> np.ndarray:
    return PULSE0 + 10 * np.arange(rows, dtype=np.int64)


SCALARS = {
    "int8": np.array([-128, 127, 0], dtype=np.int8),
    "uint8": np.array([0, 255, 7], dtype=np.uint8),
    "int16": np.array([-32768, 32767, 1], dtype=np.int16),
    "uint16": np.array([0, 65535, 2], dtype=np.uint16),
    "int32": np.array([-2**31, 2**31 - 1, 3], dtype=np.int32),
    "uint32": np.array([0, 2**32 - 1, 4], dtype=np.uint32),
    "int64": np.array([-2**63, 2**63 - 1, 5], dtype=np.int64),
    "uint64": np.array([0, 2**64 - 1, 6], dtype=np.uint64),
    "float32": np.array([np.float32(1) / 3, -np.inf, np.nan], dtype=np.float32),
    "float64": np.array([np.pi, 5e-324, -0.0], dtype=np.float64),
    "bool": np.array([True, False, True]),
}


@pytest.mark.parametrize("bsread_type", sorted(BSREAD_TYPES))
def test_scalar_of_every_type_is_stored_bit_exact(tmp_path, bsread_type):
    if bsread_type == "string":
        expected = ["Grüße ✓", "", "ascii"]
        write(tmp_path / "f.h5", [[present("SAR:S", s)] for s in expected])
        with h5py.File(tmp_path / "f.h5") as f:
            data = f["data/SAR:S/data"]
            assert h5py.check_string_dtype(data.dtype).encoding == "utf-8"
            assert data.shape == (3, 1)
            assert data.asstr()[:, 0].tolist() == expected
            assert data.attrs["bsread_type"] == "string"
        return
    expected = SCALARS[bsread_type]
    write(tmp_path / "f.h5", [[present("SAR:S", v, bsread_type, ts=100 + i)]
                              for i, v in enumerate(expected)])
    with h5py.File(tmp_path / "f.h5") as f:
        group = f["data/SAR:S"]
        data = group["data"]
        stored_dtype = np.dtype(np.uint8) if bsread_type == "bool" else expected.dtype
        assert data.dtype == stored_dtype
        assert data.shape == (3, 1)
        assert data[:, 0].tobytes() == expected.astype(stored_dtype).tobytes()
        assert data.attrs["bsread_type"] == bsread_type
        assert data.attrs["shape"].tolist() == []
        assert data.attrs["first_row"] == 0
        assert group.attrs["name"] == "SAR:S"
        assert group["pulse_id"].dtype == np.int64
        assert group["pulse_id"][:].tolist() == pulse_ids(3).tolist()
        assert group["is_data_present"].dtype == np.uint8
        assert group["is_data_present"][:].tolist() == [1, 1, 1]
        assert group["timestamp"][:].tolist() == [100, 101, 102]


def test_arrays_and_images(tmp_path):
    rng = np.random.default_rng(1)
    waveforms = rng.normal(size=(3, 5)).astype(np.float32)
    images = rng.integers(0, 4096, size=(3, 4, 6), dtype=np.uint16)
    masks = rng.integers(0, 2, size=(3, 2, 3)).astype(bool)
    long_waveforms = rng.normal(size=(3, 10_000))  # 80 KB per row: one row per chunk
    write(tmp_path / "f.h5", [
        [present("WF", waveforms[i]), present("CAM:FPICTURE", images[i]),
         present("MASK", masks[i]), present("LONG", long_waveforms[i])]
        for i in range(3)])
    with h5py.File(tmp_path / "f.h5") as f:
        waveform = f["data/WF/data"]
        assert waveform.shape == (3, 5) and waveform.dtype == np.float32
        assert np.array_equal(waveform[:], waveforms)
        assert waveform.chunks[0] > 1 and waveform.id.get_create_plist().get_nfilters() == 0
        assert waveform.attrs["shape"].tolist() == [5]

        image = f["data/CAM:FPICTURE/data"]
        assert image.shape == (3, 4, 6) and image.dtype == np.uint16
        assert np.array_equal(image[:], images)
        assert image.chunks == (1, 4, 6)
        plist = image.id.get_create_plist()
        assert plist.get_nfilters() == 1
        filter_id, _, options, _ = plist.get_filter(0)
        assert filter_id == BITSHUFFLE_ID
        assert options[-2:] == (0, 2)  # nelems=0 (automatic block size), LZ4
        assert image.attrs["shape"].tolist() == [4, 6]

        mask = f["data/MASK/data"]
        assert mask.dtype == np.uint8 and mask.attrs["bsread_type"] == "bool"
        assert np.array_equal(mask[:], masks.astype(np.uint8))
        assert mask.id.get_create_plist().get_filter(0)[0] == BITSHUFFLE_ID

        long = f["data/LONG/data"]
        assert long.chunks == (1, 10_000)
        assert long.id.get_create_plist().get_nfilters() == 0
        assert np.array_equal(long[:], long_waveforms)


def test_absent_values_are_marked_and_do_not_define_the_type(tmp_path):
    write(tmp_path / "f.h5", [
        [present("A", np.int32(5), ts=11)],
        [absent("A")],
        [present("A", np.int32(-7), ts=13)],
    ])
    with h5py.File(tmp_path / "f.h5") as f:
        group = f["data/A"]
        assert group["data"].dtype == np.int32
        assert group["data"][:, 0].tolist() == [5, 0, -7]
        assert group["is_data_present"][:].tolist() == [1, 0, 1]
        assert group["timestamp"][:].tolist() == [11, 0, 13]
        assert group["pulse_id"][:].tolist() == pulse_ids(3).tolist()


def test_strings_with_absent_rows_read_back_empty(tmp_path):
    write(tmp_path / "f.h5",
          [[present("MSG", "über")], [absent("MSG")], [present("MSG", "日本")]])
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["data/MSG/data"].asstr()[:, 0].tolist() == ["über", "", "日本"]
        assert f["data/MSG/is_data_present"][:].tolist() == [1, 0, 1]


@pytest.mark.parametrize("batch_rows", [1, 2, 256])
def test_channels_added_and_removed_stay_row_aligned(tmp_path, batch_rows):
    messages = [
        [present("A", np.float64(0))],
        [present("A", np.float64(1))],
        [present("A", np.float64(2)), present("B", np.uint16(20))],
        [present("A", np.float64(3)), present("B", np.uint16(30))],
        [present("A", np.float64(4))],
        [],
    ]
    write(tmp_path / "f.h5", messages, batch_rows=batch_rows)
    with h5py.File(tmp_path / "f.h5") as f:
        for name in ("A", "B"):
            assert f[f"data/{name}/pulse_id"][:].tolist() == pulse_ids(6).tolist()
        assert f["data/A/is_data_present"][:].tolist() == [1, 1, 1, 1, 1, 0]
        assert f["data/B/is_data_present"][:].tolist() == [0, 0, 1, 1, 0, 0]
        assert f["data/B/data"][:, 0].tolist() == [0, 0, 20, 30, 0, 0]
        assert f["data/B/data"].dtype == np.uint16
        assert f["data/A/data"].shape == (6, 1)


def test_first_present_value_defines_data_and_back_fills(tmp_path):
    write(tmp_path / "f.h5", [
        [absent("X")], [absent("X")],
        [present("X", np.array([1, 2, 3], dtype=np.uint16))],
    ], batch_rows=1)
    with h5py.File(tmp_path / "f.h5") as f:
        group = f["data/X"]
        assert sorted(group) == ["data", "is_data_present", "pulse_id", "timestamp"]
        assert group["data"].dtype == np.uint16
        assert group["data"][:].tolist() == [[0, 0, 0], [0, 0, 0], [1, 2, 3]]
        assert group["data"].attrs["first_row"] == 0


@pytest.mark.parametrize("batch_rows", [1, 256])
def test_type_and_shape_changes_move_old_data_aside(tmp_path, batch_rows):
    write(tmp_path / "f.h5", [
        [present("C", np.int32(1))],
        [present("C", np.int32(2))],
        [present("C", np.float64(2.5))],  # type change
        [absent("C")],
        [present("C", np.array([7.0, 8.0]))],  # shape change
        [present("C", np.array([9.0, 10.0]))],
    ], batch_rows=batch_rows)
    with h5py.File(tmp_path / "f.h5") as f:
        group = f["data/C"]
        assert sorted(group) == ["data", "data(1)", "data(2)", "is_data_present",
                                 "pulse_id", "timestamp"]
        first, second, current = group["data(1)"], group["data(2)"], group["data"]
        assert first.dtype == np.int32 and first[:, 0].tolist() == [1, 2]
        assert (first.attrs["first_row"], first.attrs["last_row"]) == (0, 1)
        assert second.dtype == np.float64 and second[:, 0].tolist() == [0, 0, 2.5, 0]
        assert (second.attrs["first_row"], second.attrs["last_row"]) == (2, 3)
        assert current.shape == (6, 2) and current.attrs["first_row"] == 4
        assert "last_row" not in current.attrs
        assert current[:].tolist() == [[0, 0]] * 4 + [[7, 8], [9, 10]]
        assert current.attrs["shape"].tolist() == [2]
        assert group["is_data_present"][:].tolist() == [1, 1, 1, 0, 1, 1]
        assert group["pulse_id"].shape == (6,)


@pytest.mark.parametrize("batch_rows", [1, 256])
def test_two_channels_change_definition_in_the_same_message(tmp_path, batch_rows):
    write(tmp_path / "f.h5", [
        [present("A", np.int16(1)), present("B", np.float32(1))],
        [present("A", np.int16(2)), present("B", np.float32(2))],
        [present("A", np.int32(3)), present("B", np.array([3.0, 4.0]))],
    ], batch_rows=batch_rows)
    with h5py.File(tmp_path / "f.h5") as f:
        for name, current in (("A", [[0], [0], [3]]), ("B", [[0, 0], [0, 0], [3, 4]])):
            group = f["data"][name]
            assert group["data(1)"][:, 0].tolist() == [1, 2], name
            assert group["data"][:].tolist() == current, name
            assert group["is_data_present"][:].tolist() == [1, 1, 1]


@pytest.mark.parametrize("batch_rows", [2, 256])
def test_truncate_drops_rows_as_if_never_appended(tmp_path, batch_rows):
    writer = OutputFile(tmp_path / "f.h5", GENERAL, batch_rows=batch_rows)
    messages = [
        [present("A", np.int16(0)), present("S", "zero")],
        [present("A", np.int16(1)), present("S", "one")],
        [present("A", np.int16(2)), present("S", "two")],
        [present("A", np.float64(3.5)), present("NEW", np.uint8(3))],  # dropped below
        [present("A", np.array([4.0, 4.0])), present("S", "four")],
    ]
    for row, values in enumerate(messages):
        writer.append(PULSE0 + row, values)
    writer.truncate(3)
    assert writer.rows == 3 and writer.pulse_ids.tolist() == [PULSE0, PULSE0 + 1, PULSE0 + 2]
    writer.append(PULSE0 + 5, [present("A", np.int16(5)), present("S", "five")])
    writer.close()
    with h5py.File(tmp_path / "f.h5") as f:
        a = f["data/A"]
        assert sorted(a) == ["data", "is_data_present", "pulse_id", "timestamp"]
        assert a["data"][:, 0].tolist() == [0, 1, 2, 5] and a["data"].dtype == np.int16
        assert "last_row" not in a["data"].attrs
        assert a["pulse_id"][:].tolist() == [PULSE0, PULSE0 + 1, PULSE0 + 2, PULSE0 + 5]
        assert f["data/S/data"].asstr()[:, 0].tolist() == ["zero", "one", "two", "five"]
        assert f["data/NEW/is_data_present"][:].tolist() == [0, 0, 0, 0]


def test_truncate_to_nothing_and_beyond_the_end(tmp_path):
    writer = OutputFile(tmp_path / "f.h5", GENERAL, batch_rows=1)
    writer.append(PULSE0, [present("A", np.int16(1))])
    writer.truncate(5)
    assert writer.rows == 1
    writer.truncate(0)
    writer.append(PULSE0 + 1, [present("A", np.float32(2))])
    writer.close()
    with h5py.File(tmp_path / "f.h5") as f:
        assert sorted(f["data/A"]) == ["data", "is_data_present", "pulse_id", "timestamp"]
        assert f["data/A/data"].dtype == np.float32 and f["data/A/data"][:, 0].tolist() == [2]


def test_channel_never_present_gets_zero_float64_data(tmp_path):
    write(tmp_path / "f.h5", [[absent("N"), present("A", np.int8(1))]] * 3)
    with h5py.File(tmp_path / "f.h5") as f:
        data = f["data/N/data"]
        assert data.dtype == np.float64 and data.shape == (3, 1)
        assert data[:].tolist() == [[0.0]] * 3
        assert data.attrs["bsread_type"] == "float64"
        assert f["data/N/is_data_present"][:].tolist() == [0, 0, 0]
        assert f["data/N/pulse_id"][:].tolist() == pulse_ids(3).tolist()


def test_rows_reach_the_file_in_batches(tmp_path):
    rows = 3 * 16 + 5
    writer = OutputFile(tmp_path / "f.h5", GENERAL, batch_rows=16)

    def rows_in_file() -> int:
        # Opened in this process, HDF5 shares the writer's handle: this shows what the
        # writer has handed to HDF5, not what is on disk.
        with h5py.File(writer.partial, "r") as f:
            return f["data/A/pulse_id"].shape[0] if "data/A" in f else 0

    for row in range(rows):
        writer.append(PULSE0 + 10 * row, [present("A", np.uint32(row)),
                                          present("B", np.full(3, row, dtype=np.int16))])
        if row == 14:
            assert rows_in_file() == 0
        if row == 15:
            assert rows_in_file() == 16
    assert writer.rows == rows
    assert rows_in_file() == 48  # the last, partial batch is still buffered
    writer.close()
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["data/A/data"][:, 0].tolist() == list(range(rows))
        assert f["data/B/data"][:, 2].tolist() == list(range(rows))
        assert f["data/B/pulse_id"][:].tolist() == pulse_ids(rows).tolist()


def test_general_group(tmp_path):
    write(tmp_path / "given.h5", [], created="2024-05-06T07:08:09+02:00")
    OutputFile(tmp_path / "missing.h5", {"user": "", "process": "p"}).close()
    with h5py.File(tmp_path / "given.h5") as f:
        general = {key: f["general"][key] for key in f["general"]}
        assert sorted(general) == ["created", "instrument", "process", "user"]
        assert all(ds.shape == () for ds in general.values())
        assert h5py.check_string_dtype(general["user"].dtype).encoding == "utf-8"
        assert general["created"][()].decode() == "2024-05-06T07:08:09+02:00"
        assert general["user"][()].decode() == "tester"
        assert general["instrument"][()].decode() == "SF-TEST"
    with h5py.File(tmp_path / "missing.h5") as f:
        assert f["general/user"][()].decode() == NOT_GIVEN
        assert f["general/instrument"][()].decode() == NOT_GIVEN
        assert f["general/process"][()].decode() == "p"
        assert datetime.fromisoformat(f["general/created"][()].decode()).tzinfo is not None


def test_slash_in_channel_name_is_escaped(tmp_path):
    write(tmp_path / "f.h5", [[present("SAR:A/B", np.int16(3))]])
    with h5py.File(tmp_path / "f.h5") as f:
        assert list(f["data"]) == ["SAR:A%2FB"]
        assert f["data/SAR:A%2FB"].attrs["name"] == "SAR:A/B"


def test_close_publishes_and_removes_partial(tmp_path):
    target = tmp_path / "f.h5"
    writer = OutputFile(target, GENERAL)
    assert writer.partial == tmp_path / "f.h5.partial"
    assert writer.partial.exists() and not target.exists()
    writer.append(PULSE0, [present("A", np.float64(1))])
    assert writer.close() == target
    assert target.exists() and not writer.partial.exists()
    assert writer.file_bytes == target.stat().st_size > 0
    with pytest.raises(ValueError):
        writer.append(PULSE0 + 1, [])


def test_existing_target_is_never_overwritten(tmp_path):
    target = tmp_path / "f.h5"
    target.write_bytes(b"keep")
    with pytest.raises(FileExistsError) as info:
        OutputFile(target, GENERAL)
    assert info.value.filename == str(target)
    assert target.read_bytes() == b"keep"
    assert not (tmp_path / "f.h5.partial").exists()


def test_stale_partial_is_never_overwritten(tmp_path):
    partial = tmp_path / "f.h5.partial"
    partial.write_bytes(b"stale")
    with pytest.raises(FileExistsError) as info:
        OutputFile(tmp_path / "f.h5", GENERAL)
    assert info.value.filename == str(partial)
    assert partial.read_bytes() == b"stale"


def test_partial_appearing_after_the_check_is_neither_overwritten_nor_removed(
        tmp_path, monkeypatch):
    """Another writer's .partial made between the check of the name and the creation:
    the exclusive creation fails, and the failure does not clean up what it did not make."""
    partial = tmp_path / "f.h5.partial"
    partial.write_bytes(b"another writer's")
    monkeypatch.setattr("sfbw_ioc.hdf5.file.taken_by", lambda target: None)
    with pytest.raises(FileExistsError):
        OutputFile(tmp_path / "f.h5", GENERAL)
    assert partial.read_bytes() == b"another writer's"


def test_target_appearing_while_writing_keeps_partial(tmp_path):
    target = tmp_path / "f.h5"
    writer = OutputFile(target, GENERAL)
    writer.append(PULSE0, [present("A", np.float64(1))])
    target.write_bytes(b"someone else")
    with pytest.raises(FileExistsError):
        writer.close()
    assert target.read_bytes() == b"someone else"
    assert writer.abandon() == writer.partial
    with h5py.File(writer.partial) as f:
        assert f["data/A/data"][:, 0].tolist() == [1.0]


def test_abandon_keeps_partial_and_publishes_nothing(tmp_path):
    target = tmp_path / "f.h5"
    writer = OutputFile(target, GENERAL)
    for row in range(3):
        writer.append(PULSE0 + row, [present("A", np.int64(row)), absent("N")])
    partial = writer.abandon()
    assert partial == tmp_path / "f.h5.partial" and partial.exists()
    assert not target.exists()
    assert writer.abandon() == partial  # again: still no error
    with h5py.File(partial) as f:
        assert f["data/A/data"][:, 0].tolist() == [0, 1, 2]
        assert f["data/N/data"].shape == (3, 1)
    with pytest.raises(ValueError):
        writer.flush()


def test_flushed_rows_are_visible_to_another_process(tmp_path):
    writer = OutputFile(tmp_path / "f.h5", GENERAL)
    for row in range(3):
        writer.append(PULSE0 + row, [present("A", np.float32(row))])
    writer.flush()
    writer.append(PULSE0 + 3, [present("A", np.float32(3))])  # buffered only
    # The writer holds HDF5's file lock, so the reader has to disable locking.
    reader = textwrap.dedent(f"""
        import h5py
        with h5py.File({str(writer.partial)!r}, "r", locking=False) as f:
            print(f["data/A/data"][:, 0].tolist(), f["data/A/pulse_id"][:].tolist())
    """)
    result = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True,
                            timeout=30)
    writer.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("] [") == ["[0.0, 1.0, 2.0",
                                          f"{PULSE0}, {PULSE0 + 1}, {PULSE0 + 2}]\n"]


def test_unwritable_directory_raises_oserror(tmp_path):
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(OSError):
        OutputFile(tmp_path / "afile" / "x.h5", GENERAL)


def test_bad_value_is_rejected_without_changing_the_file(tmp_path):
    writer = OutputFile(tmp_path / "f.h5", GENERAL)
    writer.append(PULSE0, [present("A", np.int8(1))])
    with pytest.raises(ValueError):
        writer.append(PULSE0 + 1, [ChannelValue(ChannelSpec("A", "complex", ()), np.int8(1), 0)])
    assert writer.rows == 1
    writer.append(PULSE0 + 2, [present("A", np.int8(2))])
    writer.close()
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["data/A/pulse_id"][:].tolist() == [PULSE0, PULSE0 + 2]


def run_child(script: str, *prefix: str) -> subprocess.CompletedProcess:
    """Run a python script in a child process, where a crash cannot take pytest along."""
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])


FILL_UNTIL_FAILURE = """
    import numpy as np
    from sfbw_ioc.bsread import ChannelSpec, ChannelValue
    from sfbw_ioc.hdf5.file import OutputFile

    def fill_until_failure(target):
        writer = OutputFile(target, {}, batch_rows=8)
        image = np.arange(256 * 256, dtype=np.float64).reshape(256, 256)
        value = ChannelValue(ChannelSpec("CAM", "float64", image.shape), image, 1)
        try:
            for row in range(1000):
                writer.append(row, [value])
                writer.flush()
        except OSError as exc:
            print("errno", exc.errno)
        return writer
"""


def test_write_failure_raises_oserror_and_refuses_further_writes(tmp_path):
    # A file size limit (in the child only) makes writes fail with EFBIG.
    result = run_child(FILL_UNTIL_FAILURE + f"""
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    writer = fill_until_failure({str(tmp_path / "f.h5")!r})
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        writer.append(1000, [])
    except OSError:
        print("refused")
    print("abandoned", writer.abandon())
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"errno {errno.EFBIG}", "refused", f"abandoned {tmp_path / 'f.h5.partial'}"]
    assert not (tmp_path / "f.h5").exists()


def test_abandon_on_a_full_disk_does_not_crash(tmp_path):
    # HDF5 crashes the process when a file whose writes failed is closed or its objects
    # are released (h5py#914); abandon() must avoid that while the disk is still full.
    # A 1 MiB tmpfs, mounted in a private user and mount namespace.
    disk = tmp_path / "disk"
    disk.mkdir()
    namespace = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                 'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"', str(disk))
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = run_child("pass", *namespace)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a namespace: {probe.stderr.strip()}")
    result = run_child(FILL_UNTIL_FAILURE + f"""
    import gc, os, h5py
    writer = fill_until_failure({str(disk / "f.h5")!r})
    partial = writer.abandon()
    print("abandoned", partial, os.path.exists(partial), os.path.exists({str(disk / "f.h5")!r}))
    del writer
    gc.collect()
    with h5py.File({str(tmp_path / "after.h5")!r}, "w") as f:  # HDF5 still works
        f["x"] = 1
    print("done")
    """, *namespace)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"errno {errno.ENOSPC}", f"abandoned {disk / 'f.h5.partial'} True False", "done"]


def _bytes_written_by_this_thread() -> int:
    with open(f"/proc/self/task/{threading.get_native_id()}/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


def test_a_flush_a_second_does_not_rewrite_much_more_than_the_new_rows(tmp_path):
    """A wide slow stream: each flush rewrites the partly filled last chunk of every
    dataset, so the chunk size bounds how much a second of rows costs the disk."""
    channels, rows_per_flush = 50, 100  # 100 Hz, flushed once a second
    writer = OutputFile(tmp_path / "f.h5", {})
    new_bytes = channels * rows_per_flush * (8 + 8 + 1)  # value, timestamp, present
    written = []
    for second in range(12):
        for row in range(rows_per_flush):
            pulse_id = second * rows_per_flush + row
            writer.append(pulse_id, [present(f"C{channel}", float(pulse_id), ts=pulse_id)
                                     for channel in range(channels)])
        before = _bytes_written_by_this_thread()
        writer.flush()
        written.append(_bytes_written_by_this_thread() - before)
    writer.close()
    # 8192-row chunks (64 KiB of float64) made every flush ~83x the new bytes; with
    # 1024-row chunks ~11x, ~25x when the rows cross into new chunks.
    assert max(written[2:]) < 40 * new_bytes, (written, new_bytes)
