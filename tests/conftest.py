"""Session set-up: a pool of free Channel Access ports that every client searches.

libca (pyepics) reads EPICS_CA_ADDR_LIST once, at its first call, so the whole pool is
put into the environment before any test runs; each IOC then takes one port of it.
"""
import os

import pytest

from sfbw_ioc.testing.ioc import ca_client_environment, free_port

CA_PORT_POOL_SIZE = 40  # IOCs one test process starts (each with its own port)
_pool: list[int] = []


def pytest_configure(config):
    _pool.extend(free_port(udp_too=True) for _ in range(CA_PORT_POOL_SIZE))
    os.environ.update(ca_client_environment(_pool))


@pytest.fixture(scope="session")
def ca_ports():
    """Hands out the pool's ports, one per IOC."""
    ports = iter(list(_pool))
    return lambda: next(ports)
