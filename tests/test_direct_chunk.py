"""Direct-chunk writes through ctypes (sfbw_ioc.hdf5.direct_chunk): the same file as h5py's
write_direct_chunk, and h5py's error when the write fails."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from sfbw_ioc.bsread.compression import compress
from sfbw_ioc.hdf5.direct_chunk import _h5py_write, chunk_writer

REPO = Path(__file__).resolve().parents[1]


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 4000, (48, 64), dtype=np.uint16) for _ in range(count)]


def _write(path: Path, writer, images: list[np.ndarray]) -> None:
    with h5py.File(path, "w") as file:
        data = file.create_dataset("data", (len(images), 48, 64), np.uint16,
                                   chunks=(1, 48, 64), **hdf5plugin.Bitshuffle(cname="lz4"))
        for row, image in enumerate(images):
            chunk = compress(image.tobytes(), "bitshuffle_lz4", 2, False)
            writer(data.id, (row, 0, 0), memoryview(chunk))


def test_the_gil_free_way_is_taken_here_and_writes_what_h5py_writes(tmp_path):
    writer = chunk_writer()
    assert writer is not _h5py_write  # h5py's own libhdf5 was found and works
    images = _images(20)
    _write(tmp_path / "ctypes.h5", writer, images)
    _write(tmp_path / "h5py.h5", _h5py_write, images)
    with h5py.File(tmp_path / "ctypes.h5") as ours, h5py.File(tmp_path / "h5py.h5") as theirs:
        assert np.array_equal(ours["data"][:], np.stack(images))
        for row in range(len(images)):
            assert (ours["data"].id.read_direct_chunk((row, 0, 0))
                    == theirs["data"].id.read_direct_chunk((row, 0, 0)))


def test_writes_from_two_threads_at_once_are_serialized_with_h5py(tmp_path):
    # h5py's lock is held around the call: another thread's h5py calls wait for it.
    images = _images(200)
    with h5py.File(tmp_path / "two.h5", "w") as file:
        data = file.create_dataset("data", (len(images), 48, 64), np.uint16,
                                   chunks=(1, 48, 64), **hdf5plugin.Bitshuffle(cname="lz4"))
        rows = file.create_dataset("rows", (0,), np.int64, maxshape=(None,), chunks=(64,))
        writer = chunk_writer()
        chunks = [compress(image.tobytes(), "bitshuffle_lz4", 2, False) for image in images]

        def grow_rows() -> None:
            for row in range(len(images)):
                rows.resize((row + 1,))
                rows[row] = row
        other = threading.Thread(target=grow_rows)
        other.start()
        for row, chunk in enumerate(chunks):
            writer(data.id, (row, 0, 0), chunk)
        other.join()
        assert np.array_equal(data[:], np.stack(images))
        assert np.array_equal(rows[:], np.arange(len(images)))


def test_a_failed_write_raises_h5pys_error(tmp_path):
    # A file size limit (in a child only): the write fails in HDF5, and the caller gets
    # the OSError h5py raises for it, not a silent status.
    script = textwrap.dedent(f"""
        import os, resource, signal
        import h5py, numpy as np
        from sfbw_ioc.hdf5.direct_chunk import chunk_writer
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        file = h5py.File({str(tmp_path / "f.h5")!r}, "w")
        data = file.create_dataset("data", (64, 1 << 16), np.uint8, chunks=(1, 1 << 16))
        file.flush()
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, resource.RLIM_INFINITY))
        write = chunk_writer()
        try:
            for row in range(64):
                write(data.id, (row, 0), bytes(1 << 16))
        except OSError as error:
            print("OSError at row", row, "from h5py:", "write" in str(error).lower(),
                  flush=True)
        os._exit(0)  # closing a file whose writes failed crashes HDF5 (h5py#914)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert words[:3] == ["OSError", "at", "row"] and 0 < int(words[3]) < 8, result.stdout
    assert words[-1] == "True", result.stdout
