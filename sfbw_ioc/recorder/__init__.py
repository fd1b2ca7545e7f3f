"""EPICS PVs recorded into every file: the list of names, a Channel Access monitor on
each, and each PV's recent history, which the HDF5 writer reads once per flush."""
