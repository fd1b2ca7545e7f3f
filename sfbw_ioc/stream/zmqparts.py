"""Take one whole message off a ZeroMQ socket: every part, ended where ZeroMQ ends it.

``best_receive()`` is the fastest of two ways that do the same:

- the C extension ``_zmqparts`` (built by setup.py where a compiler is at hand): one call
  per message; small parts become bytes, large ones are lent out without a copy. For a
  1000-channel message (2002 parts) the per-part cost of the Python loop was most of
  the receiver's CPU.
- ``receive_frames``, pure pyzmq: a zmq.Frame per part, its ``more`` flag.

Both raise zmq.Again when no message is waiting and never leave a message half-taken.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Callable

import zmq

from ..bsread import Buffer
from .message import LEND_LIMIT

try:
    from . import _zmqparts
except ImportError:  # built only where a C compiler was at hand
    _zmqparts = None

log = logging.getLogger(__name__)

Receive = Callable[[zmq.Socket], list[Buffer]]


_FUNCTIONS = ("zmq_msg_init", "zmq_msg_recv", "zmq_msg_close", "zmq_msg_move",
              "zmq_msg_data", "zmq_msg_size", "zmq_msg_more", "zmq_errno")


def receive_frames(socket: zmq.Socket) -> list[Buffer]:
    """The next message's parts as zmq.Frames (not recv_multipart: it pays a socket-option
    call with an enum lookup per part)."""
    frames = [socket.recv(zmq.NOBLOCK, copy=False)]
    # The rest of a message is there once its first part is.
    while frames[-1].more:
        frames.append(socket.recv(copy=False))
    return frames


def receive_parts(socket: zmq.Socket) -> list[Buffer]:
    """The next message's parts through the C extension (``fast_receive()`` must have
    returned it)."""
    try:
        parts = _zmqparts.receive(socket.underlying, LEND_LIMIT)
    except OSError as error:
        raise zmq.ZMQError(int(error.args[0])) from None
    if parts is None:
        raise zmq.Again()
    return parts


def _libzmq_candidates() -> list[str]:
    """The files that may hold the libzmq pyzmq uses: its own backend module first (a
    libzmq linked into it is the sockets' one even when another libzmq is loaded), then
    each libzmq this process has loaded (seen in its memory map)."""
    candidates = []
    try:
        from zmq.backend.cython import _zmq
        candidates.append(_zmq.__file__)
    except ImportError:  # pyzmq's CFFI backend (PyPy)
        pass
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith("libzmq") and path not in candidates:
                    candidates.append(path)
    except OSError:
        pass
    return candidates


def _bind_libzmq() -> str | None:
    """Hand libzmq's functions to the extension from the first file that has them and
    works with pyzmq's sockets; that file, or None."""
    for path in _libzmq_candidates():
        try:
            library = ctypes.CDLL(path)
            addresses = [ctypes.cast(getattr(library, name), ctypes.c_void_p).value
                         for name in _FUNCTIONS]
        except (OSError, AttributeError):
            continue
        _zmqparts.bind(*addresses)
        if _works():
            return path
    return None


def _works() -> bool:
    """One message of a small and a large part through the extension, compared."""
    context = zmq.Context()
    try:
        sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
        sender.bind("inproc://sfbw-zmqparts-check")
        receiver.connect("inproc://sfbw-zmqparts-check")
        sent = [b"small", os.urandom(LEND_LIMIT + 1)]
        sender.send_multipart(sent)
        receiver.poll(1000)
        got = receive_parts(receiver)
        return [bytes(part) for part in got] == sent
    except zmq.ZMQError:
        return False
    finally:
        context.destroy(linger=0)


@functools.cache
def fast_receive() -> Receive | None:
    """``receive_parts`` when the extension is built and bound to pyzmq's libzmq (checked
    with one message), else None."""
    if _zmqparts is None:
        log.info("the C extension _zmqparts is not built; receiving part by part")
        return None
    if zmq.zmq_version_info() < (4, 1):  # zmq_msg_t was smaller before
        log.info("libzmq %s is too old for _zmqparts; receiving part by part",
                 zmq.zmq_version())
        return None
    path = _bind_libzmq()
    if path is None:
        log.warning("pyzmq's libzmq could not be used from _zmqparts; receiving part by part")
        return None
    log.info("receiving whole messages through _zmqparts with %s", path)
    return receive_parts


def best_receive() -> Receive:
    """The fastest way this machine has."""
    return fast_receive() or receive_frames
