"""The bsread codec is a package of its own: no module of sfbw_ioc/bsread/ imports
another part of sfbw_ioc (receiver, ring, writer, ...), so it can be read and reused alone."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sfbw_ioc.bsread

PACKAGE_DIR = Path(sfbw_ioc.bsread.__file__).parent
MODULES = sorted(PACKAGE_DIR.glob("*.py"))


def outside_the_package(module: str) -> bool:
    """An absolute module name of sfbw_ioc that is not sfbw_ioc.bsread or inside it."""
    return module.split(".")[0] == "sfbw_ioc" and not (module + ".").startswith("sfbw_ioc.bsread.")


def foreign_imports(source: str) -> list[str]:
    """The imports in ``source`` (a module of the package) that reach outside it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if outside_the_package(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            # Level 1 is the package itself; level 2 and more climb into sfbw_ioc.
            if node.level > 1 or (node.level == 0 and outside_the_package(module)):
                found.append("." * node.level + module)
    return found


def test_the_package_has_its_modules() -> None:
    names = {path.stem for path in MODULES}
    assert {"__init__", "types", "compression", "headers", "decode", "columns",
            "encode"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_module_imports_nothing_else_of_sfbw_ioc(path: Path) -> None:
    assert foreign_imports(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_module_says_what_it_owns(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring and len(docstring) > 40


@pytest.mark.parametrize("source, expected", [
    ("from ..ring import RingBuffer", ["..ring"]),
    ("from .. import writer", [".."]),
    ("import sfbw_ioc.receiver", ["sfbw_ioc.receiver"]),
    ("from sfbw_ioc import ring", ["sfbw_ioc"]),
    ("from sfbw_ioc.writer import OutputFile", ["sfbw_ioc.writer"]),
    ("def f():\n    from ..acquisition import x\n", ["..acquisition"]),
    ("from .types import ChannelSpec\nfrom . import decode", []),
    ("from sfbw_ioc.bsread.types import ChannelSpec\nimport sfbw_ioc.bsread", []),
    ("import numpy as np\nfrom typing import Any", []),
    ("from sfbw_ioc.bsreader import x", ["sfbw_ioc.bsreader"]),
    ("import sfbw_ioc.bsreader", ["sfbw_ioc.bsreader"]),
])
def test_the_check_sees_foreign_imports(source: str, expected: list[str]) -> None:
    assert foreign_imports(source) == expected
