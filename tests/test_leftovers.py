"""Left-over ``.partial`` files found in an output root (sfbw_ioc.output.leftovers): real
files and links in a temporary tree, no processes."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sfbw_ioc.output.leftovers import NAMED, Leftovers, find_partials

LATER = time.time() + 3600  # "before" that every file made by a test is older than


def make(path: Path, data: bytes = b"rows", mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_the_whole_tree_is_searched_and_only_partials_count(tmp_path: Path) -> None:
    found = {make(tmp_path / "a.h5.partial"), make(tmp_path / "runs/day1/b_0001.h5.partial"),
             make(tmp_path / "deep/x/y/z/w/c.h5.partial")}
    make(tmp_path / "runs/day1/b_0000.h5")
    make(tmp_path / "notes.partial.txt")
    make(tmp_path / "partial")
    leftovers = find_partials(tmp_path, LATER)
    assert leftovers.count == 3 and set(leftovers.first) == found
    assert leftovers.stopped_at is None and leftovers.root == tmp_path.resolve()


def test_the_files_are_left_as_they_are(tmp_path: Path) -> None:
    partial = make(tmp_path / "a.h5.partial", b"\x89HDF left by a kill", mtime=1_000_000)
    before = partial.stat()
    find_partials(tmp_path, LATER)
    after = partial.stat()
    assert partial.read_bytes() == b"\x89HDF left by a kill"
    assert (after.st_mtime, after.st_size, after.st_ino) == (before.st_mtime, before.st_size,
                                                             before.st_ino)


def test_the_newest_is_the_last_modified(tmp_path: Path) -> None:
    now = time.time()
    make(tmp_path / "old.h5.partial", mtime=now - 300)
    newest = make(tmp_path / "sub/new.h5.partial", mtime=now - 10)
    make(tmp_path / "mid.h5.partial", mtime=now - 100)
    assert find_partials(tmp_path, LATER).newest == newest


def test_a_partial_changed_since_the_ioc_started_is_its_own(tmp_path: Path) -> None:
    started = time.time()
    old = make(tmp_path / "left.h5.partial", mtime=started - 60)
    make(tmp_path / "being_written.h5.partial", mtime=started + 1)
    leftovers = find_partials(tmp_path, started)
    assert (leftovers.count, leftovers.first, leftovers.newest) == (1, (old,), old)


def test_links_count_by_name_and_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make(outside / "elsewhere.h5.partial")
    root = tmp_path / "root"
    root.mkdir()
    (root / "to_outside").symlink_to(outside)  # a directory link: not entered
    (root / "dangling.h5.partial").symlink_to(root / "nowhere")  # takes the name
    leftovers = find_partials(root, LATER)
    assert leftovers.first == (root / "dangling.h5.partial",)


def test_a_directory_named_partial_is_searched_not_counted(tmp_path: Path) -> None:
    inside = make(tmp_path / "odd.partial/x.h5.partial")
    assert find_partials(tmp_path, LATER).first == (inside,)


def test_the_scan_stops_at_its_bound_and_says_so(tmp_path: Path) -> None:
    for n in range(30):
        make(tmp_path / f"f{n:02}.h5.partial")
    leftovers = find_partials(tmp_path, LATER, max_entries=10)
    assert leftovers.count == 10 and leftovers.stopped_at == 10
    assert "the scan stopped after 10 entries: there may be more" in leftovers.report()
    assert find_partials(tmp_path, LATER, max_entries=30).stopped_at is None


def test_an_empty_or_missing_root_has_none(tmp_path: Path) -> None:
    assert find_partials(tmp_path, LATER) == Leftovers(tmp_path.resolve())
    assert find_partials(tmp_path / "missing", LATER).count == 0


# ---- the report ---------------------------------------------------------------------------

def test_the_report_names_the_first_few_relative_to_the_root(tmp_path: Path) -> None:
    paths = tuple(tmp_path / f"run/f{n}.h5.partial" for n in range(NAMED))
    report = Leftovers(tmp_path, NAMED + 2, paths, paths[0]).report()
    assert report.startswith(f"{NAMED + 2} .partial files left in {tmp_path} by "
                             "acquisitions that did not complete (kept: ")
    assert report.endswith(", ".join(f"run/f{n}.h5.partial" for n in range(NAMED))
                           + " and 2 more")
    assert "never overwritten nor removed" in report


@pytest.mark.parametrize("leftovers, expected", [
    (Leftovers(Path("/data")), "no .partial file left in /data"),
    (Leftovers(Path("/data"), 1, (Path("/data/a.h5.partial"),), Path("/data/a.h5.partial")),
     "1 .partial file left in /data by an acquisition that did not complete (kept: never "
     "overwritten nor removed): a.h5.partial"),
], ids=["none", "one"])
def test_the_report_of_none_and_of_one(leftovers: Leftovers, expected: str) -> None:
    assert leftovers.report() == expected
