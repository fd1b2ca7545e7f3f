"""A closed file of the IOC described as Bluesky stream assets: one StreamResource per
dataset a reader can load, and the DataKeys and StreamDatum that go with it.

Each channel's group in the file (see ``hdf5.layout``) gives:

- ``<device>-<channel>``: its ``data`` dataset, one row per message of the file;
- ``<device>-<channel>(k)``: each earlier definition ``data(k)`` of a channel whose type
  or shape changed during the file (its rows up to ``last_row``);
- ``<device>-<channel>-pulse_id``: the pulse id of every row.

Scalars are stored as (N, 1) and described as scalars: their resources ask the reader
for column 0. String channels are left out: tiled's HDF5 reader hands variable-length
strings back as fixed-length bytes of a length no descriptor can know in advance.

Two ways to cut a file into Bluesky events (``Mode``):

- ``FLY``: one event per row (a fly scan over pulses), the datasets stacked row by row.
  Every data key of an event stream covers the same events, and a ``data(k)`` has
  fewer rows than the file: each is a stream of its own (``StoredArray.stream``), with
  ``<device>-<channel>(k)-pulse_id``, the pulse ids of its rows;
- ``STEP``: the whole file is one event (one step of a step scan), whose every data
  key holds all its rows; the files of further steps continue the same datasets.
"""
from __future__ import annotations

import enum
import logging
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from event_model import ComposeStreamResource, DataKey, StreamDatum, StreamResource

log = logging.getLogger(__name__)

HDF5_MIMETYPE = "application/x-hdf5"
# event-model's descriptor schema allows no '.' or '/' in a data key
_NOT_IN_KEYS = re.compile(r"[./]")
_DEFINITION = re.compile(r"data(?:\((\d+)\))?")


class Mode(enum.Enum):
    FLY = "fly"
    STEP = "step"


@dataclass(frozen=True, slots=True)
class StoredArray:
    """One dataset of a file, as a Bluesky data key sees it."""

    data_key: str
    dataset: str  # path in the file
    dtype_numpy: str  # as numpy spells it, e.g. "<f8"
    row_shape: tuple[int, ...]  # of one row, () for a scalar
    rows: int  # rows the data key covers: the dataset's first
    chunk_shape: tuple[int, ...]  # of the dataset as read (a scalar's column dropped)
    slice: str | None  # what the reader takes of the dataset (numpy's notation), or all
    stream: str = ""  # in a fly scan: "" the main event stream, else one of its own

    def data_key_description(self, mode: Mode, source: str) -> DataKey:
        shape = list(self.row_shape) if mode is Mode.FLY else [self.rows, *self.row_shape]
        return DataKey(source=source, shape=shape, dtype=_json_type(self.dtype_numpy, shape),
                       dtype_numpy=self.dtype_numpy, external="STREAM:")

    def resource_parameters(self, mode: Mode) -> dict[str, object]:
        # A row per event is a stack of rows; a file per event continues the rows of
        # the files before it (the consolidator's "concat").
        parameters: dict[str, object] = {
            "dataset": self.dataset, "chunk_shape": list(self.chunk_shape),
            "join_method": "stack" if mode is Mode.FLY else "concat",
            # Complete and closed before any document names it: no SWMR.
            "swmr": False,
        }
        if self.slice is not None:
            parameters["slice"] = self.slice
        return parameters


def _json_type(dtype_numpy: str, shape: list[int]) -> str:
    if shape:
        return "array"
    kind = np.dtype(dtype_numpy).kind
    return "integer" if kind in "iu" else "boolean" if kind == "b" else "number"


def data_key(device: str, channel: str, suffix: str = "") -> str:
    """The data key of a channel's dataset: ``<device>-<channel><suffix>``."""
    return _NOT_IN_KEYS.sub("_", f"{device}-{channel}{suffix}")


def _stream_name(channel: str, suffix: str) -> str:
    return _NOT_IN_KEYS.sub("_", f"{channel}{suffix}")


def stored_arrays(path: Path, device: str, mode: Mode) -> list[StoredArray]:
    """What of the closed file ``path`` a Bluesky reader can load, by data key."""
    arrays: list[StoredArray] = []
    with h5py.File(path, "r") as h5:
        for group in h5["data"].values():
            arrays.extend(_channel_arrays(group, device, mode))
    keys = [array.data_key for array in arrays]
    if len(set(keys)) != len(keys):
        doubled = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"{path}: channel names that differ only in '.' or '/' give "
                         f"the same data keys {doubled}")
    return arrays


def by_stream(arrays: list[StoredArray]) -> dict[str, list[StoredArray]]:
    """A fly scan's arrays by event stream ("" the main one), in the file's order."""
    streams: dict[str, list[StoredArray]] = {}
    for array in arrays:
        streams.setdefault(array.stream, []).append(array)
    return streams


def _channel_arrays(group: h5py.Group, device: str, mode: Mode) -> Iterator[StoredArray]:
    channel = str(group.attrs["name"])
    definitions = sorted((name for name in group if _DEFINITION.fullmatch(name)),
                         key=lambda name: int(_DEFINITION.fullmatch(name)[1] or 0))
    in_main_stream = False
    for name in definitions:
        data = group[name]
        if data.attrs["bsread_type"] == "string":
            log.info("%s: string channel %s is left to the file", group.file.filename,
                     channel)
            continue
        number = _DEFINITION.fullmatch(name)[1]
        suffix = f"({number})" if number else ""
        stream = _stream_name(channel, suffix) if number and mode is Mode.FLY else ""
        yield _stored(data, data_key(device, channel, suffix),
                      column=len(data.attrs["shape"]) == 0, stream=stream)
        if stream:
            yield _stored(group["pulse_id"], data_key(device, channel, f"{suffix}-pulse_id"),
                          column=False, stream=stream, rows=data.shape[0])
        in_main_stream = in_main_stream or not stream
    if in_main_stream:
        yield _stored(group["pulse_id"], data_key(device, channel, "-pulse_id"),
                      column=False)


def _stored(dataset: h5py.Dataset, key: str, column: bool, stream: str = "",
            rows: int | None = None) -> StoredArray:
    """``dataset`` as the data key ``key``: its first ``rows`` (None: all of them), of
    a scalar (``column``) stored as (N, 1) column 0."""
    chunks = dataset.chunks or dataset.shape
    rows = dataset.shape[0] if rows is None else rows
    return StoredArray(
        data_key=key, dataset=dataset.name, dtype_numpy=dataset.dtype.str,
        row_shape=() if column else tuple(dataset.shape[1:]), rows=rows,
        chunk_shape=tuple(chunks[:1] if column else chunks),
        slice=_slice(rows if rows < dataset.shape[0] else None, column), stream=stream)


def _slice(first_rows: int | None, column: bool) -> str | None:
    """What the reader takes, in numpy's notation: the dataset's first rows (None: all),
    of a scalar stored as (N, 1) column 0; None: the whole dataset."""
    if first_rows is None and not column:
        return None
    rows = ":" if first_rows is None else f":{first_rows}"
    return f"{rows},0" if column else rows


def resource_documents(path: Path, arrays: list[StoredArray], mode: Mode
                       ) -> Iterator[tuple[str, StreamResource | StreamDatum]]:
    """The StreamResource and StreamDatum documents of the file ``path`` (its
    ``arrays``): every row in ``Mode.FLY``, the file as one event in ``Mode.STEP``.
    The RunEngine fills in their run, descriptor and event numbers."""
    # Not percent-encoded: tiled's reader takes the path of the URI as it is.
    uri = f"file://localhost{Path(path).absolute()}"
    compose = ComposeStreamResource()
    for array in arrays:
        bundle = compose(mimetype=HDF5_MIMETYPE, uri=uri, data_key=array.data_key,
                         parameters=array.resource_parameters(mode))
        yield "stream_resource", bundle.stream_resource_doc
        events = array.rows if mode is Mode.FLY else 1
        yield "stream_datum", bundle.compose_stream_datum({"start": 0, "stop": events})


class EarlierDefinition:
    """An earlier definition (``data(k)``) of a channel whose type or shape changed in a
    fly scan's file, as an event stream of its own (a Bluesky ``Collectable``): an event
    per row it holds, from the file's first, with its data and those rows' pulse ids."""

    def __init__(self, name: str, suffix: str, path: Path, arrays: list[StoredArray],
                 source: str) -> None:
        """``name``: the device's; ``suffix``: the stream's part of the name,
        ``<channel>(k)``; ``arrays``: the stream's (``by_stream``) of the file ``path``."""
        self.name = name
        self.parent = None
        self.suffix = suffix
        self._data_keys = {array.data_key: array.data_key_description(Mode.FLY, source)
                           for array in arrays}
        self._pending = list(resource_documents(path, arrays, Mode.FLY))
        self._rows = arrays[0].rows

    async def describe_collect(self) -> dict[str, DataKey]:
        return self._data_keys

    async def collect_asset_docs(self, index: int | None = None
                                 ) -> AsyncIterator[tuple[str, StreamResource | StreamDatum]]:
        pending, self._pending = self._pending, []
        for document in pending:
            yield document

    async def get_index(self) -> int:
        return self._rows
