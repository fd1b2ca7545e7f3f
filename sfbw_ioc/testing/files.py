"""Checks of the HDF5 files the IOC wrote, value by value against what the source sent."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for reading images)
import numpy as np

from ..bsread import ChannelSpec
from .sources import CHANNELS, timestamp_for, value_for


def read_file(path: Path, swmr: bool = False) -> h5py.File:
    return h5py.File(path, "r", swmr=swmr)


def assert_rows(path: Path, pulse_ids: list[int], channels=CHANNELS,
                absent: Callable[[str, int], bool] = lambda name, pulse_id: False,
                swmr: bool = False) -> None:
    """The file holds exactly ``pulse_ids``, in order, with every value bit-exact
    (``swmr``: opened as SWMR readers do, e.g. after its writer died)."""
    with read_file(path, swmr) as f:
        for spec in channels:
            group = f["data"][spec.name]
            assert group["pulse_id"][:].tolist() == pulse_ids, spec.name
            present = group["is_data_present"][:]
            data = group["data"]
            data = data.asstr()[:] if spec.type == "string" else data[:]
            for row, pulse_id in enumerate(pulse_ids):
                if absent(spec.name, pulse_id):
                    assert present[row] == 0, (spec.name, pulse_id)
                    assert group["timestamp"][row] == 0
                    continue
                assert present[row] == 1, (spec.name, pulse_id)
                assert group["timestamp"][row] == timestamp_for(pulse_id)
                assert_value(spec, data[row], value_for(spec, pulse_id))


def assert_value(spec: ChannelSpec, stored, sent) -> None:
    if spec.type == "string":
        assert stored.reshape(-1)[0] == sent
        return
    stored = np.asarray(stored).reshape(np.shape(sent))
    if spec.type == "bool":
        assert bool(stored) == bool(sent)
        return
    assert stored.dtype == np.dtype(spec.type).newbyteorder("=")
    assert np.array_equal(stored, sent), (spec.name, stored, sent)
