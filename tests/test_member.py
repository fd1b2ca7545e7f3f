"""``group.member.Member`` against a real caproto server in a subprocess: a member that
dies while a put waits for its callback is reported as unreachable, by name."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from sfbw_ioc.group.member import Client, Member, MemberUnreachable
from sfbw_ioc.testing.ioc import REPO, ioc_environment, poll, unique_prefix

# A member's PVs; STOP_PULSE_ID's put never completes (a file that takes long to close).
STUCK_MEMBER = """
import asyncio, sys
from caproto.server import PVGroup, pvproperty, run
from sfbw_ioc.group import member

class Stuck(PVGroup):
    locals().update({name: pvproperty(name=name, value=0.0) for name in member._PVS
                     if name not in ("STATE", "STOP_PULSE_ID")})
    STATE = pvproperty(value="IDLE", enum_strings=("IDLE",), dtype=caproto.ChannelType.ENUM)
    STOP_PULSE_ID = pvproperty(value=0.0)

    @STOP_PULSE_ID.putter
    async def STOP_PULSE_ID(self, instance, value):
        print("stopping", flush=True)
        await asyncio.Event().wait()

run(Stuck(prefix=sys.argv[1]).pvdb)
"""


@pytest.fixture
def stuck_member(ca_ports):
    prefix = unique_prefix("STUCK")
    process = subprocess.Popen([sys.executable, "-c", "import caproto\n" + STUCK_MEMBER, prefix],
                               env={**os.environ, **ioc_environment(ca_ports())}, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    yield prefix, process
    process.kill()
    process.wait()


def test_a_member_killed_during_a_put_is_unreachable_not_an_error(stuck_member):
    prefix, process = stuck_member

    async def put_and_kill() -> Exception:
        member = Member(Client(), prefix, lambda m: None)
        await member.connect()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: poll(lambda: member.connected, what="the member connecting"))
        put = asyncio.ensure_future(member.put("STOP_PULSE_ID", 1.0, timeout=None))
        await asyncio.get_running_loop().run_in_executor(None, process.stdout.readline)
        process.send_signal(signal.SIGKILL)
        try:
            await asyncio.wait_for(put, 10)
        except Exception as error:  # what the coordinator would be handed
            return error
        raise AssertionError("the put completed on a killed member")

    error = asyncio.run(put_and_kill())
    assert isinstance(error, MemberUnreachable), repr(error)
    assert str(error) == f"{prefix} disconnected during the put to STOP_PULSE_ID"
