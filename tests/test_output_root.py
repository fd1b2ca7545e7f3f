"""Where a file may go (sfbw_ioc.output.root): every refusal of a name, the ``.partial``,
publishing without overwriting, the group's master path. Real files under tmp_path; no
IOC, no process."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sfbw_ioc.output.ownership import IOC_OWNER
from sfbw_ioc.output.root import (OutputPathError, OutputRoot, partial_path, publish,
                                  refuse_taken, safe_name, taken_by)


@pytest.fixture
def root(tmp_path: Path) -> OutputRoot:
    (tmp_path / "out").mkdir()
    return OutputRoot(tmp_path / "out")


def refusal(action, *args, **kwargs) -> str:
    with pytest.raises(OutputPathError) as info:
        action(*args, **kwargs)
    return str(info.value)


# ---- names that resolve --------------------------------------------------------------

def test_the_root_is_resolved(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    root = OutputRoot(tmp_path / "link" / ".")
    assert root.path == tmp_path.resolve() / "real"
    assert root.resolve("run/a.h5") == root.path / "run" / "a.h5"


@pytest.mark.parametrize("name, expected", [
    ("a.h5", "a.h5"),
    ("run/7/a.h5", "run/7/a.h5"),
    ("run/../a.h5", "a.h5"),  # ``..`` that stays inside is only a detour
    ("./run//a.h5", "run/a.h5"),
    (" a.h5", " a.h5"),  # blanks are part of a member's name
])
def test_names_inside_the_root_resolve(root: OutputRoot, name: str, expected: str) -> None:
    assert root.resolve(name) == root.path / expected


def test_an_absolute_name_inside_the_root_is_taken_as_it_is(root: OutputRoot) -> None:
    assert root.resolve(str(root.path / "run" / "a.h5")) == root.path / "run" / "a.h5"


def test_a_link_inside_the_root_is_resolved_away(root: OutputRoot) -> None:
    """The target has no symbolic link in it: ``Owner.create_file`` requires that."""
    (root.path / "real").mkdir()
    (root.path / "alias").symlink_to(root.path / "real")
    assert root.resolve("alias/a.h5") == root.path / "real" / "a.h5"


# ---- refusals ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_an_empty_name_is_refused(root: OutputRoot, name: str) -> None:
    assert refusal(root.resolve, name) == "OUTPUT_FILE is empty"
    assert refusal(root.resolve, name, must_be_new=False) == "OUTPUT_FILE is empty"


def test_a_nul_is_refused(root: OutputRoot) -> None:
    assert refusal(root.resolve, "a\0.h5") == "OUTPUT_FILE contains a NUL character"


@pytest.mark.parametrize("name", [
    "/etc/evil.h5",  # absolute, elsewhere
    "../evil.h5",  # traversal
    "run/../../evil.h5",
    "/../evil.h5",
])
def test_a_name_outside_the_root_is_refused(root: OutputRoot, name: str) -> None:
    assert refusal(root.resolve, name, must_be_new=False) == (
        f"{name!r} is outside the output root {root.path}")


def test_a_name_beside_the_root_with_the_same_beginning_is_outside(root: OutputRoot) -> None:
    """Inside means below the root's directory, not a path that begins with its text."""
    name = str(root.path) + "-other/a.h5"
    assert "is outside the output root" in refusal(root.resolve, name)


@pytest.mark.parametrize("name", [".", "run/..", "./"])
def test_the_root_itself_is_refused(root: OutputRoot, name: str) -> None:
    assert "is outside the output root" in refusal(root.resolve, name, must_be_new=False)
    assert "is outside the output root" in refusal(root.resolve, str(root.path))


def test_a_link_inside_the_root_leading_out_is_refused(root: OutputRoot,
                                                       tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root.path / "escape").symlink_to(elsewhere)
    (root.path / "escape.h5").symlink_to(elsewhere / "victim.h5")  # dangling
    assert "is outside the output root" in refusal(root.resolve, "escape/a.h5")
    assert "is outside the output root" in refusal(root.resolve, "escape.h5")
    assert list(elsewhere.iterdir()) == []


def test_a_link_to_a_device_is_refused(root: OutputRoot) -> None:
    (root.path / "null.h5").symlink_to("/dev/null")
    assert "is outside the output root" in refusal(root.resolve, "null.h5",
                                                   must_be_new=False)


def test_a_link_loop_is_refused(root: OutputRoot) -> None:
    (root.path / "a").symlink_to(root.path / "b")
    (root.path / "b").symlink_to(root.path / "a")
    assert refusal(root.resolve, "a/x.h5").startswith("'a/x.h5' cannot be resolved: ")


def test_an_existing_file_is_refused_unless_the_name_need_not_be_new(
        root: OutputRoot) -> None:
    (root.path / "a.h5").write_bytes(b"keep")
    assert refusal(root.resolve, "a.h5") == (
        f"{root.path / 'a.h5'} exists already; files are never overwritten")
    assert root.resolve("a.h5", must_be_new=False) == root.path / "a.h5"
    assert (root.path / "a.h5").read_bytes() == b"keep"


NOT_COMPLETED = (" exists already, a file that was not completed (its acquisition was cut "
                 "off, or is still being written); files are never overwritten")


def test_an_existing_partial_is_refused_and_said_to_be_one(root: OutputRoot) -> None:
    (root.path / "a.h5.partial").write_bytes(b"an acquisition that died")
    assert refusal(root.resolve, "a.h5") == f"{root.path / 'a.h5.partial'}{NOT_COMPLETED}"
    assert (root.path / "a.h5.partial").read_bytes() == b"an acquisition that died"


@pytest.mark.parametrize("make", [
    lambda path: os.mkfifo(path),
    lambda path: path.mkdir(),
    lambda path: path.symlink_to(path.parent / "nowhere"),  # dangling, inside
], ids=["fifo", "directory", "dangling link"])
def test_anything_under_the_name_takes_it(root: OutputRoot, make) -> None:
    target = root.path / "a.h5"
    make(partial_path(target))
    assert taken_by(target) == partial_path(target)
    assert "exists already" in refusal(root.resolve, "a.h5")
    make(target)
    assert taken_by(target) == target
    assert "exists already" in refusal(refuse_taken, target)


def test_a_fifo_in_place_of_a_directory_is_left_to_the_owner(root: OutputRoot) -> None:
    """The name resolves (nothing takes it); creating beneath a non-directory is refused
    by ``Owner``, whose walk opens every directory with O_DIRECTORY."""
    os.mkfifo(root.path / "pipe")
    target = root.resolve("pipe/a.h5")
    with pytest.raises(NotADirectoryError):
        IOC_OWNER.create_file(partial_path(target))


# ---- the .partial and publishing -------------------------------------------------------

def test_the_partial_sits_beside_its_target(tmp_path: Path) -> None:
    assert partial_path(tmp_path / "run" / "a.h5") == tmp_path / "run" / "a.h5.partial"
    assert taken_by(tmp_path / "a.h5") is None


def test_publish_gives_the_partial_its_name(tmp_path: Path) -> None:
    target = tmp_path / "a.h5"
    partial_path(target).write_bytes(b"complete")
    publish(partial_path(target), target)
    assert target.read_bytes() == b"complete"
    assert not partial_path(target).exists()


def test_publish_never_replaces_a_target_that_appeared_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "a.h5"
    partial_path(target).write_bytes(b"ours")
    target.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        publish(partial_path(target), target)
    assert target.read_bytes() == b"someone else's"
    assert partial_path(target).read_bytes() == b"ours"


# ---- the group's master file ------------------------------------------------------------

@pytest.mark.parametrize("name, master, stem", [
    ("scan.h5", "scan.h5", "scan"),
    ("2024/scan 7.h5", "2024/scan 7.h5", "2024/scan 7"),
    (" scan.h5\n", "scan.h5", "scan"),  # the group drops blanks around its name
    ("scan.v2.h5", "scan.v2.h5", "scan.v2"),
])
def test_the_master_and_its_members_stem(root: OutputRoot, name: str, master: str,
                                         stem: str) -> None:
    assert root.master(name) == (root.path / master, stem)


def test_an_absolute_master_inside_the_root_has_a_relative_stem(root: OutputRoot) -> None:
    assert root.master(str(root.path / "run" / "m.h5")) == (root.path / "run" / "m.h5",
                                                             "run/m")


@pytest.mark.parametrize("name", ["scan", ".h5", "run.d/scan"])
def test_a_master_needs_a_suffix(root: OutputRoot, name: str) -> None:
    assert refusal(root.master, name) == (
        f"{name!r} needs a suffix such as .h5: members write <name without it>/<member>.h5")


@pytest.mark.parametrize("name, text", [
    ("", "OUTPUT_FILE is empty"),
    (" ", "OUTPUT_FILE is empty"),
    ("m\0.h5", "OUTPUT_FILE contains a NUL character"),
    ("../m.h5", "is outside the output root"),
    ("/etc/m.h5", "is outside the output root"),
    (".", "is outside the output root"),
])
def test_a_master_follows_the_rules_of_any_name(root: OutputRoot, name: str,
                                                text: str) -> None:
    assert text in refusal(root.master, name)


@pytest.mark.parametrize("taken, why", [
    ("m.h5", " exists already; files are never overwritten"),
    ("m.h5.partial", NOT_COMPLETED)])
def test_an_existing_master_or_its_partial_is_refused(root: OutputRoot, taken: str,
                                                      why: str) -> None:
    (root.path / taken).write_bytes(b"keep")
    assert refusal(root.master, "m.h5") == f"{root.path / taken}{why}"


def test_the_suffix_is_checked_before_the_name_is_taken(root: OutputRoot) -> None:
    (root.path / "scan").mkdir()
    assert "needs a suffix" in refusal(root.master, "scan")


# ---- a file name from any text -----------------------------------------------------------

@pytest.mark.parametrize("text, name", [
    ("SARES11-SFBW1", "SARES11-SFBW1"),
    ("X:CAM", "X_CAM"),
    ("a/../b", "a_.._b"),
    ("a b\n", "a_b_"),
    ("-", "-"),
    ("..", None),
    (".", None),
    ("_._", None),
    ("", None),
])
def test_a_safe_name(text: str, name: str | None) -> None:
    assert safe_name(text) == name
