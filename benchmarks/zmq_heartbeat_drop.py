"""Reproduces a silent loss seen in `bench.py wide` (MISSING > 0 with LOST 0), without
the IOC: a PULL socket with the receiver's options (RCVHWM 10000, HEARTBEAT_IVL 1 s,
HEARTBEAT_TIMEOUT 3 s) whose consumer stalls longer than the heartbeat timeout while its
queue is full. libzmq then drops the connection, the PULL reconnects, and the messages
queued for the old connection are gone; nothing is reported to the application.

    python benchmarks/zmq_heartbeat_drop.py                  # heartbeats on: loses ~2500
    python benchmarks/zmq_heartbeat_drop.py --no-heartbeat   # no loss

Seen with libzmq 4.3.5 (pyzmq). See also zeromq/libzmq#4767 (slow subscriber reset by
the ZMTP heartbeat when its receive queue is full).
"""
from __future__ import annotations

import argparse
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40_000, help="more than RCVHWM")
    parser.add_argument("--parts", type=int, default=42, help="parts per message")
    parser.add_argument("--stall", type=float, default=6.0, help="consumer stall, s")
    parser.add_argument("--no-heartbeat", action="store_true")
    args = parser.parse_args()

    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    monitor = push.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
    pull = context.socket(zmq.PULL)
    options = [(zmq.RCVHWM, 10_000), (zmq.LINGER, 0), (zmq.RECONNECT_IVL, 100),
               (zmq.RECONNECT_IVL_MAX, 1000)]
    if not args.no_heartbeat:
        options += [(zmq.HEARTBEAT_IVL, 1000), (zmq.HEARTBEAT_TIMEOUT, 3000)]
    for option, value in options:
        pull.setsockopt(option, value)
    pull.connect(f"tcp://127.0.0.1:{port}")

    body = [b"x" * 50] * (args.parts - 1)

    def send() -> None:
        for i in range(args.messages):
            push.send_multipart([str(i).encode(), *body])

    threading.Thread(target=send, daemon=True).start()
    received = [int(pull.recv_multipart()[0])]
    time.sleep(args.stall)  # the consumer stalls: its queue fills, TCP is no longer read
    pull.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        while len(received) < args.messages:
            received.append(int(pull.recv_multipart()[0]))
    except zmq.Again:
        pass
    events = []
    while monitor.poll(0):
        events.append(recv_monitor_message(monitor)["event"])
    print(f"heartbeat {'off' if args.no_heartbeat else 'on'}, stall {args.stall} s: received "
          f"{len(received)} of {args.messages}, lost {args.messages - len(received)}; source saw "
          f"{events.count(zmq.EVENT_ACCEPTED)} connections, "
          f"{events.count(zmq.EVENT_DISCONNECTED)} disconnects (libzmq {zmq.zmq_version()})")
    return 0 if len(received) == args.messages else 1


if __name__ == "__main__":
    raise SystemExit(main())
