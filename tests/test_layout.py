"""The package's shape: imports go down the data path (never up, never in a circle), no
module takes another's private names, and ``sfbw-group`` does not load the data path."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sfbw_ioc"

# Each top-level part of the package, by how far along it is: a part imports only parts
# of its own rank or below (a module of the same part: anything but a cycle).
RANKS = {
    "vocabulary": 0, "bsread": 0,
    "stream": 1, "output": 1, "recorder": 1,
    "hdf5": 2,
    "acquisition": 3, "live": 3,
    "pvs": 4,
    "bridges": 5, "group": 5, "commandline": 5, "pva": 5, "serving": 5,
    "service": 6, "bluesky": 6,
    "cli": 7,
    "testing": 8,  # drives the whole package from outside; nothing of it imports testing
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package: its Python files and its C extensions (by source)."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))
            + sorted(PACKAGE.rglob("*.c"))}


def is_package(name: str, known: dict[str, Path]) -> bool:
    return known[name].name == "__init__.py"


def imports_of(name: str, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of the package's own."""
    if known[name].suffix != ".py":
        return []
    tree = ast.parse(known[name].read_text())
    package = name if is_package(name, known) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names
                      if alias.name.split(".")[0] == "sfbw_ioc"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sfbw_ioc":
                continue
            taken = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in taken if f"{target}.{n}" in known]
            found += [(module, []) for module in submodules]
            rest = [n for n in taken if f"{target}.{n}" not in known]
            if rest or not submodules:
                found.append((target, rest))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {target for target, _ in imports_of(name, known)
                   if target in known and target != name}
            for name in known}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_part_has_a_rank() -> None:
    parts = {part(name) for name in modules()} - {""}
    assert parts == set(RANKS), "give each new part of the package its rank in RANKS"


def test_no_import_goes_up_the_data_path() -> None:
    upward = [f"{module} -> {target}" for module, targets in graph().items()
              for target in targets
              if part(module) and part(target) and part(module) != part(target)
              and RANKS[part(target)] > RANKS[part(module)]]
    assert upward == []


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_module_takes_another_modules_private_names() -> None:
    known = modules()
    private = [f"{name}: {target}.{taken}"
               for name in known for target, names in imports_of(name, known)
               for taken in names
               if taken.startswith("_") and target != name]
    assert private == []


@pytest.mark.parametrize("source, expected", [
    ("from ..stream.ring import RingBuffer", {"sfbw_ioc.stream.ring"}),
    ("from ..hdf5 import file", {"sfbw_ioc.hdf5.file"}),
    ("from . import coordinator", {"sfbw_ioc.group.coordinator"}),
    ("import sfbw_ioc.vocabulary", {"sfbw_ioc.vocabulary"}),
    ("def f():\n    from ..stream.ring import RingBuffer\n", {"sfbw_ioc.stream.ring"}),
    ("import numpy as np", set()),
])
def test_the_graph_sees_every_kind_of_import(tmp_path: Path, source: str,
                                              expected: set[str]) -> None:
    """A module of the group part, written here, as the checks above read one."""
    known = {**modules(), "sfbw_ioc.group.probe": tmp_path / "probe.py"}
    (tmp_path / "probe.py").write_text(source)
    assert {target for target, _ in imports_of("sfbw_ioc.group.probe", known)} == expected


def test_the_group_ioc_does_not_load_the_data_path() -> None:
    """``sfbw-group --help`` needs caproto and h5py, not the stream's ZeroMQ, the codec's
    compression or the REST API's aiohttp."""
    code = ("import json, sys\n"
            "from sfbw_ioc.group.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    loaded = set(json.loads(result.stderr.strip().splitlines()[-1]))
    assert "--member" in result.stdout
    heavy = {"zmq", "aiohttp", "bitshuffle", "lz4", "sfbw_ioc.stream", "sfbw_ioc.bsread",
             "sfbw_ioc.acquisition"}
    assert heavy & loaded == set()
