"""PV Access beside Channel Access: every caproto PV served over PVA as well (p4p's
server in the IOC's own asyncio loop), with the camera frame and the live slots' values
as NTNDArray.

    values   a caproto PV's normative type (NTScalar, NTScalarArray, NTEnum) and value
    peers    who a PVA client is, for the ACF's UAG and HAG rules
    mirror   one SharedPV per caproto PV, following its updates; puts through its putter
    frames   NTNDArray of the live view's samples, decompressed and as in the ring
    server   the PVA server's life, inside the IOC's loop

docs/pva.md tells the names, types and limits.
"""
