"""The README's demo (--simulate) gives a real file; db/sfbw.db and the Phoebus panel
db/sfbw.bob match the running IOC, db/sfbw-group.db the running group IOC."""
from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import epics
import h5py
import pytest
from p4p.client.thread import Context

from pva_clients import PvaPorts, pva_ioc
from sfbw_ioc.group.pvs import SfbwGroupIOC
from sfbw_ioc.testing.ioc import REPO, IocProcess, poll, unique_prefix
from sfbw_ioc.pvs import epicsdb
from sfbw_ioc.pvs.ioc import ioc_class

DB_FILE = REPO / "db" / "sfbw.db"
GROUP_DB_FILE = REPO / "db" / "sfbw-group.db"
PANEL = REPO / "db" / "sfbw.bob"
PVA = "pva://"
# What Phoebus' Display Builder knows, read in its source (ControlSystemStudio/phoebus,
# commit 9bdac32, 2026-08-07). Widget types: the WidgetDescriptor type names of
# app/display/model/.../model/widgets/ and of the widget modules app/display/linearmeter,
# thumbwheel and waterfallplot.
PHOEBUS_WIDGETS = {
    "3dviewer", "action_button", "arc", "array", "bool_button", "byte_monitor", "checkbox",
    "choice", "clock", "combo", "databrowser", "digital_clock", "ellipse", "embedded",
    "fileselector", "group", "image", "label", "led", "linearmeter", "meter",
    "multi_state_led", "navtabs", "picture", "polygon", "polyline", "progressbar", "radio",
    "rectangle", "scaledslider", "scrollbar", "slide_button", "spinner", "stripchart",
    "symbol", "table", "tabs", "tank", "template", "text-symbol", "textentry", "textupdate",
    "thermometer", "thumbwheel", "waterfallplotwidget", "webbrowser", "xyplot",
}
# For the types the panel uses: the version Phoebus writes (getVersion) and the persisted
# properties (defineProperties of the widget class and its base classes: Widget's
# constructor, VisibleWidget, PVWidget, WritablePVWidget, MacroWidget, BaseLEDWidget).
_WIDGET = {"type", "name", "class", "x", "y", "width", "height", "actions", "rules", "scripts",
           "visible", "tooltip"}
_PV = {"pv_name", "border_alarm_sensitive"}
_TEXT = {"font", "foreground_color", "background_color", "horizontal_alignment",
         "vertical_alignment"}
PHOEBUS_PROPERTIES = {
    "label": ("2.0.0", _WIDGET | _TEXT | {"text", "macros", "auto_size", "rotation_step",
                                          "transparent", "wrap_words"}),
    "group": ("3.0.0", _WIDGET | {"macros", "style", "font", "foreground_color",
                                  "background_color", "line_color", "transparent"}),
    "textentry": ("3.0.0", _WIDGET | _PV | _TEXT | {"pv_writable", "enabled", "format",
                                                    "precision", "show_units", "multi_line",
                                                    "wrap_words"}),
    "textupdate": ("2.0.0", _WIDGET | _PV | _TEXT | {"format", "precision", "show_units",
                                                     "transparent", "wrap_words",
                                                     "rotation_step", "interactive"}),
    "action_button": ("3.0.0", _WIDGET | _PV | _TEXT | {
        "pv_writable", "enabled", "text", "transparent", "rotation_step",
        "show_confirm_dialog", "confirm_message", "password"}),
    "combo": ("2.0.0", _WIDGET | _PV | {"pv_writable", "font", "foreground_color",
                                        "background_color", "items", "items_from_pv",
                                        "editable", "enabled", "show_confirm_dialog",
                                        "confirm_message", "password"}),
    "multi_state_led": ("2.0.0", _WIDGET | _PV | {"font", "foreground_color", "line_color",
                                                  "square", "states", "fallback_label",
                                                  "fallback_color"}),
    "image": ("2.0.0", _WIDGET | _PV | {
        "background_color", "foreground_color", "show_toolbar", "color_map", "color_bar",
        "x_axis", "y_axis", "limits_from_pv", "data_width", "data_height", "interpolation",
        "color_mode", "unsigned", "autoscale", "log_scale", "minimum", "maximum",
        "cursor_info_pv", "x_pv", "y_pv", "cursor_crosshair", "rois"}),
}
# Elements of structured properties (ImageWidget's ColorBarProperty and AxisWidgetProperty,
# MultiStateLEDWidget's StateWidgetProperty, the write_pv action of WritePVAction).
PHOEBUS_STRUCTURES = {
    "color_bar": {"visible", "bar_size", "scale_font"},
    "x_axis": {"visible", "title", "minimum", "maximum", "title_font", "scale_font"},
    "y_axis": {"visible", "title", "minimum", "maximum", "title_font", "scale_font"},
    "states/state": {"value", "label", "color"},
    "actions/action": {"description", "pv_name", "value"},
}
# Phoebus' MacroHandler: $(NAME) or ${NAME}, $(NAME=default) when NAME is not defined.
MACRO = re.compile(r"\$[({]([A-Za-z][A-Za-z0-9_]*)(?:=([^)}]*))?[)}]")
RECORD = re.compile(r'^record\((\w+), "\$\(P\)([^"]+)"\)', re.M)
FIELD = re.compile(r'field\((\w+), "([^"]*)"\)')
ALIAS = re.compile(r'^alias\("\$\(P\)([^"]+)", "\$\(P\)([^"]+)"\)', re.M)


@pytest.fixture(scope="module")
def pva_ports():
    return PvaPorts()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ca_ports, pva_ports):
    root = tmp_path_factory.mktemp("demo")
    ioc = pva_ioc(ca_ports(), unique_prefix("DEMO"),
                  ["--simulate", "--output-root", str(root), "--list-pvs"],
                  tmp_path_factory.mktemp("log") / "demo.log", pva_ports)
    yield ioc, root
    assert ioc.stop() == 0, ioc.log()


def test_the_db_file_is_generated_from_the_pv_definitions(tmp_path):
    generated = tmp_path / "sfbw.db"
    subprocess.run([sys.executable, "-m", "sfbw_ioc.cli", "--write-db", str(generated)],
                   check=True, cwd=REPO, timeout=60)
    assert generated.read_text() == DB_FILE.read_text(), \
        "db/sfbw.db is stale: python -m sfbw_ioc.cli --write-db db/sfbw.db"


def test_the_group_db_file_is_generated_from_the_pv_definitions(tmp_path):
    generated = tmp_path / "sfbw-group.db"
    subprocess.run([sys.executable, "-m", "sfbw_ioc.group.cli", "--write-db", str(generated)],
                   check=True, cwd=REPO, timeout=60)
    assert generated.read_text() == GROUP_DB_FILE.read_text(), \
        "db/sfbw-group.db is stale: python -m sfbw_ioc.group.cli --write-db db/sfbw-group.db"


@pytest.mark.parametrize("group", [ioc_class(), SfbwGroupIOC], ids=["ioc", "group"])
def test_every_desc_fits_the_epics_field(group):
    for name, fields in _records(epicsdb.render(group)).items():
        assert 0 < len(fields["DESC"]) <= epicsdb.DESC_LENGTH, name


@pytest.fixture(scope="module")
def group_ioc(tmp_path_factory, ca_ports):
    """A group IOC listing its PVs; its one member need not exist for that."""
    directory = tmp_path_factory.mktemp("group")
    ioc = IocProcess(ca_ports(), unique_prefix("DEMOG"),
                     ["--member", unique_prefix("ABSENT"), "--output-root",
                      str(directory / "data"), "--list-pvs"], directory / "group.log",
                     module="sfbw_ioc.group.cli")
    yield ioc, directory
    assert ioc.stop() == 0, ioc.log()


@pytest.mark.parametrize("running, db_file", [("demo", DB_FILE), ("group_ioc", GROUP_DB_FILE)],
                         ids=["ioc", "group"])
def test_the_db_file_lists_exactly_the_pvs_of_the_running_ioc(request, running, db_file):
    ioc, _ = request.getfixturevalue(running)
    served = poll(lambda: _logged_pv_names(ioc.log()), what="--list-pvs output")
    records = _records(db_file.read_text())
    assert {ioc.pv(name) for name in records} == served
    for name, fields in records.items():
        for field, value in fields.items():
            if field in ("DESC", "EGU", "PREC"):
                # Start-up hooks fill the fields while the server already answers.
                pv = f"{ioc.pv(name)}.{field}"
                poll(lambda: str(epics.caget(pv, as_string=True, count=0, use_monitor=False,
                                             timeout=5)) == value, what=f"{pv} == {value!r}")
        if "ZRST" in fields or "ZNAM" in fields:
            pv = epics.PV(ioc.pv(name))
            pv.wait_for_connection(5)
            info = pv.get_ctrlvars(timeout=5)
            expected = [v for k, v in fields.items() if k.endswith(("ST", "NAM"))]
            assert list(info["enum_strs"]) == expected, name


def test_the_simulated_stream_fills_pvs_and_a_real_file(demo):
    ioc, root = demo
    poll(lambda: (epics.caget(ioc.pv("RECEIVED"), timeout=5) or 0) > 50, 15, what="messages")
    assert epics.caget(ioc.pv("LAST_PULSE_ID"), timeout=5) > 1e10
    assert 50 < epics.caget(ioc.pv("RECEIVE_RATE"), timeout=5) < 150
    assert epics.caget(ioc.pv("BUFFER_COUNT"), timeout=5) > 0
    assert epics.caput(ioc.pv("OUTPUT_FILE"), "demo/run1.h5", wait=True) == 1
    assert epics.caput(ioc.pv("START_NOW"), 1, wait=True) == 1
    poll(lambda: epics.caget(ioc.pv("WRITTEN"), timeout=5) >= 30, 15, what="30 rows")
    assert epics.caput(ioc.pv("STOP_NOW"), 1, wait=True, timeout=30) == 1
    target = root / "demo" / "run1.h5"
    assert epics.caget(ioc.pv("LAST_FILE"), as_string=True) == str(target)
    with h5py.File(target) as f:
        pulse_ids = f["data/SIM:FLOAT64-1/pulse_id"][:]
        steps = pulse_ids[1:] - pulse_ids[:-1]
        # The simulator's pulse ids follow the clock: on a loaded machine it skips some,
        # and the IOC must count exactly those as missing.
        assert len(pulse_ids) >= 30 and (steps >= 1).all()
        assert epics.caget(ioc.pv("MISSING"), use_monitor=False) == (steps - 1).sum()
        camera = f["data/SIM:CAMERA"]
        present = camera["is_data_present"][:].astype(bool)
        assert present.tolist() == (camera["pulse_id"][:] % 10 == 0).tolist()
        assert camera["data"].ndim == 3 and camera["data"][present][0].any()


@pytest.mark.parametrize("writer", ["", "W2:"])
def test_the_panel_names_only_pvs_the_ioc_serves(demo, pva_ports, writer):
    """Channel Access names among the IOC's (--list-pvs), pva:// names on its PVA server."""
    ioc, _ = demo
    served = poll(lambda: _logged_pv_names(ioc.log()), what="--list-pvs output")
    panel = ElementTree.parse(PANEL).getroot()
    macros = {"P": ioc.prefix, "W": writer}
    named = {_expand(element.text.strip(), macros) for element in panel.iter("pv_name")}
    assert not [name for name in named if "$" in name], "unexpanded macros"
    for pv in ("LIVE8:NAME", "STREAM_CHANNELS", "STREAM_CHANNEL_COUNT"):
        assert ioc.pv(pv) in named
    for pv in ("OUTPUT_FILE", "FILE_PATH", "FILE_NAME", "FILE_NUMBER", "AUTO_INCREMENT",
               "CHANNELS", "STATE", "MESSAGE", "WRITTEN"):
        assert ioc.pv(writer + pv) in named
    over_pva = {name[len(PVA):] for name in named if name.startswith(PVA)}
    assert over_pva == {ioc.pv("IMAGE")}
    assert named - {PVA + name for name in over_pva} <= served, named - served
    with Context("pva", conf=pva_ports.client_environment(), useenv=False, nt=False) as context:
        for name in over_pva:
            assert context.get(name, timeout=5).getID() == "epics:nt/NTNDArray:1.0"


def test_the_panel_shows_the_image_over_pva():
    """An NTNDArray carries its own width and height: Phoebus takes them from the frame."""
    panel = ElementTree.parse(PANEL).getroot()
    image, = (w for w in panel.iter("widget") if w.get("type") == "image")
    assert image.findtext("pv_name") == "pva://$(P)IMAGE"
    assert not image.findall("rules/rule")


def test_the_panel_lets_its_caller_choose_the_prefix_and_the_writer():
    """Phoebus expands a display with the macros it is opened with, then the display's own
    (DisplayModel.expandMacros): a P or W defined in the file would override the caller's."""
    panel = ElementTree.parse(PANEL).getroot()
    defined = {macro.tag for macros in panel.iter("macros") for macro in macros}
    assert not defined & {"P", "W"}
    assert _expand("$(P)$(W=)STATE", {"P": "X:"}) == "X:STATE"


def test_the_panel_uses_only_widgets_and_properties_phoebus_has():
    panel = ElementTree.parse(PANEL).getroot()
    for widget in panel.iter("widget"):
        kind, name = widget.get("type"), widget.findtext("name")
        assert kind in PHOEBUS_WIDGETS, kind
        version, properties = PHOEBUS_PROPERTIES[kind]
        assert widget.get("version") == version, (name, widget.get("version"))
        unknown = {child.tag for child in widget if child.tag != "widget"} - properties
        assert not unknown, (name, unknown)
        for rule in widget.findall("rules/rule"):
            assert rule.get("prop_id") in properties, (name, rule.get("prop_id"))
        for path, elements in PHOEBUS_STRUCTURES.items():
            for structure in widget.findall(path):
                unknown = {child.tag for child in structure} - elements
                assert not unknown, (name, path, unknown)
    for action in panel.iter("action"):
        assert action.get("type") == "write_pv"


def _expand(text: str, macros: dict[str, str]) -> str:
    """``text`` with the macros expanded as Phoebus does; an undefined one without a
    default stays as it is (MacroHandler leaves it unresolved)."""
    def value(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in macros:
            return macros[name]
        return default if default is not None else match.group(0)
    return MACRO.sub(value, text)


def _records(db_text: str) -> dict[str, dict[str, str]]:
    """Record name -> fields; an alias is listed under its name with its record's fields."""
    records = {}
    for block in db_text.split("record(")[1:]:
        match = RECORD.match("record(" + block)
        records[match.group(2)] = dict(FIELD.findall(block))
    for record, alias in ALIAS.findall(db_text):
        records[alias] = records[record]
    return records


def _logged_pv_names(log_text: str) -> set[str]:
    if "PVs available:" not in log_text:
        return set()
    listing = log_text.split("PVs available:", 1)[1].splitlines()[1:]
    names = set()
    for line in listing:
        if not line.strip() or " " in line.strip():
            break
        names.add(line.strip())
    return names
