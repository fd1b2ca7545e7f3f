"""The ophyd device as a detector of a real RunEngine, against the IOC as a subprocess
on a real 100 Hz stream: the files written and the documents emitted."""
from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ophyd", reason="the bluesky extra is not installed")
pytest.importorskip("bluesky", reason="the bluesky extra is not installed")

from bluesky import RunEngine  # noqa: E402
from bluesky.plans import count  # noqa: E402
from bluesky.utils import FailedStatus  # noqa: E402

from sfbw_ioc.testing.ioc import REPO  # noqa: E402
from sfbw_ioc.testing.sources import paced_ioc  # noqa: E402
from sfbw_ioc.testing.files import assert_rows  # noqa: E402
from sfbw_ioc.bridges.bluesky import AcquisitionFailed, AcquisitionLength, SfbwWriter  # noqa: E402

_names = (f"run{n}" for n in itertools.count())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ca_ports):
    root = tmp_path_factory.mktemp("bluesky")
    with paced_ioc(ca_ports(), "BSKY", root, tmp_path_factory.mktemp("log") / "ioc.log",
                   first_pulse_id=50_000_000_000) as ioc:
        yield ioc, root


@pytest.fixture
def ioc(setup):
    return setup[0]


@pytest.fixture
def root(setup):
    return setup[1]


def run(device: SfbwWriter, num: int) -> tuple[list[tuple[str, dict]], Exception | None]:
    """``count([device], num)`` on a new RunEngine: its documents, and what it raised."""
    documents: list[tuple[str, dict]] = []
    engine = RunEngine({})
    try:
        engine(count([device], num=num), lambda name, doc: documents.append((name, doc)))
    except Exception as error:  # noqa: BLE001  (a failing run is what some tests want)
        return documents, error
    return documents, None


def of_kind(documents: list[tuple[str, dict]], kind: str) -> list[dict]:
    return [doc for name, doc in documents if name == kind]


def test_count_writes_a_file_per_event_with_its_pulse_range(ioc, root):
    name = next(_names)
    device = SfbwWriter(ioc.prefix, name="sfbw", file_path="scans", file_name=name,
                        length=AcquisitionLength(pulses=20))
    number = int(ioc.get("FILE_NUMBER"))  # the IOC's: stage leaves it as it is
    documents, error = run(device, num=3)
    assert error is None, ioc.log()[-3000:]

    assert [kind for kind, _ in documents] == ["start", "descriptor", "event", "event",
                                               "event", "stop"]
    (descriptor,) = of_kind(documents, "descriptor")
    keys = descriptor["data_keys"]
    assert keys["sfbw_last_file"]["dtype"] == "string"
    for key in ("first_pulse_id", "last_pulse_id", "written", "missing", "lost"):
        assert keys[f"sfbw_{key}"]["dtype"] == "integer", key
    assert keys["sfbw_last_file"]["source"] == f"PV:{ioc.prefix}LAST_FILE"
    configuration = descriptor["configuration"]["sfbw"]["data"]
    assert configuration["sfbw_file_name"] == name
    assert configuration["sfbw_auto_increment"] == "Yes"

    events = of_kind(documents, "event")
    assert [event["seq_num"] for event in events] == [1, 2, 3]
    previous_last = 0
    for event in events:
        data = event["data"]
        path = Path(data["sfbw_last_file"])
        assert path == root / "scans" / f"{name}_{number:04d}.h5"
        number += 1
        first, last = data["sfbw_first_pulse_id"], data["sfbw_last_pulse_id"]
        assert last - first + 1 == 20 and first > previous_last
        assert (data["sfbw_written"], data["sfbw_missing"], data["sfbw_lost"]) == (20, 0, 0)
        assert_rows(path, list(range(first, last + 1)))
        previous_last = last

    (stop,) = of_kind(documents, "stop")
    assert stop["exit_status"] == "success" and stop["num_events"] == {"primary": 3}
    # unstaged: idle, the naming PVs back as they were, the next number composed
    assert ioc.text("STATE") == "IDLE"
    assert ioc.text("FILE_PATH") == "" and ioc.text("FILE_NAME") == ""
    assert ioc.get("FILE_NUMBER") == number


def test_seconds_and_pulse_range_on_writer_2(ioc, root):
    name = next(_names)
    device = SfbwWriter(ioc.prefix, name="w2", writer="W2:", file_name=name,
                        length=AcquisitionLength(seconds=0.3))
    documents, error = run(device, num=1)
    assert error is None, ioc.log()[-3000:]
    data = of_kind(documents, "event")[0]["data"]
    first, last = data["w2_first_pulse_id"], data["w2_last_pulse_id"]
    assert Path(data["w2_last_file"]) == root / f"{name}_0000.h5"
    assert data["w2_written"] == last - first + 1 >= 10  # 0.3 s of a 100 Hz stream
    assert_rows(root / f"{name}_0000.h5", list(range(first, last + 1)))

    # a range that lies in the buffer: exactly those pulses, taken from the past
    device.set_length(pulse_range=(first + 2, first + 6))
    documents, error = run(device, num=1)
    assert error is None, ioc.log()[-3000:]
    data = of_kind(documents, "event")[0]["data"]
    assert (data["w2_first_pulse_id"], data["w2_last_pulse_id"]) == (first + 2, first + 6)
    assert_rows(Path(data["w2_last_file"]), list(range(first + 2, first + 7)))
    assert data["w2_last_file"].endswith(f"{name}_0001.h5")


def test_a_refused_start_fails_the_run_and_leaves_the_ioc_idle(ioc, root):
    name = next(_names)
    device = SfbwWriter(ioc.prefix, name="once", file_name=name, auto_increment=False,
                        length=AcquisitionLength(pulses=5))
    number = int(ioc.get("FILE_NUMBER"))
    documents, error = run(device, num=2)  # the second file has the first one's name
    assert isinstance(error, FailedStatus), error
    reason = str(error.args[0].exception())  # the trigger's status
    assert reason.startswith("once: start refused: ") and "exists already" in reason
    (event,) = of_kind(documents, "event")
    written = root / f"{name}_{number:04d}.h5"
    assert event["data"]["once_last_file"] == str(written)
    assert_rows(written, list(range(event["data"]["once_first_pulse_id"],
                                    event["data"]["once_last_pulse_id"] + 1)))
    assert str(written) in reason
    (stop,) = of_kind(documents, "stop")
    assert stop["exit_status"] == "fail"
    assert ioc.text("STATE") == "IDLE"
    assert ioc.text("AUTO_INCREMENT") == "Yes"  # put back by unstage
    assert ioc.get("FILE_NUMBER") == number


def test_unstage_during_an_acquisition_closes_its_file_and_leaves_the_ioc_idle(ioc, root):
    name = next(_names)
    device = SfbwWriter(ioc.prefix, name="long", file_path="long", file_name=name,
                        length=AcquisitionLength(seconds=60))
    device.stage()
    status = device.trigger()
    ioc.wait_for("STATE", 2)  # WRITING
    started = time.monotonic()
    device.unstage()
    with pytest.raises(AcquisitionFailed, match="unstaged during the acquisition"):
        status.wait(10)
    assert time.monotonic() - started < 10
    assert ioc.text("STATE") == "IDLE"
    closed = Path(ioc.text("LAST_FILE"))
    assert closed.parent == root / "long" and closed.name.startswith(name)
    first, last = int(ioc.get("FILE_FIRST_PULSE_ID")), int(ioc.get("FILE_LAST_PULSE_ID"))
    assert_rows(closed, list(range(first, last + 1)))
    assert ioc.text("FILE_PATH") == ""  # unstaged


def test_a_refused_file_template_fails_the_stage(ioc):
    device = SfbwWriter(ioc.prefix, name="bad", file_template="%s_%d.h5",
                        length=AcquisitionLength(pulses=5))
    documents, error = run(device, num=1)
    assert isinstance(error, AcquisitionFailed), error
    assert str(error) == (f"{ioc.prefix}FILE_TEMPLATE refused '%s_%d.h5': template "
                          "'%s_%d.h5': conversion 2 is '%d', it must be %s for the name")
    assert of_kind(documents, "event") == []
    assert ioc.text("FILE_TEMPLATE") == "%s%s_%04d.h5"


def test_the_module_imports_without_ophyd():
    blocked = ("import sys; sys.modules['ophyd'] = None\n"
               "import sfbw_ioc.bluesky as device\n"
               "try:\n    device.SfbwWriter('X:', name='x')\n"
               "except ImportError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install 'sfbw-ioc[bluesky]'" in result.stdout
