"""Both ways of taking one whole message off a ZeroMQ socket (sfbw_ioc.stream.zmqparts), on real
sockets over TCP: the same parts, in order, each message ended where ZeroMQ ends it."""
from __future__ import annotations

import os

import pytest
import zmq

from sfbw_ioc.testing.ioc import free_port
from receiving import RECEIVE_WAYS, receive_way
from sfbw_ioc.stream import zmqparts

LIMIT = zmqparts.LEND_LIMIT
MESSAGES = [
    [b"only one part"],
    [b"%d" % i * 8 for i in range(2002)],  # a 1000-channel bsread message
    [b"main", b"", os.urandom(LIMIT), os.urandom(LIMIT + 1), b"", os.urandom(3 << 20)],
    [b"\0" * 16, b"short"],  # one part fewer than its neighbours: no matter
    [os.urandom(LIMIT + 1)],
]


@pytest.fixture
def pair():
    context = zmq.Context()
    sender, receiver = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    port = free_port()
    sender.bind(f"tcp://127.0.0.1:{port}")
    receiver.connect(f"tcp://127.0.0.1:{port}")
    yield sender, receiver
    context.destroy(linger=0)


def receive_when_there(receive, socket: zmq.Socket):
    assert socket.poll(10_000), "no message within 10 s"
    return receive(socket)


BUILT = pytest.mark.skipif(zmqparts._zmqparts is None, reason="_zmqparts is not built")


@pytest.mark.parametrize("receive", RECEIVE_WAYS)
def test_every_message_comes_off_whole_and_in_order(receive, pair):
    receive = receive_way(receive)
    sender, receiver = pair
    for message in MESSAGES:
        sender.send_multipart(message)
    for message in MESSAGES:
        assert [bytes(part) for part in receive_when_there(receive, receiver)] == message
    with pytest.raises(zmq.Again):
        receive(receiver)


@pytest.mark.parametrize("receive", RECEIVE_WAYS)
def test_a_libzmq_error_is_a_zmq_error(receive, pair):
    receive = receive_way(receive)
    sender, _ = pair
    with pytest.raises(zmq.ZMQError) as caught:
        receive(sender)  # a PUSH socket cannot receive
    assert caught.value.errno == zmq.ENOTSUP


@BUILT
def test_large_parts_are_lent_out_and_outlive_their_socket(pair):
    sender, receiver = pair
    image = os.urandom(LIMIT + 1)
    sender.send_multipart([b"small", image])
    small, large = receive_when_there(receive_way("c-extension"), receiver)
    assert type(small) is bytes and type(large) is not bytes
    receiver.close(linger=0)
    view = memoryview(large)
    assert len(large) == view.nbytes == LIMIT + 1 and view.readonly
    assert view.tobytes() == image


@BUILT
def test_received_parts_are_freed(pair):
    """300 messages of a 1 MiB part and 1000 small ones: nothing of them stays behind."""
    sender, receiver = pair
    message = [os.urandom(1 << 20), *[b"12345678"] * 1000]

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def take(count: int) -> None:
        for _ in range(count):
            sender.send_multipart(message)
            parts = receive_when_there(receive_way("c-extension"), receiver)
            assert len(parts) == len(message)

    take(20)  # allocator arenas at their working size
    before = resident()
    take(300)
    assert resident() - before < 32 << 20, "received parts were not freed"


@BUILT
def test_the_c_extension_is_used_where_it_is_built():
    assert zmqparts.best_receive() is zmqparts.receive_parts

