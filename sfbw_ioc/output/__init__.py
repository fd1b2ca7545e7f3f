"""Where a file may be written and who owns it: rules shared by every writer of files."""
