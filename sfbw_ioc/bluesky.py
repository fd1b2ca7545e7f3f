"""The Bluesky side of the IOC, as a plan imports it (``from sfbw_ioc.bluesky import
SfbwWriter``): the classic ophyd device is ``bridges.bluesky``; the ophyd-async one,
``SfbwDetector``, is ``bridges.bluesky_async``, imported when first asked for (it needs
ophyd-async, of the ``bluesky`` extra)."""
from typing import Any

from .bridges.bluesky import AcquisitionFailed, AcquisitionLength, SfbwWriter

_ASYNC = ("SfbwDetector", "SfbwFlyInfo", "fly_scan")

__all__ = ["AcquisitionFailed", "AcquisitionLength", "SfbwWriter", *_ASYNC]


def __getattr__(name: str) -> Any:
    if name not in _ASYNC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from .bridges import bluesky_async
    except ImportError as error:
        raise ImportError(f"sfbw_ioc.bluesky.{name} needs ophyd-async: "
                          f"pip install 'sfbw-ioc[bluesky]'") from error
    return getattr(bluesky_async, name)
