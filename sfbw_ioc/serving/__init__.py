"""What both IOCs (``sfbw-ioc`` and ``sfbw-group``) need to serve their PVs the same way:
the watchdog, the Channel Access self-check that feeds it, and the access security
file checked against that self-check."""
