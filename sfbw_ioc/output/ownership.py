"""Who owns what a writer creates: the ``.partial`` file, hence the final file, and the
directories made for it, with their modes.

An ``Owner`` is a value: a uid and a gid (``KEEP``, -1: the IOC's own, as chown(2) takes
it) and the modes of files and directories. ``check`` refuses, before anything is
created, an owner the IOC cannot give files to; ``create_file`` makes the missing
directories and the empty file, each born private (only the IOC can open it), then given
its mode and owner: a file changes hands while it is empty, before the first byte of
HDF5 is written.

The directories given away may belong to someone who is not to be trusted with the
IOC's privileges: the new owner could swap a directory the IOC just gave them for a
symbolic link to ``/etc`` while the IOC goes on creating beneath it. Every step
therefore works on descriptors (``mkdirat``/``openat`` relative to the directory
opened before, ``O_NOFOLLOW``), never on a path looked up again.
"""
from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

KEEP = -1  # chown(2)'s "leave it": the IOC's own uid or gid
DEFAULT_FILE_MODE = 0o640
DEFAULT_DIR_MODE = 0o750
# Modes a file may be given: permission bits only (no set-id or sticky bit on data).
FILE_MODE_BITS = 0o777
# Directories may also carry set-gid (group-shared trees) and the sticky bit.
DIR_MODE_BITS = 0o7777
# uid_t and gid_t are 32 bits and (uid_t)-1 means "leave it"; a LONG PV stops at 2**31 - 1.
MAX_ID = 2**31 - 1

# Bits of /proc/self/status CapEff (linux/capability.h).
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
_CAPABILITY_NAMES = {CAP_CHOWN: "CAP_CHOWN", CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE"}

_PRIVATE_FILE = 0o600
_PRIVATE_DIR = 0o700
_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class OwnershipError(ValueError):
    """An owner that cannot be given files; the text is meant for the operator."""


@dataclass(frozen=True, slots=True)
class Owner:
    """Owner and modes of the files and directories a writer creates."""

    uid: int = KEEP
    gid: int = KEEP
    file_mode: int = DEFAULT_FILE_MODE
    dir_mode: int = DEFAULT_DIR_MODE

    def __post_init__(self) -> None:
        check_mode(self.file_mode, FILE_MODE_BITS, "file mode")
        check_mode(self.dir_mode, DIR_MODE_BITS, "directory mode")

    def with_ids(self, uid: int, gid: int) -> Owner:
        """The same modes for another uid and gid (not checked yet: see ``check``)."""
        return replace(self, uid=uid, gid=gid)

    def check(self) -> None:
        """Refuse (``OwnershipError``) ids out of range, ids no account or group has,
        and an owner the IOC lacks the capabilities to give files to."""
        for name, value in (("FILE_UID", self.uid), ("FILE_GID", self.gid)):
            check_id(value, name)
        if self.uid != KEEP:
            try:
                pwd.getpwuid(self.uid)
            except KeyError:
                raise OwnershipError(f"FILE_UID {self.uid}: no user has this uid") from None
        if self.gid != KEEP:
            try:
                grp.getgrgid(self.gid)
            except KeyError:
                raise OwnershipError(f"FILE_GID {self.gid}: no group has this gid") from None
        needed = self._capabilities_needed()
        missing = needed - effective_capabilities()
        if missing:
            raise OwnershipError(
                f"cannot give files to {self.describe()}: the IOC (uid {os.geteuid()}) "
                f"lacks {_names(missing, ' and ')}; run it as root or with "
                f"AmbientCapabilities={_names(needed, ' ')} in its systemd unit")

    def _capabilities_needed(self) -> set[int]:
        """Another user: CAP_CHOWN to give the file and directories away, and
        CAP_DAC_OVERRIDE to go on writing into them (the file is reopened, the next
        directory made inside the one given away, the final name linked at the end).
        Another group only: chown(2) lets an owner pick any of its own groups; others
        need CAP_CHOWN (the IOC stays the owner: it needs no more)."""
        if self.uid not in (KEEP, os.geteuid()):
            return {CAP_CHOWN, CAP_DAC_OVERRIDE}
        if self.gid not in (KEEP, os.getegid(), *os.getgroups()):
            return {CAP_CHOWN}
        return set()

    def describe(self) -> str:
        """'user alice (uid 1001), group beam (gid 1002)'; '' for the IOC's own."""
        parts = []
        if self.uid != KEEP:
            parts.append(f"user {_name(pwd.getpwuid, self.uid)} (uid {self.uid})")
        if self.gid != KEEP:
            parts.append(f"group {_name(grp.getgrgid, self.gid)} (gid {self.gid})")
        return ", ".join(parts)

    def create_file(self, path: Path) -> int:
        """Make the missing directories of ``path`` and ``path`` itself, empty and
        exclusive (``FileExistsError`` if anything is there, a symbolic link too), each
        given its mode and owner. Returns the file's descriptor, open for reading and
        writing: the caller closes it.

        ``path`` must be free of symbolic links (resolved): one met on the way is an
        error (``NotADirectoryError``), as one swapped in after the resolution must be."""
        path = Path(os.path.abspath(path))
        directory = self._open_directories(path.parent)
        try:
            fd = os.open(path.name, _NEW_FILE, _PRIVATE_FILE, dir_fd=directory)
            try:
                self._take(fd, self.file_mode)
            except BaseException:
                os.close(fd)
                os.unlink(path.name, dir_fd=directory)
                raise
            return fd
        finally:
            os.close(directory)

    def _open_directories(self, directory: Path) -> int:
        """A descriptor of ``directory``, walked from / one name at a time without
        following symbolic links, creating the missing names."""
        fd = os.open("/", _WALK)
        try:
            for name in directory.parts[1:]:
                fd = _replace_fd(fd, self._enter(fd, name))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _enter(self, parent: int, name: str) -> int:
        try:
            return os.open(name, _WALK, dir_fd=parent)
        except FileNotFoundError:
            pass
        try:
            os.mkdir(name, _PRIVATE_DIR, dir_fd=parent)
        except FileExistsError:  # made meanwhile by another writer: theirs, as it is
            return os.open(name, _WALK, dir_fd=parent)
        fd = os.open(name, _NEW_DIR, dir_fd=parent)
        try:
            # A set-gid parent passes its bit on (a group-shared tree): keep it.
            inherited = os.fstat(fd).st_mode & stat.S_ISGID
            self._take(fd, self.dir_mode | inherited)
        except BaseException:
            os.close(fd)
            raise
        log.debug("made directory %s (mode %o)", name, self.dir_mode | inherited)
        return fd

    def _take(self, fd: int, mode: int) -> None:
        # chmod first: once given away, changing the mode would need CAP_FOWNER.
        os.fchmod(fd, mode)
        if (self.uid, self.gid) != (KEEP, KEEP):
            os.fchown(fd, self.uid, self.gid)


def check_id(value: int, name: str) -> None:
    """Refuse (``OwnershipError``) a uid or gid that is neither -1 nor 0..2**31-1."""
    if not KEEP <= value <= MAX_ID:
        raise OwnershipError(f"{name} must be -1 (the IOC's own) or 0..{MAX_ID}, not {value}")


def check_mode(mode: int, allowed: int, what: str) -> None:
    if mode & ~allowed or mode < 0:
        raise OwnershipError(f"{what} {mode:#o} has bits outside {allowed:#o}")


def parse_mode(text: str, allowed: int) -> int:
    """An octal mode ('0640', '2770'); ValueError unless within ``allowed``."""
    mode = int(text, 8)
    check_mode(mode, allowed, "mode")
    return mode


def effective_capabilities() -> set[int]:
    """The bits of CapEff in /proc/self/status; without /proc, root's are all."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    mask = int(line.split()[1], 16)
                    return {bit for bit in range(mask.bit_length()) if mask >> bit & 1}
    except (OSError, ValueError, IndexError):
        log.warning("cannot read the capabilities from /proc/self/status", exc_info=True)
    return set(_CAPABILITY_NAMES) if os.geteuid() == 0 else set()


def _names(capabilities: set[int], separator: str) -> str:
    return separator.join(_CAPABILITY_NAMES[bit] for bit in sorted(capabilities))


def _replace_fd(old: int, new: int) -> int:
    os.close(old)
    return new


def _name(lookup, number: int) -> str:
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


IOC_OWNER = Owner()  # the IOC's own uid and gid, the default modes
