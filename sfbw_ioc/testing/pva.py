"""PV Access ports of an IOC subprocess, for tests and benchmarks: its server's
variables and the client environment (and a p4p client context) that finds it."""
from __future__ import annotations

from p4p.client.thread import Context

from .ioc import free_port


class PvaPorts:
    """One port, free for TCP and UDP, as the IOC's PVA server port and search port."""

    def __init__(self) -> None:
        self.port = free_port(udp_too=True)

    def server_environment(self) -> dict[str, str]:
        return {"EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
                "EPICS_PVAS_SERVER_PORT": str(self.port),
                "EPICS_PVAS_BROADCAST_PORT": str(self.port)}

    def server_wrapper(self) -> list[str]:
        """``IocProcess(wrapper=...)``: the IOC started with its PVA variables."""
        return ["env", *(f"{name}={value}" for name, value in self.server_environment().items())]

    def client_environment(self) -> dict[str, str]:
        return {"EPICS_PVA_ADDR_LIST": f"127.0.0.1:{self.port}",
                "EPICS_PVA_AUTO_ADDR_LIST": "NO",
                "EPICS_PVA_BROADCAST_PORT": str(self.port)}

    def context(self) -> Context:
        return Context("pva", conf=self.client_environment(), useenv=False)
