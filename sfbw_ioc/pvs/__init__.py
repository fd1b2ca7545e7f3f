"""The caproto PV layer of the IOC (and the PV kinds the group IOC shares)."""
