"""socket -> ring: the always-on receive side of the data path."""
