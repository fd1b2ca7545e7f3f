"""File names as areaDetector composes them: a C printf template of (path, name, number).

``FILE_TEMPLATE`` takes exactly three conversions, in order: a string (``FILE_PATH``), a
string (``FILE_NAME``) and an integer (``FILE_NUMBER``), e.g. the default
``%s%s_%04d.h5``. Only C's conversions are accepted: Python's own (``%r``, ``%(key)s``)
would let a template do what no areaDetector user expects.
"""
from __future__ import annotations

import re

DEFAULT_TEMPLATE = "%s%s_%04d.h5"

# flags, width, precision, C length modifier, conversion (no '*': the arguments are fixed)
_CONVERSION = re.compile(
    r"%(?P<flags>[-+ #0]*)(?P<width>\d*)(?P<precision>\.\d*)?(?P<length>hh|h|ll|l|j|z|t|L)?"
    r"(?P<conversion>.?)", re.S)
_INTEGER = "diouxX"
_EXPECTED = ("s", "s", _INTEGER)


class TemplateError(ValueError):
    """A template that is not a C format for (string, string, integer); says why."""


def _python_format(template: str) -> str:
    """``template`` as a Python %-format, once it is known to be a valid C one."""
    pieces, position, index = [], 0, 0
    for match in _CONVERSION.finditer(template):
        pieces.append(template[position:match.start()])
        position = match.end()
        conversion = match["conversion"]
        if conversion == "%" and not any(match.group(g) for g in ("flags", "width",
                                                                  "precision", "length")):
            pieces.append("%%")
            continue
        if index >= len(_EXPECTED) or conversion not in _EXPECTED[index]:
            raise TemplateError(_wrong_conversion(template, match.group(0), index))
        index += 1
        # Python has no 'u' and no length modifiers; the rest means the same as in C.
        pieces.append("%" + match["flags"] + match["width"] + (match["precision"] or "")
                      + ("d" if conversion == "u" else conversion))
    if index != len(_EXPECTED):
        raise TemplateError(f"template {template!r} has {index} conversions; it needs 3: "
                            "%s (path), %s (name), an integer such as %04d (number)")
    pieces.append(template[position:])
    return "".join(pieces)


def _wrong_conversion(template: str, found: str, index: int) -> str:
    if index >= len(_EXPECTED):
        return f"template {template!r} has more than 3 conversions ({found!r} is the 4th)"
    wanted = ("%s for the path", "%s for the name", "an integer (%d) for the number")[index]
    return f"template {template!r}: conversion {index + 1} is {found!r}, it must be {wanted}"


def check_template(template: str) -> None:
    """Raise TemplateError unless ``template`` is a C format for (path, name, number)."""
    _python_format(template)


def directory(path: str) -> str:
    """FILE_PATH with the trailing '/' areaDetector gives it (empty stays empty)."""
    return path if not path or path.endswith("/") else path + "/"


def compose(template: str, path: str, name: str, number: int) -> str:
    """The file name ``template`` gives for FILE_PATH ``path``, FILE_NAME ``name`` and
    FILE_NUMBER ``number``; TemplateError when the template is not valid."""
    return _python_format(template) % (directory(path), name, number)
