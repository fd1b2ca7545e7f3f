"""EPICS's own programs as other Unix users, for the access security tests: two users
made for a test module, the command-line tools copied where those users may run them,
a tool run as one of them, and EPICS's softIoc/softIocPVA serving db/sfbw.db (the same
PV names, each writable one in ASG CONTROL) under an ACF file."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import pytest

from sfbw_ioc.testing import ioc as testing_ioc
from sfbw_ioc.testing.ioc import EPICS_BIN, REPO


@contextlib.contextmanager
def unix_users() -> Iterator[tuple[str, str]]:
    """Two Unix users made for a test, removed afterwards (skips without root)."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("needs root with useradd and runuser to act as other Unix users")
    tag = uuid.uuid4().hex[:6]
    names = (f"sfbw{tag}w", f"sfbw{tag}r")
    made = []
    try:
        for name in names:
            result = subprocess.run(["useradd", "--system", "--no-create-home",
                                     "--shell", "/usr/sbin/nologin", name],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"useradd {name} failed: {result.stderr.strip()}")
            made.append(name)
        yield names
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)


@contextlib.contextmanager
def tools_for_everyone(tools: Iterable[str], libraries: Iterable[str]) -> Iterator[Path]:
    """The directory of copies of EPICS ``tools`` that any user may run: the installed ones
    lie below /root, which other users cannot enter. ``libraries`` are the prefixes of
    the libraries they need (their RUNPATH $ORIGIN/../lib finds the copies)."""
    directory = Path(tempfile.mkdtemp(prefix="sfbw-epics-tools-"))
    try:
        (directory / "bin").mkdir()
        (directory / "lib").mkdir()
        for tool in tools:
            shutil.copy2(EPICS_BIN / tool, directory / "bin" / tool)
        for library in (EPICS_BIN.parent / "lib").glob("lib*.so*"):
            if library.name.startswith(tuple(libraries)):
                shutil.copy2(library, directory / "lib" / library.name)
        for path in (directory, directory / "bin", directory / "lib"):
            path.chmod(0o755)
        yield directory / "bin"
    finally:
        shutil.rmtree(directory)


def run_as(user: str, tool: Path, args: Iterable[str], environment: Mapping[str, str],
           hostname: str | None = None, seconds: float | None = None
           ) -> subprocess.CompletedProcess:
    """``tool`` run as ``user`` (from a host named ``hostname``: a new UTS namespace,
    where libca takes the host name it sends from), interrupted after ``seconds`` if
    given (a monitor)."""
    limit = ["timeout", "-s", "INT", str(seconds)] if seconds is not None else []
    argv = ["runuser", "-u", user, "--", *limit, str(tool), *args]
    if hostname is not None:
        argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *argv]
    return subprocess.run(argv, env={**os.environ, **environment}, capture_output=True,
                          text=True, timeout=60)


class SoftIoc(testing_ioc.SoftIoc):
    """EPICS's own ``binary`` (softIoc, or softIocPVA for PV Access too) serving
    db/sfbw.db under an ACF file, its CA server on ``port``; ``environment`` adds
    variables (its PVA ports)."""

    def __init__(self, port: int, prefix: str, acf: Path, log_path: Path,
                 binary: str = "softIoc", environment: Mapping[str, str] = {}) -> None:
        super().__init__(port, prefix, REPO / "db/sfbw.db", "W1:STATE", log_path,
                         args=("-a", str(acf)), binary=binary, environment=environment)
