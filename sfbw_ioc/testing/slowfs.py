"""A disk slower than the stream, for real: a FUSE passthrough file system whose every
``write`` takes the time a device of a given byte rate would (the IOC's own ``write``
calls block in the kernel until this process answers them).

Run as ``python -m sfbw_ioc.testing.slowfs BACKING MOUNT CONTROL``; CONTROL holds the
rate in bytes per second (0: unthrottled) and is read again whenever it changes, so a
test throttles and recovers the disk by rewriting it (atomically, by rename).

Needs libfuse 3 (Debian: fuse3) and mfusepy; ``SlowFilesystem`` mounts it in a
subprocess and unmounts it, always.
"""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .ioc import poll

log = logging.getLogger(__name__)


class _Device:
    """A device that writes ``rate`` bytes a second, one request after the other."""

    def __init__(self, control: Path) -> None:
        self._control = control
        self._lock = threading.Lock()
        self._stamp: float | None = None
        self._rate = 0.0
        self._free_at = 0.0  # when the device has written what it was given

    def write(self, nbytes: int) -> None:
        """Block as long as the device takes for ``nbytes`` more."""
        with self._lock:
            rate = self._current_rate()
            if not rate:
                return
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + nbytes / rate
            done = self._free_at
        time.sleep(max(0.0, done - time.monotonic()))  # the device's time, not ours

    def _current_rate(self) -> float:
        stamp = os.stat(self._control).st_mtime_ns
        if stamp != self._stamp:
            self._stamp, self._rate = stamp, float(self._control.read_text() or 0)
        return self._rate


def _operations(backing: Path, device: _Device):
    import mfusepy as fuse  # only in the file system's process

    class Passthrough(fuse.Operations):
        use_ns = True

        def _path(self, path: str) -> str:
            return str(backing) + path

        def getattr(self, path, fh=None):
            st = os.lstat(self._path(path))
            return {key: getattr(st, key) for key in (
                "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime",
                "st_mtime", "st_ctime")}

        def readdir(self, path, fh):
            return [".", "..", *os.listdir(self._path(path))]

        def access(self, path, amode):
            if not os.access(self._path(path), amode):
                raise fuse.FuseOSError(errno.EACCES)
            return 0

        def chmod(self, path, mode):
            os.chmod(self._path(path), mode)
            return 0

        def chown(self, path, uid, gid):
            os.chown(self._path(path), uid, gid)
            return 0

        def mkdir(self, path, mode):
            os.mkdir(self._path(path), mode)
            return 0

        def rmdir(self, path):
            os.rmdir(self._path(path))
            return 0

        def unlink(self, path):
            os.unlink(self._path(path))
            return 0

        def link(self, target, source):  # mfusepy's order: the new name first
            os.link(self._path(source), self._path(target))
            return 0

        def rename(self, old, new):
            os.rename(self._path(old), self._path(new))
            return 0

        def statfs(self, path):
            st = os.statvfs(self._path(path))
            return {key: getattr(st, key) for key in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")}

        def utimens(self, path, times=None):
            os.utime(self._path(path), ns=times)
            return 0

        def open(self, path, flags):
            return os.open(self._path(path), flags)

        def create(self, path, mode, fi=None):
            return os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

        def read(self, path, size, offset, fh):
            return os.pread(fh, size, offset)

        def write(self, path, data, offset, fh):
            device.write(len(data))
            return os.pwrite(fh, data, offset)

        def truncate(self, path, length, fh=None):
            if fh is None:
                os.truncate(self._path(path), length)
            else:
                os.ftruncate(fh, length)
            return 0

        def flush(self, path, fh):
            return 0

        def fsync(self, path, datasync, fh):
            os.fsync(fh)
            return 0

        def release(self, path, fh):
            os.close(fh)
            return 0

    return fuse, Passthrough()


def main(argv: list[str] | None = None) -> None:
    backing, mount, control = (Path(arg) for arg in (argv or sys.argv[1:]))
    fuse, operations = _operations(backing, _Device(control))
    fuse.FUSE(operations, str(mount), foreground=True, nothreads=False)


def available() -> str | None:
    """Why a slow file system cannot be mounted here (None: it can)."""
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    try:
        import mfusepy  # noqa: F401  (loads libfuse)
    except (ImportError, OSError, EnvironmentError) as error:
        return f"no FUSE for Python (pip mfusepy, apt fuse3): {error}"
    return None


class SlowFilesystem:
    """``mount`` showing ``backing`` through a write rate limit, in a subprocess."""

    def __init__(self, backing: Path, mount: Path, log_path: Path) -> None:
        self.mount, self.control = mount, mount.parent / f"{mount.name}.rate"
        backing.mkdir(exist_ok=True)
        mount.mkdir(exist_ok=True)
        self.set_rate(0)
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sfbw_ioc.testing.slowfs", str(backing), str(mount),
             str(self.control)], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            poll(self._mounted, timeout=10, what=f"FUSE mount at {mount}")
        except BaseException:
            self.close()
            raise

    def _mounted(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"slowfs exited: {Path(self._log.name).read_text()}")
        return os.path.ismount(self.mount)

    def set_rate(self, bytes_per_second: float) -> None:
        """The device's write rate from the next write on (0: unthrottled)."""
        staged = self.control.with_suffix(".new")
        staged.write_text(str(bytes_per_second))
        os.replace(staged, self.control)

    def close(self) -> None:
        self.set_rate(0)  # a blocked writer finishes at once
        subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], capture_output=True)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


if __name__ == "__main__":
    main()
