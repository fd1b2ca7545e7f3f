"""The Bluesky side of the IOC, as a plan imports it (``from sfbw_ioc.bluesky import
SfbwWriter``); the device itself is ``bridges.bluesky``."""
from .bridges.bluesky import AcquisitionFailed, AcquisitionLength, SfbwWriter

__all__ = ["AcquisitionFailed", "AcquisitionLength", "SfbwWriter"]
