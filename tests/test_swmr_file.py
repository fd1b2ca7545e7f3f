"""OutputFile with SWMR, without processes: the file ends as the same file written
without SWMR, whatever appears after SWMR started."""
from __future__ import annotations

import h5py
import hdf5plugin  # noqa: F401  (reads the bitshuffle images)
import numpy as np

from sfbw_ioc.bsread import ChannelSpec, ChannelValue
from sfbw_ioc.hdf5.file import OutputFile
from sfbw_ioc.hdf5.options import OutputOptions
from sfbw_ioc.recorder.history import PvHistory, PvInfo, Update
from sfbw_ioc.recorder.names import RecordedPv

GENERAL = {"user": "tester", "process": "pytest", "instrument": "SF-TEST"}
PULSE0 = 10_000_000_000
T0 = 1_800_000_000_000_000_000


def values(row: int) -> list[ChannelValue]:
    found = [ChannelValue(ChannelSpec("A:F64", "float64", ()), np.array(row / 3), 1),
             ChannelValue(ChannelSpec("A:IMG", "uint16", (4, 6)),
                          np.full((4, 6), row, dtype=np.uint16), 1)]
    if row >= 12:  # a channel appearing after SWMR started
        found.append(ChannelValue(ChannelSpec("A:LATE", "string", ()), f"row {row}", 1))
    spec = ChannelSpec("A:WF", "int32", (3,) if row < 20 else (5,))  # a shape change
    found.append(ChannelValue(spec, np.arange(spec.shape[0], dtype=np.int32) + row, 1))
    return found


def write(path, swmr: bool) -> tuple[str, list[bool]]:
    history = PvHistory("S:AO")
    history.connect(PvInfo("float64", 1))
    options = OutputOptions(swmr=swmr, epics=((RecordedPv("S:AO"), history),))
    writer = OutputFile(path, GENERAL, options=options, batch_rows=4)
    active = []
    for row in range(30):
        history.add(Update(np.array([float(row)]), T0 + row * 10**7, 0, 0))
        writer.append(PULSE0 + row, values(row), T0 + row * 10**7)
        if row % 5 == 4:
            writer.flush()
            active.append(writer.swmr_active)
            active.append(options.active.get() == (str(writer.partial), swmr))
    writer.truncate(28)
    return str(writer.close()), active


def contents(path: str) -> dict[str, object]:
    found: dict[str, object] = {}
    with h5py.File(path) as f:
        def take(name, obj):
            if isinstance(obj, h5py.Dataset) and not name.startswith("general/created"):
                data = obj[()]
                found[name] = repr(data.tolist() if isinstance(data, np.ndarray) else data)
        f.visititems(take)
    return found


def test_swmr_file_equals_the_file_written_without(tmp_path) -> None:
    plain, _ = write(tmp_path / "plain.h5", swmr=False)
    swmr, active = write(tmp_path / "swmr.h5", swmr=True)
    assert all(active)  # SWMR on after every flush, ACTIVE_FILE told so
    expected = contents(plain)
    assert "data/A:LATE/data" in expected and "data/A:WF/data(1)" in expected
    assert contents(swmr) == expected
    with h5py.File(swmr) as f:
        assert f["epics/S:AO/value"][:].tolist() == [float(row) for row in range(28)]
