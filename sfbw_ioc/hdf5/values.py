"""A message's values checked against its data header, and made into one-row columns."""
from __future__ import annotations

import numpy as np

from ..bsread import ChannelValue, Column
from .layout import Definition


def check_value(value: ChannelValue) -> None:
    """A present value must be what its spec says: the spec defines its column."""
    definition = Definition.of_spec(value.spec)
    name = value.spec.name
    if definition.bsread_type == "string":
        if not isinstance(value.value, str):
            raise TypeError(f"string channel {name!r} carries a {type(value.value).__name__}")
        return
    if not isinstance(value.value, (np.ndarray, np.generic)):  # numpy scalars too
        raise TypeError(f"channel {name!r} carries a {type(value.value).__name__}")
    if value.value.shape != definition.shape:
        raise ValueError(f"channel {name!r}: a value of shape {value.value.shape} for a "
                         f"spec of shape {definition.shape}")


def column_bytes(column: Column) -> int:
    if isinstance(column.values, np.ndarray):
        return column.values.nbytes
    return sum(len(value) for value in column.values if value is not None)


def one_row(value: ChannelValue) -> Column:
    """A single message's value as a one-row column."""
    present = value.value is not None
    if value.spec.type == "string":
        values: np.ndarray | list = [value.value or ""]
    else:
        values = np.asarray(value.value if present else 0)[np.newaxis]
    return Column(value.spec, np.array([present]),
                  np.array([value.timestamp_ns if present else 0], dtype=np.int64), values)
