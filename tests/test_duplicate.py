"""The Channel Access search for the IOC's own PVs before it serves
(sfbw_ioc.serving.duplicate), against a server made of a real UDP socket in a thread
that answers as caproto's and EPICS's servers do; no processes. The search against
running IOCs and softIoc is in test_startup.py."""
from __future__ import annotations

import logging
import socket
import threading
import time

import caproto as ca
import pytest

from sfbw_ioc.serving.duplicate import (EXIT_DUPLICATE_PREFIX, SEARCHED, Answer, prefix_free,
                                        search_ca)
from sfbw_ioc.testing.ioc import poll

TCP_PORT = 43_210  # what the server says it serves on (nothing connects to it)


class SearchAnswerer:
    """A UDP socket on 127.0.0.1 answering searches for ``served`` names, after
    ignoring the first ``lose`` datagrams (lost on the way)."""

    def __init__(self, served: set[str], lose: int = 0) -> None:
        self.served, self.lose = served, lose
        self.datagrams = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        broadcaster = ca.Broadcaster(ca.SERVER)
        while not self._stop.is_set():
            try:
                data, sender = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.datagrams += 1
            if self.datagrams <= self.lose:
                continue
            answers = [ca.SearchResponse(TCP_PORT, None, command.cid, command.version)
                       for command in broadcaster.recv(data, sender)
                       if isinstance(command, ca.SearchRequest) and command.name in self.served]
            if answers:
                self.sock.sendto(broadcaster.send(*answers), sender)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def answerer():
    made: list[SearchAnswerer] = []

    def make(served: set[str], lose: int = 0) -> SearchAnswerer:
        made.append(SearchAnswerer(served, lose))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_a_server_of_one_of_the_names_is_found(answerer) -> None:
    server = answerer({"P:MESSAGE"})
    began = time.monotonic()
    answer = search_ca(["P:STATE", "P:MESSAGE"], [server.address], 1.0)
    assert answer == Answer("P:MESSAGE", "Channel Access", f"127.0.0.1:{TCP_PORT}")
    assert time.monotonic() - began < 0.5  # at the answer, not at the deadline


def test_nobody_answering_takes_the_deadline(answerer) -> None:
    server = answerer({"OTHER:STATE"})
    began = time.monotonic()
    assert search_ca(["P:STATE"], [server.address], 0.5) is None
    assert 0.5 <= time.monotonic() - began < 1.0
    assert server.datagrams >= 3  # sent again within the deadline


def test_a_lost_datagram_is_made_up_for(answerer) -> None:
    server = answerer({"P:STATE"}, lose=2)
    answer = search_ca(["P:STATE"], [server.address], 1.0)
    assert answer is not None and answer.name == "P:STATE"


def test_names_longer_than_a_record_name_are_not_searched(answerer) -> None:
    long = "P" * 60 + ":STATE"
    server = answerer({long, "P:STATE"})
    began = time.monotonic()
    assert search_ca([long], [server.address], 1.0) is None
    assert time.monotonic() - began < 0.1 and server.datagrams == 0
    assert search_ca([long, "P:STATE"], [server.address], 1.0).name == "P:STATE"


def test_every_address_is_searched_and_one_that_cannot_be_sent_to_is_told(
        answerer, caplog) -> None:
    silent, serving = answerer(set()), answerer({"P:STATE"})
    with caplog.at_level(logging.WARNING, logger="sfbw_ioc.serving.duplicate"):
        answer = search_ca(["P:STATE"], [("127.0.0.1", 0), silent.address, serving.address], 1.0)
    assert answer is not None and answer.server == f"127.0.0.1:{TCP_PORT}"
    poll(lambda: silent.datagrams >= 1, 5, what="the search at the silent address")
    assert "cannot search for a server of this prefix at 127.0.0.1:0" in caplog.text


def test_prefix_free_searches_the_client_address_list(answerer, monkeypatch, caplog) -> None:
    free, taken = answerer(set()), answerer({"TAKEN:STATE"})
    monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", " ".join(f"{host}:{port}" for host, port in
                                                      (free.address, taken.address)))
    with caplog.at_level(logging.INFO, logger="sfbw_ioc.serving.duplicate"):
        assert prefix_free("FREE:", pva=False, deadline_s=0.3)
        assert not prefix_free("TAKEN:", pva=False, deadline_s=0.3)
    assert "no other server answers for the prefix 'FREE:'" in caplog.text
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical == [
        f"the prefix 'TAKEN:' is served already: TAKEN:STATE was found over Channel Access at "
        f"127.0.0.1:{TCP_PORT}. Two IOCs with one prefix would each answer clients, who then "
        "read from and write to either. Stop the other one or choose another --prefix "
        f"(--allow-duplicate-prefix serves anyway); exiting with status {EXIT_DUPLICATE_PREFIX}"]
    assert "STATE" in SEARCHED
