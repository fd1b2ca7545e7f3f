"""A reader in its own process following a file the IOC writes with SWMR (run by
tests/test_swmr.py): refreshes until told to stop, checks every new row, prints JSON."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np

from sfbw_ioc.testing.sources import CHANNELS, value_for

FOLLOWED = [spec for spec in CHANNELS if spec.name in ("T:F64", "T:WF", "T:IMG")]


def main(path: str, stop_file: str) -> None:
    f = h5py.File(path, "r", swmr=True)
    lengths: list[int] = []
    checked = 0
    errors: list[str] = []
    stopping = False
    while True:
        stopping = Path(stop_file).exists()  # the last refresh is after the close
        groups = [f["data"][spec.name] for spec in FOLLOWED]
        for group in groups:
            for name in ("pulse_id", "data"):
                group[name].refresh()
        rows = min(group["data"].shape[0] for group in groups)
        if lengths and rows < lengths[-1]:
            errors.append(f"rows went back from {lengths[-1]} to {rows}")
        start = lengths[-1] if lengths else 0
        for spec, group in zip(FOLLOWED, groups):
            pulse_ids = group["pulse_id"][start:rows]
            data = group["data"][start:rows]
            for pulse_id, stored in zip(pulse_ids, data):
                if not np.array_equal(stored.reshape(spec.shape), value_for(spec, int(pulse_id))):
                    errors.append(f"{spec.name} at {pulse_id}")
                checked += 1
        lengths.append(rows)
        if stopping:
            break
        time.sleep(0.2)
    print(json.dumps({"lengths": lengths, "checked": checked, "errors": errors[:10]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
