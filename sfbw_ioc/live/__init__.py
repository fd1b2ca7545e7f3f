"""The live view's sampling of the newest buffered messages (its PVs: pvs.live)."""
