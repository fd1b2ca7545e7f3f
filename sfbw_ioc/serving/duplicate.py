"""Is the prefix served already? A second IOC started with the prefix of a running one
would serve the same PV names: every client search is then answered by both servers
and clients get their values (and send their puts) to either. So before serving, an IOC
searches for a few of its own PVs as its clients would: a Channel Access search (UDP,
to ``EPICS_CA_ADDR_LIST``, and with ``EPICS_CA_AUTO_ADDR_LIST`` the broadcast address
that caproto's clients use) and, when it serves PV Access too, a PV Access get (p4p's
client, on ``EPICS_PVA_*``). Any answer within ``SEARCH_DEADLINE_S`` means another
server has those names: the IOC refuses to start (``EXIT_DUPLICATE_PREFIX``).

The search goes out before anything of this IOC serves, so it cannot find itself; it
costs the IOC's start-up the deadline when nobody answers (the usual case), less when
somebody does. The CA search is made with caproto's sans-I/O messages on a plain UDP
socket, sent again a few times within the deadline in case a datagram is lost.
"""
from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import caproto as ca
from p4p.client.thread import Context as PvaContext

log = logging.getLogger(__name__)

# As long as caget waits for a PV by default: a server that answers later than that
# is one that clients do not find either.
SEARCH_DEADLINE_S = 1.0
EXIT_DUPLICATE_PREFIX = 78  # EX_CONFIG: the configuration clashes with a running IOC
# PVs both IOCs serve (pvs/acquisition.py's; on sfbw-ioc writer 1's, without W1:).
SEARCHED = ("STATE", "MESSAGE", "OUTPUT_FILE")
_SENT_AT_S = (0.0, 0.1, 0.3, 0.6)  # after the start of the search; within the deadline
_DATAGRAM_BYTES = 65536


@dataclass(frozen=True, slots=True)
class Answer:
    """A PV ``name`` found over ``protocol``, served by ``server`` (as far as known)."""

    name: str
    protocol: str
    server: str


def prefix_free(prefix: str, pva: bool, deadline_s: float = SEARCH_DEADLINE_S) -> bool:
    """True when no server answers for ``prefix``'s PVs within ``deadline_s`` (over
    Channel Access, and PV Access too if ``pva``); otherwise False, logged CRITICAL
    with the server that answered."""
    names = [prefix + name for name in SEARCHED]
    with ThreadPoolExecutor(1, thread_name_prefix="pva-search") as pool:
        pva_answer = pool.submit(search_pva, names, deadline_s) if pva else None
        answer = search_ca(names, ca.get_client_address_list(), deadline_s)
        if answer is None and pva_answer is not None:
            answer = pva_answer.result()
    if answer is None:
        log.info("no other server answers for the prefix %r (searched %s for %.1f s)",
                 prefix, "Channel Access and PV Access" if pva else "Channel Access",
                 deadline_s)
        return True
    log.critical("the prefix %r is served already: %s was found over %s at %s. "
                 "Two IOCs with one prefix would each answer clients, who then read from and "
                 "write to either. Stop the other one or choose another --prefix "
                 "(--allow-duplicate-prefix serves anyway); exiting with status %d",
                 prefix, answer.name, answer.protocol, answer.server, EXIT_DUPLICATE_PREFIX)
    return False


def search_ca(names: Sequence[str], addresses: Sequence[tuple[str, int]],
              deadline_s: float) -> Answer | None:
    """The first server to answer a Channel Access search for any of ``names`` sent to
    ``addresses`` (host, UDP port), within ``deadline_s``; None if none did. A name
    longer than EPICS's record names (59 characters, caproto's limit) is not searched."""
    requests = {cid: name for cid, name in enumerate(names, start=1)
                if len(name.partition(".")[0]) <= ca.MAX_RECORD_LENGTH}
    if not requests:
        return None
    broadcaster = ca.Broadcaster(ca.CLIENT)
    datagram = broadcaster.send(
        ca.VersionRequest(0, ca.DEFAULT_PROTOCOL_VERSION),
        *(ca.SearchRequest(name, cid, ca.DEFAULT_PROTOCOL_VERSION)
          for cid, name in requests.items()))
    began = time.monotonic()
    rounds = [at for at in _SENT_AT_S if at < deadline_s]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind(("", 0))
        for round_, ends_at in enumerate([*rounds[1:], deadline_s]):
            _send(sock, datagram, addresses, tell_failures=round_ == 0)
            answer = _receive(sock, broadcaster, requests, began + ends_at)
            if answer is not None:
                return answer
    return None


def _send(sock: socket.socket, datagram: bytes, addresses: Sequence[tuple[str, int]],
          tell_failures: bool) -> None:
    for address in addresses:
        try:
            sock.sendto(datagram, address)
        except OSError as error:
            if tell_failures:
                log.warning("cannot search for a server of this prefix at %s:%d: %s",
                            *address, error)


def _receive(sock: socket.socket, broadcaster: ca.Broadcaster, requests: dict[int, str],
             until: float) -> Answer | None:
    """The first answer to one of ``requests`` before the monotonic time ``until``."""
    while (remaining := until - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            data, sender = sock.recvfrom(_DATAGRAM_BYTES)
        except TimeoutError:
            return None
        except OSError:  # an ICMP error reported on the socket: not an answer
            continue
        try:
            commands = broadcaster.recv(data, sender)
        except ca.RemoteProtocolError:
            continue
        for command in commands:
            if isinstance(command, ca.SearchResponse) and command.cid in requests:
                host, port = ca.extract_address(command)
                return Answer(requests[command.cid], "Channel Access", f"{host}:{port}")
    return None


def search_pva(names: Sequence[str], deadline_s: float) -> Answer | None:
    """The first of ``names`` a PV Access server answers a get of within
    ``deadline_s`` (p4p's client does not tell which server: the answer names the
    search list); None if none did, or if the search cannot be made (logged)."""
    try:
        with PvaContext("pva") as context:
            results = context.get(list(names), timeout=deadline_s, throw=False)
            searched = context.conf().get("EPICS_PVA_ADDR_LIST", "")
    except Exception as error:  # p4p raises its own kinds; the check is not worth a failure
        log.warning("cannot search for a PV Access server of this prefix: %s", error)
        return None
    for name, result in zip(names, results):
        if not isinstance(result, TimeoutError):
            return Answer(name, "PV Access", f"a server of the search list {searched!r}")
    return None
