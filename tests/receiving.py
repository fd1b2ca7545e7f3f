"""The receiver's two ways of taking a message off its socket (sfbw_ioc.stream.zmqparts),
as pytest parameters: every test of receiving runs with both."""
from __future__ import annotations

import pytest

from sfbw_ioc.stream import zmqparts

# The C extension's only where it is built (setup.py builds it wherever a compiler is at
# hand).
RECEIVE_WAYS = [
    pytest.param("c-extension", marks=pytest.mark.skipif(
        zmqparts._zmqparts is None, reason="the C extension _zmqparts is not built")),
    "frames",
]


def receive_way(name: str) -> zmqparts.Receive:
    """A RECEIVE_WAYS way, ready (bound to libzmq: not at import, which would start a
    ZeroMQ context in every test process)."""
    if name == "frames":
        return zmqparts.receive_frames
    fast = zmqparts.fast_receive()
    assert fast is not None, "the C extension is built but could not be bound to libzmq"
    return fast
