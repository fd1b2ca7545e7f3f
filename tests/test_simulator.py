"""The simulator, received through real ZeroMQ sockets and decoded with the codec."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from sfbw_ioc.bsread import HeaderCache, check_structure, decode_values, parse_main_header
from sfbw_ioc.stream.simulator import CAMERA_EVERY, Simulator, pulse_time_ns, simulated_values

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def receive(sock: zmq.Socket, count: int, timeout: float = 10.0) -> list[list[bytes]]:
    deadline = time.monotonic() + timeout
    messages = []
    while len(messages) < count:
        remaining_ms = (deadline - time.monotonic()) * 1000
        assert remaining_ms > 0, f"only {len(messages)} of {count} messages arrived"
        if sock.poll(remaining_ms):
            messages.append(sock.recv_multipart())
    return messages


def receive_from(simulator: Simulator, sock: zmq.Socket, count: int) -> list[list[bytes]]:
    """Connect ``sock`` to ``simulator``, run it until ``count`` messages arrived, stop it."""
    sock.connect(simulator.endpoint)
    simulator.start()
    try:
        return receive(sock, count)
    finally:
        simulator.stop()


def check_messages(messages: list[list[bytes]], rate_hz: float, pulse_step: int) -> None:
    cache = HeaderCache()
    pulse_ids = []
    for frames in messages:
        main = parse_main_header(frames[0])
        header = cache.get(main, frames[1])
        check_structure(header, frames)
        values, errors = decode_values(header, frames)
        assert errors == []
        assert main.global_timestamp_ns == pulse_time_ns(main.pulse_id, rate_hz)
        sent = simulated_values(main.pulse_id, rate_hz)
        assert [value.spec.name for value in values] == [spec.name for spec, _, _ in sent]
        for value, (spec, want, timestamp_ns) in zip(values, sent):
            if want is None:
                assert value.value is None
                continue
            assert value.spec == spec and value.timestamp_ns == timestamp_ns
            if isinstance(want, str):
                assert value.value == want
            else:
                assert value.value.dtype == want.dtype and np.array_equal(value.value, want)
        camera = values[-1]
        assert (camera.value is not None) == (main.pulse_id % CAMERA_EVERY == 0)
        pulse_ids.append(main.pulse_id)
    assert all(2**31 < pulse_id < 2**63 and pulse_id % pulse_step == 0 for pulse_id in pulse_ids)
    steps = np.diff(pulse_ids)
    # A stalled sender skips pulses rather than bursting, so a gap is a multiple of the step.
    assert all(steps > 0) and all(steps % pulse_step == 0)
    # The camera comes and goes, so the header alternates between two, parsed once each.
    assert cache.parses <= 2


@pytest.mark.parametrize("pulse_step", [1, 2])
def test_push(context, pulse_step: int) -> None:
    simulator = Simulator("tcp://127.0.0.1:*", rate_hz=200.0, pulse_step=pulse_step)
    messages = receive_from(simulator, context.socket(zmq.PULL), 20)
    assert simulator.endpoint.startswith("tcp://127.0.0.1:")
    check_messages(messages, 200.0, pulse_step)


def test_pub(context) -> None:
    simulator = Simulator("tcp://127.0.0.1:*", rate_hz=200.0, mode="pub")
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    messages = receive_from(simulator, sub, 20)
    check_messages(messages, 200.0, 1)


def test_stop_is_prompt_without_a_receiver() -> None:
    simulator = Simulator("tcp://127.0.0.1:*", rate_hz=1000.0)
    simulator.start()
    dropping = threading.Event()
    deadline = time.monotonic() + 5
    while simulator.dropped == 0 and time.monotonic() < deadline:
        dropping.wait(0.01)
    assert simulator.dropped > 0 and simulator.sent == 0
    start = time.monotonic()
    simulator.stop()
    assert time.monotonic() - start < 1.0


def test_stop_without_start_closes_the_socket() -> None:
    simulator = Simulator("tcp://127.0.0.1:*")
    endpoint = simulator.endpoint
    simulator.stop()
    again = Simulator(endpoint)  # the port is free again
    again.stop()


def test_simulated_values_are_deterministic() -> None:
    pulse_id = 20_000_000_010
    first, second = simulated_values(pulse_id), simulated_values(pulse_id)
    for (spec, a, stamp_a), (_, b, stamp_b) in zip(first, second):
        assert stamp_a == stamp_b == pulse_time_ns(pulse_id)
        assert a == b if isinstance(a, str) else np.array_equal(a, b)
    specs = {spec.name: spec for spec, _, _ in first}
    assert specs["SIM:CAMERA"].shape == (64, 80)
    assert specs["SIM:CAMERA"].compression == "bitshuffle_lz4"
    assert simulated_values(pulse_id + 1)[-1][1] is None
    assert pulse_time_ns(pulse_id + 1) - pulse_time_ns(pulse_id) == 10_000_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serves_until_sigterm(context) -> None:
    port = free_port()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    process = subprocess.Popen(
        [sys.executable, "-m", "sfbw_ioc.stream.simulator", "--port", str(port), "--rate", "200"],
        env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        pull = context.socket(zmq.PULL)
        pull.connect(f"tcp://127.0.0.1:{port}")
        check_messages(receive(pull, 5), 200.0, 1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert "SIGTERM received" in process.stderr.read()
