"""sfbw-ioc: the SwissFEL bsread buffer and writer as an EPICS soft IOC.

Data path, one module per step:
    receiver (ZeroMQ socket) -> ring (raw frames) -> acquisition (pulse range)
    -> writer (HDF5 file); bsread is the codec (a package); ioc is the PV layer.
"""

__version__ = "0.1.0"
