"""caproto's asyncio Channel Access server, with READ access enforced as EPICS's rsrv does.

caproto checks a channel's access rights when a client creates it and on every write,
but a read it refuses is answered with an internal error (and a traceback in the log),
and a subscription is served without any check: a client that ignores the rights it was
told (caproto's own client, a hand-written one) gets every value. EPICS's server answers
a read without READ access with ``ECA_NORDACCESS`` and no value, and a subscription with
one such answer and no updates after it; so does this one. libca's tools (caget,
camonitor) know the rights and do not even ask.
"""
from __future__ import annotations

from typing import Any

import caproto as ca
from caproto import AccessRights
from caproto.asyncio.server import Context as _Context
from caproto.asyncio.server import VirtualCircuit as _VirtualCircuit

_READS = (ca.ReadNotifyRequest, ca.ReadRequest)


class ReadGuardedCircuit(_VirtualCircuit):
    """A client's circuit that serves reads and monitors only with READ access."""

    async def _process_command(self, command: Any) -> Any:
        if isinstance(command, (*_READS, ca.EventAddRequest)) and not self._may_read(command):
            return [self._refusal(command)]
        return await super()._process_command(command)

    def _refusal(self, command: Any) -> Any:
        """rsrv's answer: the status, no value, and the requested type's metadata zeroed
        (a client parses the metadata of a DBR_TIME_* answer even without a value). A
        refused subscription is not kept: no update follows."""
        data_type = command.data_type
        metadata = None if ca.native_type(data_type) == data_type else ca.DBR_TYPES[data_type]()
        if isinstance(command, ca.EventAddRequest):
            return ca.EventAddResponse(b"", data_type, 0, ca.CAStatus.ECA_NORDACCESS,
                                       command.subscriptionid, metadata=metadata)
        channel, _ = self._get_db_entry_from_command(command)
        return channel.read(data=b"", data_type=data_type, data_count=0,
                            status=ca.CAStatus.ECA_NORDACCESS, ioid=command.ioid,
                            metadata=metadata, notify=isinstance(command, ca.ReadNotifyRequest))

    def _may_read(self, command: Any) -> bool:
        _, db_entry = self._get_db_entry_from_command(command)
        rights = db_entry.check_access(self.client_hostname, self.client_username)
        return AccessRights.READ in rights


class Context(_Context):
    """caproto's asyncio server Context with ``ReadGuardedCircuit`` circuits."""

    CircuitClass = ReadGuardedCircuit
