"""The classic ophyd device on both of ophyd's control layers (pyepics, and caproto's
client that ``pip install '.[bluesky]'`` alone leaves): a file written, and every
refusal of the IOC failing at once with its reason, not at the timeout."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

ophyd = pytest.importorskip("ophyd", reason="the bluesky extra is not installed")
pytest.importorskip("bluesky", reason="the bluesky extra is not installed")

from bluesky import RunEngine  # noqa: E402
from bluesky.plans import count  # noqa: E402
from bluesky.utils import FailedStatus  # noqa: E402

from sfbw_ioc.testing.files import assert_rows  # noqa: E402
from sfbw_ioc.testing.sources import paced_ioc  # noqa: E402
from sfbw_ioc.bridges.bluesky import AcquisitionFailed, AcquisitionLength, SfbwWriter  # noqa: E402

_names = (f"layer{n}" for n in itertools.count())
# Far below: a refusal must not wait for it.
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ca_ports):
    root = tmp_path_factory.mktemp("layers")
    with paced_ioc(ca_ports(), "BSKL", root, tmp_path_factory.mktemp("log") / "ioc.log",
                   first_pulse_id=80_000_000_000) as ioc:
        yield ioc, root


@pytest.fixture(params=["pyepics", "caproto"])
def layer(request):
    """ophyd's control layer for the devices the test makes."""
    ophyd.set_cl(request.param)
    yield request.param
    ophyd.set_cl("pyepics")


def run(device: SfbwWriter, num: int) -> tuple[list[tuple[str, dict]], Exception | None]:
    documents: list[tuple[str, dict]] = []
    try:
        RunEngine({})(count([device], num=num), lambda name, doc: documents.append((name, doc)))
    except Exception as error:  # noqa: BLE001  (a failing run is what some tests want)
        return documents, error
    return documents, None


def test_a_file_is_written(setup, layer):
    ioc, root = setup
    name = next(_names)
    device = SfbwWriter(ioc.prefix, name="w", file_path=layer, file_name=name,
                        length=AcquisitionLength(pulses=10), timeout=TIMEOUT)
    documents, error = run(device, num=1)
    assert error is None, ioc.log()[-3000:]
    (event,) = [doc for kind, doc in documents if kind == "event"]
    path = Path(event["data"]["w_last_file"])
    assert path.parent == root / layer and path.name.startswith(name)
    first = event["data"]["w_first_pulse_id"]
    assert_rows(path, list(range(first, first + 10)))
    assert ioc.text("FILE_PATH") == "" and ioc.text("STATE") == "IDLE"  # unstaged


def test_a_refused_stage_fails_at_once_with_the_reason(setup, layer):
    ioc, root = setup
    device = SfbwWriter(ioc.prefix, name="bad", file_path="../../etc",
                        length=AcquisitionLength(pulses=5), timeout=TIMEOUT)
    started = time.monotonic()
    documents, error = run(device, num=1)
    assert time.monotonic() - started < 5, error
    assert isinstance(error, AcquisitionFailed), error
    assert str(error).startswith(f"{ioc.prefix}FILE_PATH refused '../../etc': ")
    assert f"is outside the output root {root}" in str(error)
    assert [kind for kind, _ in documents if kind == "event"] == []
    assert ioc.text("FILE_PATH") == ""


def test_a_refused_start_fails_at_once_with_the_reason(setup, layer):
    ioc, _ = setup
    device = SfbwWriter(ioc.prefix, name="once", file_path=layer, file_name=next(_names),
                        auto_increment=False, length=AcquisitionLength(pulses=5),
                        timeout=TIMEOUT)
    started = time.monotonic()
    documents, error = run(device, num=2)  # the second file has the first one's name
    assert time.monotonic() - started < 10  # 5 pulses at 100 Hz, then the refusal
    assert isinstance(error, FailedStatus), error
    reason = str(error.args[0].exception())
    assert reason.startswith("once: start refused: ") and "exists already" in reason
    assert len([doc for kind, doc in documents if kind == "event"]) == 1
    assert ioc.text("STATE") == "IDLE" and ioc.text("AUTO_INCREMENT") == "Yes"
