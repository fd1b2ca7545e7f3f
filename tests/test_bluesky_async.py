"""The ophyd-async device with the real readers: a real RunEngine against the IOC as a
subprocess on a real 100 Hz stream, bluesky's TiledWriter into tiled's own SQLite
catalog, every channel read back through the tiled client and compared with h5py."""
from __future__ import annotations

import itertools
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import h5py
import hdf5plugin  # noqa: F401  (bitshuffle, for reading the images with h5py)
import numpy as np
import pytest

pytest.importorskip("ophyd_async", reason="the bluesky extra is not installed")
pytest.importorskip("tiled.server", reason="the test extra is not installed")

from bluesky import RunEngine  # noqa: E402
from bluesky.callbacks.tiled_writer import TiledWriter  # noqa: E402
from bluesky.plans import count  # noqa: E402
from bluesky.utils import FailedStatus  # noqa: E402
from event_model import DocumentNames, schema_validators  # noqa: E402
from ophyd_async.core import init_devices  # noqa: E402
from tiled.catalog import from_uri  # noqa: E402
from tiled.client import Context, from_context  # noqa: E402
from tiled.server.app import build_app  # noqa: E402

from sfbw_ioc.testing.files import assert_rows  # noqa: E402
from sfbw_ioc.testing.ioc import REPO, IocProcess, poll  # noqa: E402
from sfbw_ioc.testing.sources import paced_ioc, streaming_ioc  # noqa: E402
from sfbw_ioc.bluesky import (AcquisitionFailed, AcquisitionLength, SfbwDetector,  # noqa: E402
                              SfbwFlyInfo, fly_scan)
from sfbw_ioc.bsread import ChannelSpec  # noqa: E402

_names = (f"async{n}" for n in itertools.count())
# A scalar, a waveform and a camera image (bitshuffle_lz4 chunks) of sfbw_ioc.testing.sources.CHANNELS
CHECKED = {"T:F64": "scalar", "T:WF": "waveform", "T:IMG": "image"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Where the tests' IOCs write (each in a folder of its own): tiled may read it."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def setup(outputs, tmp_path_factory, ca_ports):
    root = outputs / "main"
    root.mkdir()
    with paced_ioc(ca_ports(), "BSKA", root, tmp_path_factory.mktemp("log") / "ioc.log",
                   first_pulse_id=60_000_000_000) as ioc:
        yield ioc, root


@pytest.fixture(scope="module")
def tiled(outputs, tmp_path_factory):
    """A tiled server (in process) on its own SQLite catalog; the IOCs' output roots
    are readable storage."""
    store = tmp_path_factory.mktemp("tiled")
    catalog = from_uri(f"sqlite:///{store}/catalog.db", init_if_not_exists=True,
                       writable_storage={"filesystem": str(store / "data"),
                                         "sql": f"duckdb:///{store}/tables.db"},
                       readable_storage=[str(outputs)])
    with Context.from_app(build_app(catalog)) as context:
        yield from_context(context)


@pytest.fixture
def ioc(setup):
    return setup[0]


class Run:
    """A RunEngine whose documents go to tiled and to a list, each validated first."""

    def __init__(self, client) -> None:
        self.engine = RunEngine({})
        self.documents: list[tuple[str, dict]] = []
        self.engine.subscribe(self._validated)
        self.engine.subscribe(TiledWriter(client, batch_size=1))

    def _validated(self, name: str, document: dict) -> None:
        schema_validators[DocumentNames(name)].validate(document)
        self.documents.append((name, document))

    def of_kind(self, kind: str) -> list[dict]:
        return [document for name, document in self.documents if name == kind]

    def detector(self, ioc: IocProcess, **kwargs) -> SfbwDetector:
        with init_devices(connect=True):
            detector = SfbwDetector(ioc.prefix, **kwargs)
        return detector


@pytest.fixture
def run(tiled):
    return Run(tiled)


def stored(path: Path, dataset: str) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return h5[dataset][()]


def assert_served_as_stored(stream, files: list[Path], name: str, channel: str) -> None:
    """tiled's array of a channel's data and pulse ids: the files' datasets, row by row."""
    data = np.concatenate([stored(path, f"/data/{channel}/data") for path in files])
    pulse_ids = np.concatenate([stored(path, f"/data/{channel}/pulse_id") for path in files])
    if CHECKED.get(channel) == "scalar" or data.shape[1:] == (1,):
        data = data[:, 0]  # a scalar is stored as (N, 1)
    served = stream[f"{name}-{channel}"].read()
    assert served.dtype == data.dtype and served.shape == data.shape, channel
    assert np.array_equal(served, data), channel
    assert np.array_equal(stream[f"{name}-{channel}-pulse_id"].read(), pulse_ids), channel


# 30 pulse ids either way: 0.3 s at the IOC's PULSE_RATE (100 Hz), from the first row
THIRTY_PULSES = [AcquisitionLength(pulses=30), AcquisitionLength(seconds=0.3)]


@pytest.mark.parametrize("length", THIRTY_PULSES, ids=repr)
def test_a_fly_scan_is_served_by_tiled_row_by_row(ioc, run, tiled, length):
    name = next(_names)
    detector = run.detector(ioc, name="fly", file_path="fly", file_name=name)
    (uid,) = run.engine(fly_scan(detector, SfbwFlyInfo(length=length)))

    (resource_docs, datum_docs) = run.of_kind("stream_resource"), run.of_kind("stream_datum")
    path = Path(ioc.text("LAST_FILE"))
    assert all(doc["uri"] == f"file://localhost{path}" for doc in resource_docs)
    keys = {doc["data_key"] for doc in resource_docs}
    assert "fly-T:STR" not in keys  # strings stay in the file
    assert keys == {f"fly-{channel}{suffix}" for channel in
                    ("T:F64", "T:I32", "T:U64", "T:BOOL", "T:WF", "T:IMG")
                    for suffix in ("", "-pulse_id")}
    assert all(doc["indices"] == {"start": 0, "stop": 30} for doc in datum_docs)
    (descriptor,) = run.of_kind("descriptor")
    image = descriptor["data_keys"]["fly-T:IMG"]
    assert (image["shape"], image["dtype"], image["dtype_numpy"], image["external"]) == (
        [8, 12], "array", "<u2", "STREAM:")
    scalar = descriptor["data_keys"]["fly-T:F64"]
    assert (scalar["shape"], scalar["dtype"], scalar["dtype_numpy"]) == ([], "number", "<f8")
    assert descriptor["data_keys"]["fly-T:I32-pulse_id"]["dtype"] == "integer"
    (stop,) = run.of_kind("stop")
    assert stop["exit_status"] == "success" and stop["num_events"] == {"primary": 30}

    first = int(ioc.get("FILE_FIRST_PULSE_ID"))
    assert_rows(path, list(range(first, first + 30)))
    stream = tiled[uid]["primary"]
    for channel in ("T:F64", "T:I32", "T:U64", "T:BOOL", "T:WF", "T:IMG"):
        assert_served_as_stored(stream, [path], "fly", channel)
    assert stream["fly-T:IMG"].read().shape == (30, 8, 12)
    assert ioc.text("STATE") == "IDLE" and ioc.text("FILE_PATH") == ""  # unstaged


@pytest.mark.parametrize("length", [AcquisitionLength(pulses=10),
                                    AcquisitionLength(seconds=0.1)], ids=repr)
def test_a_three_point_step_scan_is_served_as_the_files_rows(ioc, run, tiled, length):
    """Every step the same rows, in seconds too (descriptors fix the shapes): 10 pulse
    ids, from the newest received or from the first row after the trigger."""
    name = next(_names)
    detector = run.detector(ioc, name="step", file_path="step", file_name=name,
                            length=length)
    (uid,) = run.engine(count([detector], num=3))

    events = run.of_kind("event")
    files = [Path(event["data"]["step-last_file"]) for event in events]
    assert len(set(files)) == 3 and all(path.parent.name == "step" for path in files)
    previous_last = 0
    for event, path in zip(events, files):
        first = event["data"]["step-first_pulse_id"]
        assert first > previous_last and event["data"]["step-written"] == 10
        assert_rows(path, list(range(first, first + 10)))
        previous_last = event["data"]["step-last_pulse_id"]
    datums = [doc for doc in run.of_kind("stream_datum")]
    assert len(datums) == 3 * 12
    assert {(d["indices"]["start"], d["indices"]["stop"]) for d in datums} == {(0, 1)}
    assert sorted({d["seq_nums"]["start"] for d in datums}) == [1, 2, 3]
    (descriptor,) = run.of_kind("descriptor")
    assert descriptor["data_keys"]["step-T:WF"]["shape"] == [10, 16]
    assert descriptor["data_keys"]["step-T:F64"]["shape"] == [10]

    stream = tiled[uid]["primary"]
    for channel in CHECKED:
        assert_served_as_stored(stream, files, "step", channel)
    assert stream["step-T:IMG"].read().shape == (30, 8, 12)


def test_the_async_device_fails_a_refused_setting_at_once_with_the_reason(ioc, run):
    detector = run.detector(ioc, name="bad", file_path="../../etc",
                            length=AcquisitionLength(pulses=5))
    started = time.monotonic()
    with pytest.raises(FailedStatus) as failed:
        run.engine(count([detector], num=1))
    assert time.monotonic() - started < 5
    reason = failed.value.args[0].exception()  # the stage's status
    assert isinstance(reason, AcquisitionFailed)
    assert str(reason).startswith(f"{ioc.prefix}FILE_PATH refused '../../etc': ")
    assert "is outside the output root" in str(reason)
    assert ioc.text("FILE_PATH") == ""
    assert run.of_kind("event") == []


@pytest.fixture(scope="module")
def sent_by_the_test(outputs, tmp_path_factory, ca_ports):
    """An IOC of its own, of PULSE_RATE 50, on a source that sends only what a test
    sends: (ioc, source, output root)."""
    root = outputs / "sent"
    root.mkdir()
    with streaming_ioc(ca_ports(), "BSKT", root, tmp_path_factory.mktemp("log") / "ioc.log",
                       "--pulse-rate", "50") as (ioc, source):
        yield ioc, source, root


def send_once_waiting(ioc: IocProcess, send: Callable[[], None]) -> None:
    """``send()`` once the writer waits for its start (a thread of the test's)."""
    ioc.wait_for("STATE", "WAITING", as_string=True)
    send()


WAVE_BEFORE = ChannelSpec("T:WAVE", "float32", (16,))
WAVE_AFTER = ChannelSpec("T:WAVE", "int16", (5,))
SCALAR = ChannelSpec("T:X", "float64", ())


def test_a_channel_that_changed_type_gets_a_resource_of_its_own(sent_by_the_test, run,
                                                                tiled):
    """A step: the waveform is float32 for 4 pulses, then int16 of another length."""
    ioc, source, root = sent_by_the_test
    first = 70_000_000_000
    detector = run.detector(ioc, name="tc", file_name="changed",
                            length=AcquisitionLength(pulse_range=(first, first + 7)))
    source.send_range(first - 3, first + 3, channels=(SCALAR, WAVE_BEFORE))
    source.send_range(first + 4, first + 9, channels=(SCALAR, WAVE_AFTER))
    poll(lambda: ioc.get("LAST_PULSE_ID") == first + 9, what="the last pulse")
    (uid,) = run.engine(count([detector], num=1))

    path = Path(ioc.text("LAST_FILE"))
    keys = {doc["data_key"]: doc for doc in run.of_kind("stream_resource")}
    assert keys["tc-T:WAVE(1)"]["parameters"]["dataset"] == "/data/T:WAVE/data(1)"
    assert keys["tc-T:WAVE"]["parameters"]["dataset"] == "/data/T:WAVE/data"
    (descriptor,) = run.of_kind("descriptor")
    assert descriptor["data_keys"]["tc-T:WAVE(1)"]["shape"] == [4, 16]
    assert descriptor["data_keys"]["tc-T:WAVE(1)"]["dtype_numpy"] == "<f4"
    assert descriptor["data_keys"]["tc-T:WAVE"]["shape"] == [8, 5]
    stream = tiled[uid]["primary"]
    for key, dataset in (("tc-T:WAVE(1)", "data(1)"), ("tc-T:WAVE", "data")):
        assert np.array_equal(stream[key].read(), stored(path, f"/data/T:WAVE/{dataset}"))
    assert stored(path, "/data/T:WAVE/data(1)")[3].tolist() == (
        (np.arange(16) + (first + 3) % 100_000) / 7.0).astype(np.float32).tolist()


def test_in_a_fly_scan_each_earlier_definition_is_a_stream_of_its_own(sent_by_the_test,
                                                                      run, tiled):
    """The types change while the file is written: the waveform float32, then int16 of
    another length from the 5th row; the scalar float64, int32 from the 3rd row and
    float64 again from the 7th. Each earlier definition's events are its rows."""
    ioc, source, root = sent_by_the_test
    first = 71_000_000_000
    int32 = ChannelSpec("T:X", "int32", ())

    def channels(pulse_id: int) -> tuple[ChannelSpec, ...]:
        row = pulse_id - first
        return (int32 if 2 <= row < 6 else SCALAR, WAVE_AFTER if row >= 4 else WAVE_BEFORE)

    def send() -> None:
        for pulse_id in range(first - 2, first + 10):
            source.send(pulse_id, channels=channels(pulse_id))

    detector = run.detector(ioc, name="tf", file_name="changed_fly", timeout=60,
                            length=AcquisitionLength(pulse_range=(first, first + 7)))
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(send_once_waiting, ioc, send)
        (uid,) = run.engine(fly_scan(detector, stream="fly"))
        sent.result()

    path = Path(ioc.text("LAST_FILE"))
    assert path.parent == root and path.name.startswith("changed_fly_")
    streams = {"fly": ["tf-T:X", "tf-T:WAVE"], "fly-T:X(1)": ["tf-T:X(1)"],
               "fly-T:X(2)": ["tf-T:X(2)"], "fly-T:WAVE(1)": ["tf-T:WAVE(1)"]}
    rows = {"fly": 8, "fly-T:X(1)": 2, "fly-T:X(2)": 6, "fly-T:WAVE(1)": 4}
    (stop,) = run.of_kind("stop")
    assert stop["exit_status"] == "success" and stop["num_events"] == rows
    descriptors = {doc["name"]: doc for doc in run.of_kind("descriptor")}
    assert descriptors["fly-T:WAVE(1)"]["data_keys"]["tf-T:WAVE(1)"]["shape"] == [16]
    assert descriptors["fly-T:X(2)"]["data_keys"]["tf-T:X(2)"]["dtype_numpy"] == "<i4"
    datums = run.of_kind("stream_datum")
    assert {(d["indices"]["stop"], d["seq_nums"]["stop"]) for d in datums} == {
        (n, n + 1) for n in rows.values()}

    with h5py.File(path, "r") as h5:
        group = h5["data/T:X"]
        assert [group[name].dtype.str for name in ("data(1)", "data(2)", "data")] == [
            "<f8", "<i4", "<f8"]
        pulse_ids = group["pulse_id"][()]
    assert pulse_ids.tolist() == list(range(first, first + 8))
    run_node = tiled[uid]
    for name, keys in streams.items():
        stream = run_node[name]
        for key in keys:
            channel, dataset = key.removeprefix("tf-"), "data"
            if "(" in channel:
                channel, number = channel.rstrip(")").split("(")
                dataset = f"data({number})"
            data = stored(path, f"/data/{channel}/{dataset}")
            served = stream[key].read()
            assert served.dtype == data.dtype, key
            assert np.array_equal(served, data[:, 0] if data.shape[1:] == (1,) else data), key
            assert np.array_equal(stream[f"{key}-pulse_id"].read(),
                                  pulse_ids[:rows[name]]), key
    assert ioc.text("STATE") == "IDLE"


def test_a_length_in_seconds_counts_pulse_ids_at_the_iocs_pulse_rate(sent_by_the_test, run):
    """0.1 s at this IOC's 50 Hz are 5 pulse ids from the first row after the start,
    however fast the messages come."""
    ioc, source, root = sent_by_the_test
    assert ioc.get("PULSE_RATE") == 50
    first = 72_000_000_000
    detector = run.detector(ioc, name="ts", file_name="seconds", timeout=60,
                            length=AcquisitionLength(seconds=0.1))
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(send_once_waiting, ioc, lambda: source.send_range(
            first, first + 9, channels=(SCALAR,)))
        run.engine(count([detector], num=1))
        sent.result()
    (event,) = run.of_kind("event")
    data = event["data"]
    assert (data["ts-first_pulse_id"], data["ts-last_pulse_id"]) == (first, first + 4)
    assert stored(Path(data["ts-last_file"]), "/data/T:X/pulse_id").tolist() == list(
        range(first, first + 5))


def test_without_ophyd_async_the_classic_device_imports_and_the_new_one_says_why():
    blocked = ("import sys; sys.modules['ophyd_async'] = None\n"
               "from sfbw_ioc.bluesky import SfbwWriter\n"
               "try:\n    from sfbw_ioc.bluesky import SfbwDetector\n"
               "except ImportError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("sfbw_ioc.bluesky.SfbwDetector needs ophyd-async: "
                                     "pip install 'sfbw-ioc[bluesky]'")
