"""Soak test: acquisitions back to back for a given time against ``sfbw-ioc --simulate``.

    python benchmarks/soak.py --minutes 30 --out /tmp/soak

Each cycle writes one file, alternating START_NOW/STOP_NOW with START_PULSE_ID (a bit in
the past) / STOP_PULSE_ID (a bit in the future, put with callback), 1-5 s long, then
checks the file with h5py and deletes it. The IOC's RSS and CPU are sampled every
cycle. Prints one summary line per figure; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from common import MiB, Ioc, ca_setup
from sfbw_ioc.testing.ioc import poll

RATE_HZ = 100
CAMERA = "SIM:CAMERA"
CAMERA_EVERY = 10
SCALARS = ("SIM:FLOAT64-1", "SIM:FLOAT64-2", "SIM:INT32", "SIM:WAVEFORM", "SIM:STATUS")
KEEP_FAILED_FILES = 10


class CycleFailure(Exception):
    def __init__(self, text: str, kind: str = "other") -> None:
        super().__init__(text)
        self.kind = kind


def check(condition: bool, text: str, kind: str = "other") -> None:
    if not condition:
        raise CycleFailure(text, kind)


def check_file(path: Path, expected: list[int] | None) -> int:
    """The file's rows: every channel aligned, the camera on every 10th pulse only,
    pulse ids ``expected`` (or consecutive when None). Returns the row count."""
    import h5py
    import hdf5plugin  # noqa: F401  (bitshuffle filter, to read a camera frame)
    from sfbw_ioc.stream.simulator import simulated_values

    check(not path.with_name(path.name + ".partial").exists(), f"{path}.partial left")
    check(path.exists(), f"{path} does not exist")
    with h5py.File(path, "r") as f:
        data = f["data"]
        check(set(data) == set(SCALARS) | {CAMERA}, f"channels {sorted(data)}")
        pulse_ids = data[CAMERA]["pulse_id"][:]
        check(len(pulse_ids) > 0, "no rows")
        if expected is None:
            expected = list(range(int(pulse_ids[0]), int(pulse_ids[-1]) + 1))
        if pulse_ids.tolist() != expected:
            absent = sorted(set(expected) - set(pulse_ids.tolist()))
            extra = sorted(set(pulse_ids.tolist()) - set(expected))
            gap_only = not extra and len(pulse_ids) + len(absent) == len(expected)
            rows_before = [int(np.searchsorted(pulse_ids, p)) for p in absent[:5]]
            check(False, f"pulse ids {pulse_ids[0]}..{pulse_ids[-1]} ({len(pulse_ids)} rows), "
                         f"expected {expected[0]}..{expected[-1]} ({len(expected)}): "
                         f"{len(absent)} absent {absent[:5]} (at rows {rows_before}), "
                         f"{len(extra)} extra {extra[:5]}",
                  "pulse gap" if gap_only else "wrong rows")
        for name in data:
            group = data[name]
            check(np.array_equal(group["pulse_id"][:], pulse_ids), f"{name}: rows not aligned")
            check(len(group["data"]) == len(pulse_ids), f"{name}: data length")
            present = group["is_data_present"][:].astype(bool)
            should = (pulse_ids % CAMERA_EVERY == 0) if name == CAMERA else True
            check(bool(np.all(present == should)), f"{name}: is_data_present wrong")
        # Spot check values of the first row and the first camera frame.
        first = int(pulse_ids[0])
        sent = {spec.name: value for spec, value, _ in simulated_values(first, RATE_HZ)}
        check(float(data["SIM:FLOAT64-1"]["data"][0].reshape(-1)[0])
              == float(sent["SIM:FLOAT64-1"]), "SIM:FLOAT64-1 value")
        image_rows = np.flatnonzero(pulse_ids % CAMERA_EVERY == 0)
        if len(image_rows):
            row = int(image_rows[0])
            sent = {spec.name: value for spec, value, _ in
                    simulated_values(int(pulse_ids[row]), RATE_HZ)}
            check(np.array_equal(np.asarray(data[CAMERA]["data"][row]).reshape(sent[CAMERA].shape),
                                 sent[CAMERA]), "camera frame differs from what was sent")
    return len(pulse_ids)


def run_cycle(ioc: Ioc, out: Path, name: str, by_pulse_id: bool, seconds: float) -> int:
    ioc.put("OUTPUT_FILE", name)
    target = out / name
    if by_pulse_id:
        last = int(ioc.get("LAST_PULSE_ID"))
        start = last - 20  # 0.2 s (plus the 2 Hz statistics' lag) in the past
        stop = last + round(seconds * RATE_HZ)
        ioc.put("START_PULSE_ID", start)
        ioc.put("STOP_PULSE_ID", stop, timeout=seconds + 30)  # completes when closed
        expected = list(range(start, stop + 1))
    else:
        ioc.put("START_NOW", 1)
        time.sleep(seconds)
        ioc.put("STOP_NOW", 1, timeout=30)
        expected = None
    check(ioc.text("LAST_FILE") == str(target),
          f"LAST_FILE {ioc.text('LAST_FILE')!r}, MESSAGE {ioc.text('MESSAGE')!r}")
    check(int(ioc.get("STATE")) == 0, f"STATE {ioc.get('STATE')} after the stop")
    figures = {name: ioc.get(name) for name in ("MISSING", "LOST", "WRITTEN")}
    try:
        rows = check_file(target, expected)
    except CycleFailure as failure:
        raise CycleFailure(f"{failure}; MISSING {figures['MISSING']}, LOST {figures['LOST']}",
                           failure.kind) from None
    check(figures["MISSING"] == 0 and figures["LOST"] == 0,
          f"MISSING {figures['MISSING']}, LOST {figures['LOST']}; "
          f"MESSAGE {ioc.text('MESSAGE')!r}")
    check(figures["WRITTEN"] == rows, f"WRITTEN {figures['WRITTEN']} but {rows} rows")
    return rows


def recover(ioc: Ioc) -> None:
    try:
        ioc.put("ABORT", 1, timeout=30)
        poll(lambda: int(ioc.get("STATE")) in (0, 4), timeout=30, what="IDLE after ABORT")
    except Exception as error:
        print(f"  recovery failed: {error}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/soak"),
                        help="output root of the IOC (files are deleted once checked)")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    run_tag = time.strftime("%Y%m%d-%H%M%S")
    port, = ca_setup(1)
    ioc = Ioc(port, ["--simulate", "--output-root", str(args.out)],
              args.out / f"ioc-{run_tag}.log", tag="SOAK")
    print(f"IOC pid {ioc.pid}, prefix {ioc.proc.prefix}, log {ioc.proc.log_path}", flush=True)

    cycles = failures = written = kept = 0
    failure_kinds: dict[str, int] = {}
    samples: list[tuple[float, int]] = []  # (monotonic, rss)
    try:
        ioc.wait("LAST_PULSE_ID", lambda v: v > 0, timeout=30)
        t0, cpu0 = time.monotonic(), ioc.cpu()
        samples.append((t0, ioc.rss()))
        deadline = t0 + args.minutes * 60
        while time.monotonic() < deadline:
            by_pulse_id = cycles % 2 == 1
            seconds = rng.uniform(args.min_seconds, args.max_seconds)
            name = f"soak-{run_tag}-{cycles:06d}.h5"
            cycles += 1
            started = time.monotonic()
            try:
                rows = run_cycle(ioc, args.out, name, by_pulse_id, seconds)
            except Exception as error:
                failures += 1
                kind = getattr(error, "kind", type(error).__name__)
                failure_kinds[kind] = failure_kinds.get(kind, 0) + 1
                mode = "pulse-id" if by_pulse_id else "now"
                print(f"FAIL cycle {cycles} ({mode}, {seconds:.1f} s, {name}): "
                      f"{type(error).__name__}: {error}", flush=True)
                if not isinstance(error, CycleFailure):
                    traceback.print_exc()
                if not ioc.alive():
                    print("the IOC died; log tail:\n" + ioc.log()[-3000:], flush=True)
                    break
                recover(ioc)
                kept += 1
                if kept > KEEP_FAILED_FILES:
                    (args.out / name).unlink(missing_ok=True)
            else:
                written += rows
                (args.out / name).unlink()
            samples.append((time.monotonic(), ioc.rss()))
            if cycles % 20 == 0:
                elapsed = time.monotonic() - t0
                print(f"{elapsed / 60:6.1f} min: {cycles} cycles, {failures} failures, "
                      f"{written} messages, RSS {samples[-1][1] / MiB:.1f} MiB, "
                      f"CPU {100 * (ioc.cpu() - cpu0) / elapsed:.1f} %, "
                      f"last cycle {time.monotonic() - started:.1f} s", flush=True)
        t1, cpu1 = time.monotonic(), ioc.cpu() if ioc.alive() else None
    finally:
        rc = ioc.stop()
    if rc != 0:
        failures += 1
        print(f"FAIL: the IOC exited with {rc}", flush=True)

    duration = t1 - t0
    window = min(300.0, duration / 3)
    first = [rss for t, rss in samples if t <= t0 + window]
    last = [rss for t, rss in samples if t >= t1 - window]
    growth = (np.mean(last) - np.mean(first)) / MiB
    print(f"cycles: {cycles} in {duration / 60:.1f} min")
    kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(failure_kinds.items()))
    print(f"failures: {failures}" + (f" ({kinds})" if kinds else ""))
    print(f"messages written: {written}")
    print(f"max RSS: {max(rss for _, rss in samples) / MiB:.1f} MiB")
    print(f"RSS growth first→last {window / 60:.1f} min: {growth:+.1f} MiB "
          f"({np.mean(first) / MiB:.1f} → {np.mean(last) / MiB:.1f} MiB, means of samples)")
    stopped = re.findall(r"simulator stopped: .*", ioc.log())
    print(f"simulator: {stopped[-1] if stopped else 'no stop line in the IOC log'} "
          f"(drops happen before the receiver connects; skipped pulses are not counted)")
    if cpu1 is not None:
        print(f"mean CPU: {100 * (cpu1 - cpu0) / duration:.1f} % of one core")
    else:
        print("mean CPU: n/a (IOC died)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
