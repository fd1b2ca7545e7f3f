"""Which messages of the ring go into which file, and when it is closed."""
