"""Every shared test vector, replayed as a live stream through the IOC into a file: the
file holds exactly what the reference sender was asked to send."""
from __future__ import annotations

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter for reading images)
import numpy as np
import pytest

from sfbw_ioc.testing.ioc import IocProcess, poll, unique_prefix
from sfbw_ioc.testing.sources import BsreadSource
from vectors import CASES, expected_value, load_case


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ca_ports):
    root = tmp_path_factory.mktemp("vectors")
    source = BsreadSource(mode="pub")  # and the IOC subscribes: the PUB/SUB pattern
    ioc = IocProcess(ca_ports(), unique_prefix("VEC"),
                     ["--stream", source.address, "--mode", "sub", "--output-root", str(root)],
                     tmp_path_factory.mktemp("log") / "ioc.log")
    # PUB drops what it sends before the subscription is through: probe until it is.
    poll(lambda: source.send(1) or ioc.get("LAST_PULSE_ID"), what="the subscription")
    yield ioc, source, root
    source.close()
    assert ioc.stop() == 0, ioc.log()


@pytest.mark.parametrize("case", CASES)
def test_a_replayed_vector_is_written_exactly(setup, case):
    ioc, source, root = setup
    messages, expected, npz = load_case(case)
    ioc.put("OUTPUT_FILE", f"{case}.h5")
    ioc.put("START_NOW", 1)
    for frames in messages:
        source.send_frames(frames)
    poll(lambda: ioc.get("WRITTEN") == len(messages), what=f"{len(messages)} rows")
    ioc.put("STOP_NOW", 1)
    assert ioc.get("MALFORMED") == 0

    sent = expected["messages"]
    with h5py.File(root / f"{case}.h5") as f:
        names = {name for message in sent for name in message["channels"]}
        assert set(f["data"]) == names
        for name in names:
            group = f["data"][name]
            assert group["pulse_id"][:].tolist() == [m["pulse_id"] for m in sent]
            for row, message in enumerate(sent):
                want = expected_value(message["channels"].get(name), npz)
                assert group["is_data_present"][row] == (want is not None), (name, row)
                if want is None:
                    continue
                timestamp = message["global_timestamp"]
                assert group["timestamp"][row] == timestamp["sec"] * 10**9 + timestamp["ns"]
                assert_equal_value(stored_value(group, row), want, (name, row))


def stored_value(group: h5py.Group, row: int):
    """Row ``row`` of whichever data definition (``data`` or ``data(k)``) covers it."""
    for key in sorted(k for k in group if k.startswith("data")):
        data = group[key]
        if data.attrs["first_row"] <= row <= data.attrs.get("last_row", np.inf):
            value = data.asstr()[row] if data.attrs["bsread_type"] == "string" else data[row]
            return value, data.attrs["bsread_type"]
    raise AssertionError(f"no data of {group.name} covers row {row}")


def assert_equal_value(stored, want, where) -> None:
    value, bsread_type = stored
    if isinstance(want, str):
        assert value.reshape(-1)[0] == want, where
        return
    value = np.asarray(value).reshape(want.shape)
    if bsread_type == "bool":
        assert np.array_equal(value.astype(bool), want), where
        return
    assert value.dtype == want.dtype.newbyteorder("="), where
    assert np.array_equal(value, want), where
