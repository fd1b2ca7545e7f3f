"""sfbw-group: one acquisition over many member IOCs, and its master file."""
